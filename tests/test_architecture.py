"""The house's layout, checked with ``ast`` over every module of ``src/vmsilo``.

* **Floors**: a module imports only modules of its own level or lower (:data:`LEVELS`);
  ``guest`` runs inside the VM and imports only level-0 (standard-library-only) modules.
* **No cycles**: none between the top-level packages, none between modules.
* **One place per VMM**: no ``hypervisor == "qemu"``-style branch outside ``backends/``
  (ask the VM's :class:`vmsilo.backends.base.Backend` instead).

Every import counts, also those inside functions (a lazy import hides a cycle from Python, not
from the reader) and under ``TYPE_CHECKING``. There is no list of tolerated exceptions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

#: Level of each top-level package of ``vmsilo`` (lower levels never import higher ones).
LEVELS: dict[str, int] = {
    "config": 1,
    "plan": 2,
    "channel": 0,  # the framed protocol: stdlib-only, spoken by host and guest alike
    "host": 3,
    "image": 3,  # host-side image building (moving out of guest/)
    "wayland": 3,  # the Wayland filter: host-side, run as the desktop user
    "backends": 4,
    "supervisor": 5,
    "lifecycle": 6,
    "cli": 7,
    "demo": 7,
    "contracts": 0,  # stdlib-only: shared by host and guest
    "guest": 0,  # runs in the VM: may import level-0 modules only (see GUEST)
}
#: Standard-library-only leaf and contract modules: level 0, wherever they live. Their parent
#: packages' ``__init__`` must stay level 0 too (importing a module runs them).
LEVEL0: frozenset[str] = frozenset(
    {
        "vmsilo",
        "vmsilo.errors",
        "vmsilo.runcmd",
        "vmsilo.defaults",
        "vmsilo.backends.features",
        "vmsilo.host.findings",
    }
)
GUEST = "guest"
#: Where comparing ``hypervisor`` with a VMM's name is the point.
BACKENDS = "vmsilo.backends"
VMM_NAMES = frozenset({"crosvm", "qemu"})


# --------------------------------------------------------------------------- reading the tree


def tree_sources(src: Path = SRC) -> dict[str, str]:
    """Every module of ``vmsilo`` under ``src``: dotted name → source text."""
    out = {}
    for path in sorted((src / "vmsilo").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def _is_package(name: str, modules: Iterable[str]) -> bool:
    return any(m.startswith(name + ".") for m in modules)


def imports_of(name: str, source: str, modules: Mapping[str, str]) -> set[str]:
    """The ``vmsilo`` modules ``name`` imports anywhere in its body (functions included).

    ``from pkg import x`` names the module ``pkg.x`` when there is one, else ``pkg``;
    ``__import__``/``importlib.import_module`` with a literal name count as imports too."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if fname in ("__import__", "import_module") and isinstance(first, ast.Constant):
                found.add(str(first.value))
    return {m for m in found if m == "vmsilo" or m.startswith("vmsilo.")}


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """Module → the modules of the tree it imports (known edges left out)."""
    graph = {}
    for name, source in sources.items():
        targets = {_owner(t, sources) for t in imports_of(name, source, sources)}
        graph[name] = {t for t in targets if t != name}
    return graph


def _owner(target: str, modules: Mapping[str, str]) -> str:
    """The module of the tree ``target`` names (``vmsilo.x.Name`` → ``vmsilo.x``)."""
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def level(name: str) -> int | None:
    if name in LEVEL0:
        return 0
    return LEVELS.get(top(name))


# --------------------------------------------------------------------------- the rules


def floor_violations(sources: Mapping[str, str]) -> list[str]:
    problems = []
    graph = import_graph(sources)
    for name, targets in sorted(graph.items()):
        mine = level(name)
        if mine is None:
            problems.append(f"{name}: package {top(name)!r} has no level in LEVELS")
            continue
        for target in sorted(targets):
            theirs = level(target)
            if theirs is None:
                continue  # reported as that module's own problem
            guest_rule = top(name) == GUEST and top(target) != GUEST and theirs != 0
            if theirs > mine or guest_rule:
                problems.append(f"{name} (level {mine}) imports {target} (level {theirs})")
    for leaf in sorted(LEVEL0 & set(sources)):
        parent = leaf.rpartition(".")[0]
        while parent:
            for target in sorted(graph.get(parent, ())):
                if level(target) != 0:
                    problems.append(f"{parent} (parent of level-0 {leaf}) imports {target}")
            parent = parent.rpartition(".")[0]
    return problems


