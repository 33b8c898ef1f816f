"""The lifecycle room sits between cli/ and supervisor/: nothing below it imports it (or cli/),
host/ does not import supervisor/, and supervisor/ has no import loop left."""

from __future__ import annotations

import ast
from pathlib import Path

import vmsilo

SRC = Path(vmsilo.__file__).parent


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("vmsilo.")}


def test_only_cli_and_demo_use_the_lifecycle_and_host_does_not_use_the_supervisor() -> None:
    wrong = []
    for path in SRC.rglob("*.py"):
        room = path.relative_to(SRC).parts[0]
        for module in imports(path):
            top = module.split(".")[1]
            if room not in ("cli", "demo.py", "lifecycle") and top in ("lifecycle", "cli"):
                wrong.append(f"{path.relative_to(SRC)} imports {module}")
            if room == "lifecycle" and top == "cli":
                wrong.append(f"{path.relative_to(SRC)} imports {module}")
            if room == "host" and top == "supervisor":
                wrong.append(f"{path.relative_to(SRC)} imports {module}")
    assert wrong == []


def test_the_client_side_left_the_supervisor() -> None:
    for gone in ("control.py", "manage.py", "systemd_control.py"):
        assert not (SRC / "supervisor" / gone).exists()
    for path in (SRC / "supervisor").glob("*.py"):
        assert not any(m.startswith("vmsilo.lifecycle") for m in imports(path)), path
