"""Strict fakes for tests: every call must be the next one the test expected.

A fake that accepts anything proves only what the test remembers to assert afterwards; these
fail the test at the first call nobody expected (with ``pytest.fail``, which code under test
cannot swallow with ``except Exception``), and :meth:`done` fails if an expected call never
came.
"""

from __future__ import annotations

import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from vmsilo.lifecycle.base import App
from vmsilo.lifecycle.progress import StartProgress
from vmsilo.lifecycle.spawn import StartWatch
from vmsilo.plan.model import Plan, VmPlan


class Unordered:
    """Matches an argv that starts with ``prefix`` followed by ``items`` in any order."""

    def __init__(self, prefix: Sequence[str], items: Sequence[str]) -> None:
        self.prefix = list(prefix)
        self.items = sorted(items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list):
            return NotImplemented
        n = len(self.prefix)
        return other[:n] == self.prefix and sorted(other[n:]) == self.items

    def __repr__(self) -> str:
        return f"Unordered({self.prefix!r}, {self.items!r})"


class StrictRun:
    """Stands in for :func:`vmsilo.runcmd.run` in ``module``; expects argvs in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
        self.expected: deque[tuple[list[str] | Unordered, int, bytes]] = deque()
        self.calls: list[list[str]] = []
        monkeypatch.setattr(module, "run", self.run)

    def expect(
        self, argv: list[str] | Unordered, *, returncode: int = 0, stderr: bytes = b""
    ) -> StrictRun:
        self.expected.append((argv, returncode, stderr))
        return self

    def run(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[bytes]:
        self.calls.append(list(argv))
        if not self.expected:
            pytest.fail(f"unexpected command {argv}")
        want, returncode, stderr = self.expected.popleft()
        if want != list(argv):
            pytest.fail(f"expected command {want}, got {argv}")
        return subprocess.CompletedProcess(argv, returncode, b"", stderr)

    def done(self) -> None:
        assert not self.expected, f"expected commands never run: {list(self.expected)}"


_PASS = object()


class StrictApp(App):
    """A lifecycle app that does nothing but check its calls against the expected ones.

    ``expect("stop", "work", with_clients=True, kill=False, returns=True)``: the method, the
    VM's name (``"*"`` for ``images_in_use``) and the keyword arguments must match the next
    call exactly.
    ``running_plan`` returns the plan it was given unless told otherwise; ``raises`` makes the
    call raise.
    """

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/strict-app.toml"))
        self.expected: deque[tuple[str, str, dict[str, Any], Any, BaseException | None]] = deque()

    def expect(
        self,
        method: str,
        vm: str,
        *,
        returns: Any = _PASS,
        raises: BaseException | None = None,
        **kwargs: Any,
    ) -> StrictApp:
        self.expected.append((method, vm, kwargs, returns, raises))
        return self

    def _call(self, method: str, vm: VmPlan | None, default: Any = None, **kwargs: Any) -> Any:
        got = (method, vm.name if vm is not None else "*", kwargs)
        if not self.expected:
            pytest.fail(f"unexpected lifecycle call {got}")
        want_method, want_vm, want_kwargs, returns, raises = self.expected.popleft()
        if (want_method, want_vm, want_kwargs) != got:
            pytest.fail(f"expected lifecycle call {(want_method, want_vm, want_kwargs)}, got {got}")
        if raises is not None:
            raise raises
        return default if returns is _PASS else returns

    def done(self) -> None:
        assert not self.expected, f"expected lifecycle calls never made: {list(self.expected)}"

    def start(
        self, plan: Plan, vm: VmPlan, *, wait: bool = True, progress: StartProgress | None = None
    ) -> None:
        if progress is not None:
            progress.done()  # a caller's status line ends with the start, whatever it was
        self._call("start", vm, wait=wait)

    def start_for_client(
        self, plan: Plan, vm: VmPlan, *, progress: StartProgress | None = None
    ) -> StartWatch | None:
        result: StartWatch | None = self._call("start_for_client", vm)
        return result

    def stop(
        self, plan: Plan, vm: VmPlan, *, with_clients: bool = False, kill: bool = False
    ) -> bool:
        return bool(self._call("stop", vm, default=True, with_clients=with_clients, kill=kill))

    def is_running(self, vm: VmPlan) -> bool:
        return bool(self._call("is_running", vm, default=False))

    def command_socket_live(self, vm: VmPlan) -> bool:
        return bool(self._call("command_socket_live", vm, default=False))

    def status(self, plan: Plan, vm: VmPlan) -> dict[str, Any]:
        result: dict[str, Any] = self._call("status", vm, default={"name": vm.name})
        return result

    def running_plan(self, plan: Plan, vm: VmPlan, users: Any = None) -> tuple[Plan, VmPlan]:
        result: tuple[Plan, VmPlan] = self._call("running_plan", vm, default=(plan, vm))
        return result

    def images_in_use(self, plan: Plan) -> tuple[set[Path], list[str]]:
        result: tuple[set[Path], list[str]] = self._call("images_in_use", None, default=(set(), []))
        return result
