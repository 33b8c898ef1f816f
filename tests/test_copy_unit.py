"""vm-copy without VMs (SPEC §9.4): the destination's unpacker against crafted hostile streams,
the source's packer, their shared rules, the ``[copy]`` limits and vm-copy's command line.

The unpacker runs in-process on this host with ``--home`` pointing at a temporary directory;
every hostile case checks that nothing appeared outside ``~/Incoming/<SRC>/`` and that what
is inside is only plain files, directories and links that stay inside.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fleet import USERS
from strict import StrictApp
from vmsilo.cli import vm_copy
from vmsilo.config.load import parse_config
from vmsilo.config.problems import ConfigErrors
from vmsilo.guest import copy_pack, copy_unpack
from vmsilo.guest.copy_rules import Refused, link_stays_inside, split_name

# ---------------------------------------------------------------- streams


def tar(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o644 if kind == tarfile.REGTYPE else 0o755
    for key, value in kw.items():
        setattr(ti, key, value)
    return ti


def d(name: str, **kw: Any) -> tuple[tarfile.TarInfo, None]:
    return info(name, tarfile.DIRTYPE, **kw), None


def f(name: str, data: bytes = b"x", **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return info(name, size=len(data), **kw), data


def link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return info(name, tarfile.SYMTYPE, linkname=target), None


def unpack(
    home: Path, stream: bytes, max_bytes: int = 10**6, max_files: int = 100
) -> tuple[int, str]:
    import contextlib

    err = io.StringIO()
    args = ["--src=src", f"--max-bytes={max_bytes}", f"--max-files={max_files}", f"--home={home}"]
    with contextlib.redirect_stderr(err):
        status = copy_unpack.main(args, io.BufferedReader(io.BytesIO(stream)))  # type: ignore[arg-type]
    return status, err.getvalue()


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: 'd MODE', 'f MODE DATA' or 'l TARGET'."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"l {os.readlink(p)}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"d {stat.S_IMODE(st.st_mode):o}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"f {stat.S_IMODE(st.st_mode):o} {p.read_bytes()!r}"
            else:
                out[rel] = f"? {st.st_mode:o}"
    return out


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    (h / "secret").write_text("do not touch")
    return h


def assert_safe(home: Path, tmp_path: Path) -> dict[str, str]:
    """Nothing outside ~/Incoming/src (the home held only `secret`; tmp only `home`); inside,
    only plain entries without setuid/setgid/sticky and links that stay inside."""
    assert sorted(os.listdir(tmp_path)) == ["home"]
    assert sorted(os.listdir(home)) == ["Incoming", "secret"]
    assert (home / "secret").read_text() == "do not touch"
    assert os.listdir(home / "Incoming") == ["src"]
    inside = tree(home / "Incoming" / "src")
    for rel, what in inside.items():
        kind, _, rest = what.partition(" ")
        assert kind in "dfl", (rel, what)
        if kind in "df":
            assert int(rest.split()[0], 8) <= 0o777, (rel, what)
        else:
            assert link_stays_inside(rel.split("/")[:-1], rest), (rel, what)
    return inside


# ---------------------------------------------------------------- hostile streams

HOSTILE = {
    "dotdot": [d("a"), f("a/../../../escaped")],
    "dotdot-top": [f("../escaped")],
    "absolute": [f("/tmp/escaped-vmsilo-copy-test")],
    "dot": [d("a"), f("a/./b")],
    "empty-component": [d("a"), f("a//b")],
    "char-device": [d("a"), (info("a/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)],
    "block-device": [d("a"), (info("a/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)],
    "fifo": [d("a"), (info("a/fifo", tarfile.FIFOTYPE), None)],
    "hardlink": [d("a"), (info("a/h", tarfile.LNKTYPE, linkname="../secret"), None)],
    "link-up": [d("a"), link("a/out", "../../..")],
    "link-up-to-siblings": [d("a"), link("a/out", "../secret")],
    "link-absolute": [d("a"), link("a/out", "/etc")],
    "link-dotdot-inside": [d("a"), d("a/b"), link("a/b/x", "../b/../../..")],
    "link-top": [link("top", "secret")],
    "file-through-link": [d("a"), d("a/b"), link("a/c", "b"), f("a/c/escaped")],
    "dir-through-link": [d("a"), link("a/c", "."), d("a/c/x")],
    "parent-missing": [f("a/b")],
    "link-then-file-same-name": [d("a"), link("a/x", "y"), f("a/x")],
    "file-twice": [d("a"), f("a/x", b"first"), f("a/x", b"second")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_stream_is_refused_and_leaves_nothing_dangerous(
    home: Path, tmp_path: Path, case: str
) -> None:
    stream = tar(d("ok"), f("ok/setuid", b"#!", mode=0o6755), *HOSTILE[case])
    status, err = unpack(home, stream)
    assert status == 1, err
    assert err.startswith("~/Incoming/src"), err
    inside = assert_safe(home, tmp_path)
    assert inside["ok"] == "d 755"
    assert inside["ok/setuid"] == "f 755 b'#!'"  # setuid/setgid dropped
    assert not Path("/tmp/escaped-vmsilo-copy-test").exists()


def test_first_file_of_a_name_is_never_overwritten(home: Path, tmp_path: Path) -> None:
    status, err = unpack(home, tar(d("a"), f("a/x", b"first"), f("a/x", b"second")))
    assert status == 1 and err == "~/Incoming/src/a/x: already exists (not overwritten)\n"
    assert assert_safe(home, tmp_path)["a/x"] == "f 644 b'first'"


def test_an_existing_item_is_refused_and_untouched(home: Path, tmp_path: Path) -> None:
    stream = tar(d("a"), f("a/x", b"first"))
    assert unpack(home, stream) == (0, "")
    before = tree(home / "Incoming")
    status, err = unpack(home, tar(d("a"), f("a/x", b"second")))
    assert (status, err) == (1, "~/Incoming/src/a: already exists (not overwritten)\n")
    assert tree(home / "Incoming") == before
    status, err = unpack(home, tar(f("a", b"second")))
    assert status == 1 and tree(home / "Incoming") == before


def test_limits_are_enforced_before_writing(home: Path, tmp_path: Path) -> None:
    status, err = unpack(home, tar(d("a"), f("a/x", b"1234"), f("a/y", b"5678")), max_bytes=6)
    assert status == 1 and "a/y: more than copy.maxBytes (6) bytes" in err
    assert "a/y" not in assert_safe(home, tmp_path)
    status, err = unpack(home, tar(d("b"), f("b/x"), f("b/y")), max_files=2)
    assert status == 1 and "b/y: more than copy.maxFiles (2) files" in err


def test_a_huge_metadata_header_is_refused_unread(home: Path, tmp_path: Path) -> None:
    header = info("././@PaxHeader", tarfile.XHDTYPE, size=8**11 - 1).tobuf(tarfile.USTAR_FORMAT)
    status, err = unpack(home, header + b"\0" * 1024)
    assert status == 1 and "malformed stream" in err


@pytest.mark.parametrize("junk", [b"x" * 100, os.urandom(4096), b"\0" * 512 + b"x" * 600])
def test_junk_is_refused(home: Path, tmp_path: Path, junk: bytes) -> None:
    status, err = unpack(home, junk)
    assert status == 1, err
    assert_safe(home, tmp_path)


def test_a_truncated_file_is_removed(home: Path, tmp_path: Path) -> None:
    stream = tar(d("a"), f("a/x", b"y" * 100_000))
    status, err = unpack(home, stream[:20_000])
    assert status == 1, err
    assert "a/x" not in assert_safe(home, tmp_path)


def test_an_empty_stream_creates_nothing(home: Path, tmp_path: Path) -> None:
    assert unpack(home, b"") == (0, "")
    assert sorted(os.listdir(home)) == ["secret"]


def test_links_inside_and_gnu_long_names_arrive(home: Path, tmp_path: Path) -> None:
    long = "n" * 200
    stream = tar(
        d("a"),
        d("a/b"),
        f(f"a/b/{long}", b"long"),
        link("a/b/up", ".."),
        link("a/b/sib", "../c"),
        link("a/self", "."),
        fmt=tarfile.GNU_FORMAT,
    )
    assert unpack(home, stream) == (0, "")
    inside = assert_safe(home, tmp_path)
    assert inside[f"a/b/{long}"] == "f 644 b'long'"
    assert inside["a/b/up"] == "l .." and inside["a/b/sib"] == "l ../c"


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("parent", "target", "ok"),
    [
        (["a"], "b", True),
        (["a"], ".", True),
        (["a", "b"], "..", True),
        (["a", "b"], "../c/d", True),
        (["a", "b"], "../..", False),
        (["a"], "..", False),
        (["a", "b"], "c/../..", False),
        (["a", "b"], "c/..", False),
        (["a"], "/etc", False),
        (["a"], "", False),
        ([], "a", False),
    ],
)
def test_link_rule(parent: list[str], target: str, ok: bool) -> None:
    assert link_stays_inside(parent, target) is ok


@pytest.mark.parametrize("name", ["", "/a", "a/../b", "a//b", "./a", "a/.", "a\0b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(Refused):
        split_name(name)


# ---------------------------------------------------------------- the packer


def test_pack_then_unpack_round_trip(tmp_path: Path, home: Path) -> None:
    src = tmp_path / "srchome"
    (src / "t" / "sub").mkdir(parents=True)
    (src / "t" / "empty").mkdir()
    (src / "t" / "sub" / "big").write_bytes(os.urandom(300_000))
    (src / "t" / "ünï ✓").write_bytes(b"u")
    (src / "t" / "l").symlink_to("sub/big")
    (src / "t" / "sub" / "up").symlink_to("../l")
    os.chmod(src / "t" / "sub" / "big", 0o4755)
    (src / "one").write_bytes(b"1")
    entries = copy_pack.collect(["t", str(src / "one")], str(src))
    buf = io.BytesIO()
    copy_pack.write(entries, buf)
    assert unpack(home, buf.getvalue(), max_bytes=10**7) == (0, "")
    got = tree(home / "Incoming" / "src")
    want = tree(src)
    want["t/sub/big"] = want["t/sub/big"].replace("f 4755", "f 755")
    assert got == want
    import shutil

    shutil.rmtree(src)


def test_pack_refuses_what_would_not_arrive(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "out").symlink_to("/etc/passwd")
    with pytest.raises(Refused, match="leads outside the copy"):
        copy_pack.collect(["t"], str(tmp_path))
    (tmp_path / "u").mkdir()
    os.mkfifo(tmp_path / "u" / "fifo")
    with pytest.raises(Refused, match="not a regular file"):
        copy_pack.collect(["u"], str(tmp_path))
    with pytest.raises(Refused, match="no such file"):
        copy_pack.collect(["missing"], str(tmp_path))
    (tmp_path / "v").mkdir()
    with pytest.raises(Refused, match="a second PATH"):
        copy_pack.collect(["v", f"{tmp_path}/v/"], str(tmp_path))
    with pytest.raises(Refused, match="no name"):
        copy_pack.collect(["/"], str(tmp_path))


# ---------------------------------------------------------------- config and command line


def test_copy_limits_config() -> None:
    cfg = parse_config('user = "alice"\n[copy]\nmaxBytes = 1024\n', USERS)
    assert cfg.copy_limits.max_bytes == 1024 and cfg.copy_limits.max_files == 1_000_000
    assert parse_config('user = "alice"\n', USERS).copy_limits.max_bytes == 64 << 30
    with pytest.raises(ConfigErrors) as e:
        parse_config('user = "alice"\n[copy]\nmaxByte = 1\n', USERS)
    assert "maxBytes" in str(e.value.problems)
    with pytest.raises(ConfigErrors):
        parse_config('user = "alice"\n[copy]\nmaxFiles = 0\n', USERS)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "vmsilo.toml"
    path.write_text(
        f'user = "alice"\nstateDir = "{tmp_path}/state"\nruntimeDir = "{tmp_path}/run"\n'
        "[vms.alpha]\n[vms.beta]\n"
    )
    return path


def run_copy(*args: str, app: StrictApp | None = None) -> tuple[int, str]:
    err = io.StringIO()
    status = vm_copy.main(list(args), app, users=USERS, stderr=err)
    return status, err.getvalue()


@pytest.mark.parametrize("args", [[], ["alpha"], ["alpha", "beta"], ["--bogus", "a", "b", "c"]])
def test_usage_exits_255(args: list[str]) -> None:
    assert run_copy(*args) == (255, vm_copy.USAGE + "\n")


def test_unknown_vm_exits_255_listing_the_vms(cfg: Path) -> None:
    app = StrictApp()
    status, err = run_copy("-c", str(cfg), "alpha", "nosuch", "f", app=app)
    assert status == 255
    assert "vm-copy: unknown VM: nosuch" in err and "Available VMs: alpha, beta" in err
    app.done()  # nothing was started


def test_stopped_vm_with_no_autostart_exits_255(cfg: Path) -> None:
    app = StrictApp()
    app.expect("command_socket_live", "alpha", returns=False)
    status, err = run_copy("-c", str(cfg), "--no-autostart", "alpha", "beta", "f", app=app)
    assert (status, err) == (
        255,
        "vm-copy: VM alpha is not running (hint: start it: vm-start alpha)\n",
    )
    app.done()


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        vm_copy.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(vm_copy.USAGE) and "~/Incoming/<SRC>" in out and "255" in out
