"""vm-run's warm path: what it loads, how it parses, what it remembers of the config (no VM).

A warm ``vm-run VM true`` is mostly Python's start and one round trip to the guest; the rest is
kept small by loading only what that path needs (docs/BENCHMARKS.md). These tests pin that down
as behaviour, not timing: the modules a warm vm-run imports (against a running VM played by
tests/fake_qemu.py, which runs the real agent), that the fast command-line parser agrees with
argparse wherever it answers, and that the config memo is used only while the file is
unchanged and trustworthy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakevm import FakeInstall, make_fake_install
from vmsilo.cli import quick_look as ql
from vmsilo.cli import vm_run
from vmsilo.errors import UsageError

#: What the warm path must never load: the typed config (pydantic), the terminal UI (rich),
#: the asyncio client and its threads, and the modules only the slow paths need.
NOT_ON_THE_WARM_PATH = (
    "pydantic",
    "rich",
    "asyncio",
    "threading",
    "argparse",
    "tomllib",
    "typing",
    "dataclasses",
    "inspect",
    "pathlib",
    "vmsilo.channel.client",
    "vmsilo.channel.mux",
    "vmsilo.config.model",
    "vmsilo.plan",
    "vmsilo.lifecycle",
)


def imported(stderr: str) -> set[str]:
    """The modules named by ``python -X importtime``."""
    return {m.group(1) for m in re.finditer(r"^import time:[^|]*\|[^|]*\|\s*(\S+)", stderr, re.M)}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeInstall]:
    if os.geteuid() != 0:
        pytest.skip("needs root (the fake VM's supervisor)")
    inst = make_fake_install(tmp_path / "inst", "[vms.fake]\n@VM@")
    yield inst
    inst.cmd("vmsilo", "stop", "fake", timeout=60)


def test_a_warm_vm_run_loads_neither_pydantic_rich_asyncio_nor_argparse(
    fake: FakeInstall, tmp_path: Path
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = fake.env(XDG_RUNTIME_DIR=str(xdg))
    assert fake.cmd("vmsilo", "start", "fake").returncode == 0
    # the memo is written only for a config older than SETTLED
    age = time.time() - fake.config.stat().st_ctime
    time.sleep(max(0.0, ql.SETTLED / 1e9 - age + 0.1))
    runs = []
    for _ in range(2):  # the first parses the config and remembers it, the second does not
        p = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "vmsilo.cli.vm_run", "fake", "echo", "hi"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (p.returncode, p.stdout) == (0, "hi\n"), p.stderr[-2000:]
        runs.append(imported(p.stderr))
    assert (xdg / ql.MEMO_NAME).exists()
    assert "tomllib" in runs[0] and "vmsilo.channel.blocking_client" in runs[1]
    loaded = sorted(
        m for m in runs[1] for bad in NOT_ON_THE_WARM_PATH if m == bad or m.startswith(bad + ".")
    )
    assert loaded == [], loaded
    # the slow path still works from the same process kind: an unknown VM, a usage error
    p = fake.cmd("vm-run", "nosuch", "true", env=env)
    assert p.returncode == 255 and b"unknown VM" in p.stderr
    p = fake.cmd("vm-run", "--user", env=env)
    assert p.returncode == 255 and b"option --user needs a value" in p.stderr


# --------------------------------------------------------------------------- the fast parser

WORDS = [
    "-t",
    "--detach",
    "--root",
    "--no-autostart",
    "--user",
    "--user=bob",
    "--user=",
    "--env",
    "A=1",
    "=x",
    "--env=B=2",
    "--cwd",
    "--cwd=/tmp",
    "--timeout",
    "5",
    "0",
    "-1",
    "x",
    "--timeout=2.5",
    "-c",
    "-cfile",
    "-c=f",
    "--config=cfg",
    "--config",
    "--",
    "-",
    "",
    "-h",
    "--help",
    "--version",
    "--bogus",
    "--time",
    "-tc",
    "VM",
    "cmd",
    "-l",
]


def slow(argv: list[str]) -> object:
    """argparse's answer (the fast parser switched off), or the usage error's text."""
    original = vm_run._fast_parse
    try:
        vm_run._fast_parse = lambda argv: None  # type: ignore[assignment]
        return vm_run.parse_args(argv)
    except UsageError as e:
        return f"error: {e}"
    finally:
        vm_run._fast_parse = original


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=8))
def test_the_fast_parser_agrees_with_argparse(argv: list[str]) -> None:
    fast = vm_run._fast_parse(argv)
    if fast is not None:
        assert fast == slow(argv), argv


def test_the_fast_parser_takes_the_usual_command_lines() -> None:
    for argv in (
        ["work", "true"],
        ["--user", "bob", "--env", "A=1", "--env=B=2", "--cwd", "/tmp", "work", "ls", "-l"],
        ["-t", "--root", "--timeout", "5", "-c", "/etc/x.toml", "work", "bash", "--", "-x"],
        ["--detach", "--no-autostart", "--config=/x", "work", "sleep", "9"],
    ):
        fast = vm_run._fast_parse(argv)
        assert fast is not None and fast == slow(argv), argv
    args = vm_run._fast_parse(["--root", "--user", "bob", "VM", "x", "--help"])
    assert args is not None and (args.user, args.argv) == ("bob", ["x", "--help"])


# --------------------------------------------------------------------------- the config memo

CONFIG = 'user = "root"\nruntimeDir = "/run/x/"\n[vms.work]\n[vms.banking]\n[vms."Bad Name"]\n'


@pytest.fixture
def memo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    cfg = tmp_path / "vmsilo.toml"
    cfg.write_text(CONFIG)
    monkeypatch.setattr(ql, "SETTLED", 0)
    return cfg


def parse_count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the times the config file is parsed."""
    parsed: list[str] = []
    real = ql._read

    def counting(path: str) -> ql.QuickLook | None:
        parsed.append(path)
        return real(path)

    monkeypatch.setattr(ql, "_read", counting)
    return parsed