def _cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((e for e in edges if e in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def cycle_violations(sources: Mapping[str, str]) -> list[str]:
    graph = import_graph(sources)
    problems = [f"module cycle: {' <-> '.join(c)}" for c in _cycles(graph)]

    def component(name: str) -> str:  # a level-0 leaf stands apart from its package
        return name if name in LEVEL0 else f"vmsilo.{top(name)}"

    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        edges = packages.setdefault(component(name), set())
        edges |= {component(t) for t in targets} - {component(name)}
    problems += [f"package cycle: {' <-> '.join(c)}" for c in _cycles(packages)]
    return problems


def _mentions_hypervisor(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Attribute) and n.attr == "hypervisor")
        or (isinstance(n, ast.Name) and n.id == "hypervisor")
        for n in ast.walk(node)
    )


def _names_a_vmm(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in VMM_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_vmm(e) for e in node.elts)
    return False


def branch_violations(sources: Mapping[str, str]) -> list[str]:
    """``hypervisor == "qemu"``, ``"crosvm" in kinds``, ``x if vm.hypervisor …`` and
    ``match vm.hypervisor`` outside ``backends/``."""
    problems = []
    for name, source in sorted(sources.items()):
        if name == BACKENDS or name.startswith(BACKENDS + "."):
            continue
        for node in ast.walk(ast.parse(source)):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(_names_a_vmm(o) for o in operands) or any(
                    _mentions_hypervisor(o) for o in operands
                ):
                    problems.append(f"{where}: compares with a hypervisor")
            elif isinstance(node, ast.If | ast.IfExp | ast.While) and _mentions_hypervisor(
                node.test
            ):
                problems.append(f"{where}: branches on the hypervisor")
            elif isinstance(node, ast.Match) and _mentions_hypervisor(node.subject):
                problems.append(f"{where}: matches on the hypervisor")
            elif isinstance(node, ast.Subscript) and _mentions_hypervisor(node.slice):
                problems.append(f"{where}: looks something up by hypervisor")
    return sorted(problems, key=lambda p: (p.split(":")[0], int(p.split(":")[1]), p))


# --------------------------------------------------------------------------- the tests


def test_every_package_has_a_level() -> None:
    packages = {top(m) for m in tree_sources() if m not in LEVEL0}
    assert packages - set(LEVELS) == set(), "give each new package a level in LEVELS"


def test_no_module_imports_above_its_floor() -> None:
    assert floor_violations(tree_sources()) == []


def test_no_import_cycles() -> None:
    assert cycle_violations(tree_sources()) == []


def test_no_hypervisor_branch_outside_backends() -> None:
    assert branch_violations(tree_sources()) == []


# --------------------------------------------------------------------------- the rules can fail


SYNTHETIC = {
    "vmsilo": "",
    "vmsilo.errors": "",
    "vmsilo.config": "",
    "vmsilo.config.rules": "def f():\n    from vmsilo.backends import qemu\n",
    "vmsilo.backends": "",
    "vmsilo.backends.qemu": "from vmsilo.config.rules import f\n",
    "vmsilo.backends.features": "import json\n",
    "vmsilo.host": "",
    "vmsilo.host.preflight": (
        "import vmsilo.errors\nkind = 'q' if vm.hypervisor == 'qemu' else 'c'\n"
    ),
    "vmsilo.host.doctor": "x = 1 if 'crosvm' in kinds else 2\nif plan.hypervisor:\n    pass\n",
    "vmsilo.guest": "",
    "vmsilo.guest.init": "from vmsilo.errors import VmsiloError\nfrom vmsilo.host import sockets\n",
    "vmsilo.channel": "",
    "vmsilo.channel.a": "__import__('vmsilo.host.preflight')\n",
    "vmsilo.weird": "",
}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            floor_violations,
            [
                "vmsilo.channel.a (level 0) imports vmsilo.host.preflight (level 3)",
                "vmsilo.config.rules (level 1) imports vmsilo.backends.qemu (level 4)",
                "vmsilo.guest.init (level 0) imports vmsilo.host (level 3)",
                "vmsilo.weird: package 'weird' has no level in LEVELS",
            ],
        ),
        (
            cycle_violations,
            [
                "module cycle: vmsilo.backends.qemu <-> vmsilo.config.rules",
                "package cycle: vmsilo.backends <-> vmsilo.config",
            ],
        ),
        (
            branch_violations,
            [
                "vmsilo.host.doctor:1: compares with a hypervisor",
                "vmsilo.host.doctor:2: branches on the hypervisor",
                "vmsilo.host.preflight:2: branches on the hypervisor",
                "vmsilo.host.preflight:2: compares with a hypervisor",
            ],
        ),
    ],
)
def test_the_rules_catch_a_synthetic_violation(rule: object, expected: list[str]) -> None:
    assert callable(rule)
    assert rule(SYNTHETIC) == expected


def test_lazy_and_dunder_imports_count() -> None:
    assert imports_of("vmsilo.config.rules", SYNTHETIC["vmsilo.config.rules"], SYNTHETIC) == {
        "vmsilo.backends.qemu"
    }
    assert imports_of("vmsilo.channel.a", SYNTHETIC["vmsilo.channel.a"], SYNTHETIC) == {
        "vmsilo.host.preflight"
    }
