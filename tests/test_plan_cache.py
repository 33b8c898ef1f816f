"""The plan cache a cold vm-run reuses: exact round trip, and trusted only when it should be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet import USERS
from vmsilo.backends.crosvm import crosvm_argv
from vmsilo.config.load import parse_config
from vmsilo.plan import cache
from vmsilo.plan.build import build_plan

EVERY = Path(__file__).parent / "data" / "configs" / "every-option.toml"


def test_round_trip_is_exact() -> None:
    plan = build_plan(parse_config(EVERY.read_text(), USERS), USERS)
    import json

    back = cache._decode(cache.Plan, json.loads(json.dumps(cache._encode(plan))))
    assert back == plan
    assert crosvm_argv(back, back.vms["work"]) == crosvm_argv(plan, plan.vms["work"])


@pytest.mark.skipif(os.geteuid() != 0, reason="the cache is written by root only")
def test_saved_plan_is_used_only_for_the_same_text(tmp_path: Path) -> None:
    text = f'user = "root"\nruntimeDir = "{tmp_path}"\n[vms.a]\nhypervisor = "qemu"\n'
    plan = build_plan(parse_config(text))
    cache.save_plan(plan, text, "root")
    stored = tmp_path / cache.CACHE_NAME
    assert oct(stored.stat().st_mode & 0o777) == "0o600"
    assert cache.load_plan(str(tmp_path), text, "root") == plan
    assert cache.load_plan(str(tmp_path), text + "\n# edited\n", "root") is None
    assert cache.load_plan(str(tmp_path), text, "nobody") is None  # other user ids
    stored.chmod(0o644)  # a file others could have written is never trusted
    assert cache.load_plan(str(tmp_path), text, "root") is None
    stored.write_text("{not json")
    stored.chmod(0o600)
    assert cache.load_plan(str(tmp_path), text, "root") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the cache is written by root only")
def test_read_only_verbs_write_nothing_and_starting_verbs_refresh_the_cache(
    tmp_path: Path,
) -> None:
    import io

    from vmsilo.cli.common import load
    from vmsilo.cli.vmsilo import main as vmsilo_main

    config = tmp_path / "vmsilo.toml"
    config.write_text(
        f'user = "root"\nruntimeDir = "{tmp_path}"\nstateDir = "{tmp_path}"\n'
        '[vms.a]\nhypervisor = "qemu"\n'
    )
    stored = tmp_path / cache.CACHE_NAME
    before = sorted(tmp_path.iterdir())
    read_only = (["check"], ["plan"], ["plan", "--json"], ["argv", "a"], ["render-launcher", "a"])
    for verb in (*read_only, ["status"], ["status", "--json"], ["image", "list"]):
        out = io.StringIO()
        assert vmsilo_main(["-c", str(config), *verb], stdout=out, stderr=out) == 0, out.getvalue()
        assert sorted(tmp_path.iterdir()) == before, verb
    load(str(config))
    assert not stored.exists()
    loaded = load(str(config), cache=True)
    assert cache.load_plan(str(tmp_path), config.read_text(), "root") == loaded.plan