def test_an_unchanged_config_is_parsed_once(
    memo_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = parse_count(monkeypatch)
    first = ql.quick_look(str(memo_env), "work")
    second = ql.quick_look(str(memo_env), "banking")
    assert first is not None and second is not None and len(parsed) == 1
    assert (first.runtime_dir, first.user, first.text) == ("/run/x", "root", CONFIG)
    assert (second.runtime_dir, second.vms) == ("/run/x", frozenset({"work", "banking"}))
    assert ql.quick_look(str(memo_env), "nosuch") is None  # the full path says why
    assert ql.quick_look(str(memo_env), "Bad Name") is None
    # a cold start reads the text whatever the memo says
    cold = ql.quick_look(str(memo_env), "work", memo=False)
    assert cold is not None and cold.text == CONFIG and len(parsed) == 2


def test_a_changed_config_is_parsed_again(memo_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = parse_count(monkeypatch)
    assert ql.quick_look(str(memo_env), "work") is not None
    memo_env.write_text(CONFIG.replace("work", "play"))  # same size, new contents
    assert ql.quick_look(str(memo_env), "work") is None
    look = ql.quick_look(str(memo_env), "play")
    assert look is not None and len(parsed) == 2  # remembered again
    other = memo_env.with_name("other.toml")
    other.write_text('runtimeDir = "/elsewhere"\n[vms.work]\n')
    look = ql.quick_look(str(other), "work")
    assert look is not None and look.runtime_dir == "/elsewhere" and len(parsed) == 3


def test_a_memo_others_could_write_or_a_fresh_config_is_not_trusted(
    memo_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    parsed = parse_count(monkeypatch)
    assert ql.quick_look(str(memo_env), "work") is not None
    memo = tmp_path / "xdg" / ql.MEMO_NAME
    text = memo.read_text()
    assert "/run/x" in text
    memo.write_text(text.replace("/run/x", "/run/evil"))
    memo.chmod(0o622)  # writable by others: ignored
    look = ql.quick_look(str(memo_env), "work")
    assert look is not None and look.runtime_dir == "/run/x" and len(parsed) == 2
    # rewritten by the look above (0600) and trusted again
    assert memo.stat().st_mode & 0o777 == 0o600
    assert ql.quick_look(str(memo_env), "work") is not None and len(parsed) == 2
    # a runtime dir others may write gets no memo at all
    (tmp_path / "xdg").chmod(0o777)
    assert ql.quick_look(str(memo_env), "work") is not None and len(parsed) == 3
    (tmp_path / "xdg").chmod(0o700)
    # a config changed within SETTLED is not remembered: a change in the same tick could hide
    monkeypatch.setattr(ql, "SETTLED", 3600 * 10**9)
    memo.unlink()
    assert ql.quick_look(str(memo_env), "work") is not None
    assert not memo.exists()
