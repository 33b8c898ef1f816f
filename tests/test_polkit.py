"""The polkit rule, evaluated by a real JavaScript engine (node) against a stand-in of polkit's API.

The stand-in offers what polkit gives a rules file — ``polkit.addRule``, ``polkit.Result``,
``action.id``, ``action.lookup(key)``, ``subject.user`` — and runs every registered rule the way
polkitd does (first non-null result wins). The rule must say YES for exactly the configured
user managing exactly the installed vmsilo units with start/stop/restart, and stay out of every
other decision (returning nothing, so polkit's defaults — admin authentication — apply).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fleet import plan_of
from vmsilo.host.units import render_polkit

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")

HARNESS = r"""
"use strict";
const fs = require("fs");
const vm = require("vm");
const [ruleFile, casesFile] = process.argv.slice(2);
const rules = [];
const polkit = {
  Result: { NO: "no", YES: "yes", AUTH_SELF: "auth_self", AUTH_SELF_KEEP: "auth_self_keep",
            AUTH_ADMIN: "auth_admin", AUTH_ADMIN_KEEP: "auth_admin_keep", NOT_HANDLED: null },
  addRule(fn) { rules.push(fn); },
  addAdminRule(fn) {},
  log(msg) {},
  spawn() { throw new Error("rules must not spawn programs"); },
};
// a fresh ES5-ish global with only polkit in it, as polkitd's interpreter has
vm.runInNewContext(fs.readFileSync(ruleFile, "utf8"), { polkit }, { filename: ruleFile });
const out = JSON.parse(fs.readFileSync(casesFile, "utf8")).map((c) => {
  const action = { id: c.action, lookup: (k) => c.details[k] };
  const subject = { user: c.user, groups: [], local: true, active: true,
                    isInGroup: () => false, isInNetGroup: () => false };
  for (const rule of rules) {
    const r = rule(action, subject);
    if (r !== undefined && r !== null) return r;
  }
  return null;
});
process.stdout.write(JSON.stringify(out));
"""

MANAGE = "org.freedesktop.systemd1.manage-units"
CONFIG = """
user = "alice"
[vms.work]
[vms.netvm]
network.isNetvm = true
"""


def decide(tmp_path: Path, cases: list[tuple[str, str, dict[str, str]]]) -> list[str | None]:
    rule = tmp_path / "50-vmsilo.rules"
    rule.write_text(render_polkit(plan_of(CONFIG)))
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    data = tmp_path / "cases.json"
    data.write_text(json.dumps([{"user": u, "action": a, "details": d} for u, a, d in cases]))
    p = subprocess.run(
        ["node", str(harness), str(rule), str(data)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    result: list[str | None] = json.loads(p.stdout)
    return result


def test_user_manages_exactly_the_vmsilo_units(tmp_path: Path) -> None:
    allowed = [
        ("alice", MANAGE, {"unit": unit, "verb": verb})
        for unit in (
            "vmsilo-work-vm.service",
            "vmsilo-netvm-vm.service",
            "vmsilo-work-command.socket",
        )
        for verb in ("start", "stop", "restart")
    ]
    denied = [
        ("alice", MANAGE, {"unit": "sshd.service", "verb": "start"}),
        ("alice", MANAGE, {"unit": "vmsilo.slice", "verb": "stop"}),
        ("alice", MANAGE, {"unit": "vmsilo-work-vm.service.d", "verb": "start"}),
        ("alice", MANAGE, {"unit": "xvmsilo-work-vm.service", "verb": "start"}),
        ("alice", MANAGE, {"unit": "vmsilo-work-vm.service ", "verb": "start"}),
        ("alice", MANAGE, {"unit": "vmsilo-other-vm.service", "verb": "start"}),  # not installed
        ("alice", MANAGE, {"unit": "vmsilo-work-vm.serviceX", "verb": "start"}),
        ("alice", MANAGE, {"unit": "vmsilo-work-vm.service", "verb": "reload"}),
        ("alice", MANAGE, {"unit": "vmsilo-work-vm.service", "verb": "kill"}),
        ("alice", MANAGE, {"unit": "vmsilo-work-vm.service", "verb": ""}),
        ("alice", MANAGE, {}),
        ("alice", "org.freedesktop.systemd1.manage-unit-files", {"unit": "x", "verb": "start"}),
        ("alice", "org.freedesktop.systemd1.reload-daemon", {}),
        ("bob", MANAGE, {"unit": "vmsilo-work-vm.service", "verb": "start"}),
        ("root", MANAGE, {"unit": "vmsilo-work-vm.service", "verb": "start"}),
        ("alicex", MANAGE, {"unit": "vmsilo-work-vm.service", "verb": "start"}),
    ]
    results = decide(tmp_path, allowed + denied)
    assert results[: len(allowed)] == ["yes"] * len(allowed)
    # anything else is left to polkit's defaults (admin authentication), never granted
    assert results[len(allowed) :] == [None] * len(denied)


def test_rule_names_the_user_as_a_string_literal(tmp_path: Path) -> None:
    text = render_polkit(plan_of(CONFIG))
    assert 'subject.user !== "alice"' in text
    assert "=>" not in text and "let " not in text and "const " not in text  # ES5 for duktape
