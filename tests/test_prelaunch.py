"""The supervisor's launch up to the VMM (vmsilo.supervisor.prelaunch), against the fake QEMU.

Each scenario runs in a fresh interpreter (the launch installs signal handlers and writes
state for the process it runs in) and reports what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fakevm import FakeInstall, make_fake_install

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PRELUDE = """
import json, os, signal, socket, sys
from vmsilo.cli.common import load
from vmsilo.errors import VmsiloError
from vmsilo.supervisor.prelaunch import Prelaunch, ServiceOptions

loaded = load(sys.argv[1])
plan, text = loaded.plan, loaded.path.read_text()
"""


NETVM_AND_CLIENT = (
    "[vms.gw]\n@VM@\nnetwork = { isNetvm = true }\n[vms.client]\n@VM@\nnetwork = { netvm = 'gw' }\n"
)


def scenario(inst: FakeInstall, body: str) -> dict[str, Any]:
    code = PRELUDE + textwrap.dedent(body)
    p = subprocess.run(
        [sys.executable, "-c", code, str(inst.config)],
        env=inst.env(),
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr.decode()
    result: dict[str, Any] = json.loads(p.stdout.decode().splitlines()[-1])
    return result


def test_the_vmm_starts_before_asyncio_or_the_channel_code_is_loaded(tmp_path: Path) -> None:
    inst = make_fake_install(tmp_path / "inst", "[vms.fake]\n@VM@")
    seen = scenario(
        inst,
        """
        launch = Prelaunch(plan, plan.vms["fake"], ServiceOptions(str(loaded.path), text))
        launch.run()
        loaded_now = [m for m in sys.modules if m == "asyncio" or m.startswith("vmsilo.channel")]
        started = launch.vmm is not None and launch.vmm.proc.poll() is None
        launch.vmm.kill()
        launch.vmm.proc.wait()
        print(json.dumps({"failure": launch.failure, "started": started, "loaded": loaded_now}))
        """,
    )
    assert seen == {"failure": None, "started": True, "loaded": []}


def test_a_stop_signal_during_the_launch_keeps_the_vmm_from_starting(tmp_path: Path) -> None:
    inst = make_fake_install(tmp_path / "inst", NETVM_AND_CLIENT)
    seen = scenario(
        inst,
        """
        import asyncio
        from vmsilo.supervisor.service import Supervisor
        from vmsilo.supervisor.state import read_state

        def stop_while_the_netvm_starts(name):
            os.kill(os.getpid(), signal.SIGTERM)  # `vmsilo stop client`, say

        vm = plan.vms["client"]
        opts = ServiceOptions(str(loaded.path), text, start_netvm=stop_while_the_netvm_starts)
        launch = Prelaunch(plan, vm, opts)
        launch.run()
        remembered, vmm = launch.stop_requested, launch.vmm
        status = asyncio.run(Supervisor(launch).run())
        st = read_state(vm.paths.state_file)
        print(json.dumps({"remembered": remembered, "vmm": vmm is not None, "status": status,
                          "state": st.state, "socket": os.path.exists(vm.paths.command_socket)}))
        """,
    )
    assert seen == {
        "remembered": True,
        "vmm": False,
        "status": 0,
        "state": "stopped",
        "socket": False,
    }


def test_clients_queued_on_a_launch_that_fails_get_the_reason(tmp_path: Path) -> None:
    inst = make_fake_install(tmp_path / "inst", NETVM_AND_CLIENT)
    seen = scenario(
        inst,
        """
        import asyncio
        from vmsilo.channel.protocol import (
            HEADER, ExecRequest, FrameType, decode_json, encode_frame)
        from vmsilo.supervisor.service import Supervisor

        vm = plan.vms["client"]
        clients = []

        def netvm_fails(name):
            # vm-runs arrive while the launch is under way: they wait in the backlog
            for _ in range(3):
                c = socket.socket(socket.AF_UNIX)
                c.connect(vm.paths.command_socket)
                c.sendall(encode_frame(FrameType.OPEN, 0, ExecRequest(argv=["true"]).encode()))
                clients.append(c)
            raise VmsiloError(f"netvm {name} exploded", "look at it")

        launch = Prelaunch(plan, vm, ServiceOptions(str(loaded.path), text,
                                                    start_netvm=netvm_fails))
        launch.run()
        status = asyncio.run(Supervisor(launch).run())
        answers = []
        for c in clients:
            c.settimeout(10)
            data = b""
            while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack(
                    data[:HEADER.size])[2]:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            _, ftype, length, _ = HEADER.unpack(data[:HEADER.size])
            answers.append([ftype == FrameType.ERROR,
                            decode_json(data[HEADER.size:HEADER.size + length])["message"]])
        print(json.dumps({"failure": launch.failure, "vmm": launch.vmm is not None,
                          "status": status, "answers": answers}))
        """,
    )
    reason = "netvm gw exploded (hint: look at it)"
    assert seen["failure"] == reason
    assert seen["status"] == 1 and seen["vmm"] is False
    assert seen["answers"] == [[True, reason]] * 3
    assert inst.status("client")["state"] == "failed"
