"""Helpers to build configs and plans in tests without touching the host's accounts."""

from __future__ import annotations

import io
import json
from typing import Any

from vmsilo.cli.vmsilo import main as vmsilo_main
from vmsilo.config.load import parse_config, validate_config
from vmsilo.config.model import Config
from vmsilo.config.users import HostUser, StaticUsers
from vmsilo.plan.build import build_plan
from vmsilo.plan.model import Plan

USERS = StaticUsers(
    {
        "alice": HostUser("alice", 1000, 1000, "/home/alice"),
        "bob": HostUser("bob", 1001, 100, "/home/bob"),
    }
)


def plan_of(toml: str) -> Plan:
    return build_plan(parse_config(toml, USERS), USERS)


def plan_of_data(data: dict[str, Any]) -> Plan:
    config: Config = validate_config(data, USERS)
    return build_plan(config, USERS)


def run_vmsilo(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = vmsilo_main(args, users=USERS, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def run_vmsilo_json(args: list[str]) -> Any:
    status, out, err = run_vmsilo(args)
    assert status == 0, err
    return json.loads(out)
