"""The contracts between host and guest (vmsilo.contracts): each spelled once, and consistent.

* the kernel command line: what the plan encodes, the guest decodes to the same values
  (property test), in SPEC §3's order and spelling (golden);
* the guest file list: complete for the guest-side packages, nothing host-side in it;
* the port names as SPEC §4/§6 spell them; the atomic write; the one ERROR encoder.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsilo.channel.protocol import MAX_ERROR_MESSAGE, PROTOCOL_VERSION, encode_error
from vmsilo.contracts import cmdline, ports
from vmsilo.contracts.cmdline import (
    GuestParams,
    IpConfig,
    KernelParams,
    NetInterface,
    Route,
    Share,
    parse_cmdline,
)
from vmsilo.contracts.fs import atomic_write
from vmsilo.contracts.guest_files import GUEST_DATA, GUEST_FILES, GUEST_MODULES

SRC = Path(__file__).resolve().parent.parent / "src"

# --- the kernel command line ------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,14}", fullmatch=True)
macs = st.lists(st.integers(0, 255), min_size=5, max_size=5).map(
    lambda b: ":".join(["52", *(f"{x:02x}" for x in b)])
)
v4_addrs = st.ip_addresses(v=4).map(str)
v6_addrs = st.ip_addresses(v=6).map(str)
v4_cidrs = st.tuples(st.ip_addresses(v=4), st.integers(1, 32)).map(
    lambda t: str(ipaddress.IPv4Interface((t[0], t[1])))
)
v6_cidrs = st.tuples(st.ip_addresses(v=6), st.integers(1, 128)).map(
    lambda t: str(ipaddress.IPv6Interface((t[0], t[1])))
)
v4_nets = st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(
    lambda t: str(ipaddress.IPv4Network((t[0], t[1]), strict=False))
)
v6_nets = st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(
    lambda t: str(ipaddress.IPv6Network((t[0], t[1]), strict=False))
)
mount_points = st.lists(
    st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,8}", fullmatch=True), min_size=1, max_size=4
).map(lambda parts: "/" + "/".join(parts))
#: The user's own kernelParams: any parameter the guest decoder does not read.
READ_KEYS = {
    "vmsilo.hostname",
    "vmsilo.user",
    "vmsilo.ifname",
    "ip",
    "rd.route",
    "nameserver",
    "vmsilo.share",
    "vmsilo.rootOverlay",
    "autoShutdown.enable",
    "autoShutdown.after",
    "console",
}
extras = st.from_regex(r"[a-z][a-z0-9_.]{0,10}(=[A-Za-z0-9,:/._-]{0,20})?", fullmatch=True).filter(
    lambda w: w.partition("=")[0] not in READ_KEYS
)


@st.composite
def interfaces(draw: st.DrawFn) -> tuple[NetInterface, ...]:
    out = []
    for name in draw(st.lists(names, max_size=4, unique=True)):
        mac = draw(macs)
        out.append(
            NetInterface(
                name=name,
                mac=mac.upper() if draw(st.booleans()) else mac,
                dhcp=draw(st.booleans()),
                addresses=tuple(draw(st.lists(v4_cidrs, max_size=3))),
                v6_addresses=tuple(draw(st.lists(v6_cidrs, max_size=2))),
                routes=tuple(sorted(draw(st.lists(st.tuples(v4_nets, v4_addrs), max_size=3)))),
                v6_routes=tuple(sorted(draw(st.lists(st.tuples(v6_nets, v6_addrs), max_size=2)))),
            )
        )
    return tuple(out)


kernel_params = st.builds(
    KernelParams,
    hostname=names,
    uid=st.integers(0, 2**31 - 1),
    gid=st.integers(0, 2**31 - 1),
    interfaces=interfaces(),
    nameservers=st.lists(st.one_of(v4_addrs, v6_addrs), max_size=3).map(tuple),
    auto_shutdown_after=st.one_of(st.none(), st.integers(0, 10**7)),
    root_overlay=st.sampled_from(["raw", "tmpfs"]),
    shares=st.lists(
        st.builds(
            Share,
            tag=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True),
            mount_point=mount_points,
            read_only=st.booleans(),
        ),
        max_size=4,
    ).map(tuple),
    extra=st.lists(extras, max_size=4).map(tuple),
)


def expected_guest_params(p: KernelParams) -> GuestParams:
    """What the guest must read back from ``encode(p)``."""
    ips: list[IpConfig] = []
    routes: list[Route] = []
    for i in p.interfaces:
        if i.dhcp:  # a dhcp interface has no static addresses or routes (config refuses them)
            ips.append(IpConfig(iface=i.name, dhcp=True))
            continue
        ips += [IpConfig(iface=i.name, address=a) for a in (*i.addresses, *i.v6_addresses)]
        routes += [Route(d, v, i.name) for d, v in (*i.routes, *i.v6_routes)]
    return GuestParams(
        hostname=p.hostname,
        uid=p.uid,
        gid=p.gid,
        ifnames=tuple((i.name, i.mac.lower()) for i in p.interfaces),
        ips=tuple(ips),
        routes=tuple(routes),
        nameservers=p.nameservers,
        shares=p.shares,
        root_overlay="raw,ephemeral" if p.root_overlay == "raw" else "tmpfs",
        auto_shutdown_after=p.auto_shutdown_after,
    )


@settings(max_examples=300, deadline=None)
@given(kernel_params)
def test_cmdline_round_trip(p: KernelParams) -> None:
    """encode → the kernel's command line → decode gives the values that were encoded."""
    words = cmdline.encode(p)
    assert all(w and not any(c.isspace() for c in w) for w in words)
    text = " ".join(["console=hvc0", "panic=-1", *words])  # as the VMM passes it
    assert parse_cmdline(text) == expected_guest_params(p)
    assert words[len(words) - len(p.extra) :] == list(p.extra)


def test_cmdline_golden_spec_order() -> None:
    """SPEC §3's order and spelling, parameter for parameter."""
    p = KernelParams(
        hostname="banking",
        uid=1000,
        gid=100,
        interfaces=(
            NetInterface(name="lan", mac="52:00:00:00:00:02", dhcp=True),
            NetInterface(
                name="upstream",
                mac="52:be:64:bf:cc:65",
                addresses=("10.200.0.1/31",),
                v6_addresses=("fd00::2/64",),
                routes=(("0.0.0.0/0", "10.200.0.0"),),
                v6_routes=(("::/0", "fd00::1"),),
            ),
        ),
        nameservers=("9.9.9.9", "2620:fe::fe"),
        auto_shutdown_after=120,
        root_overlay="raw",
        shares=(Share("docs", "/mnt/docs", True), Share("home", "/home/user")),
        extra=("quiet",),
    )
    assert cmdline.encode(p) == [
        "vmsilo.hostname=banking",
        "vmsilo.user=1000:100",
        "vmsilo.ifname=lan,52:00:00:00:00:02",
        "vmsilo.ifname=upstream,52:be:64:bf:cc:65",
        "ip=:::::lan:dhcp",
        "ip=10.200.0.1:::255.255.255.254::upstream:none",
        "ip=[fd00::2/64]:::::upstream:none",
        "rd.route=0.0.0.0/0:10.200.0.0:upstream",
        "rd.route=[::/0]:[fd00::1]:upstream",
        "nameserver=9.9.9.9",
        "nameserver=2620:fe::fe",
        "autoShutdown.enable=1",
        "autoShutdown.after=120",
        "vmsilo.rootOverlay=raw,ephemeral",
        "vmsilo.share=docs,/mnt/docs,ro",
        "vmsilo.share=home,/home/user",
        "quiet",
    ]
    tmpfs = KernelParams(hostname="a", uid=1, gid=2)
    assert cmdline.encode(tmpfs) == [
        "vmsilo.hostname=a",
        "vmsilo.user=1:2",
        "vmsilo.rootOverlay=tmpfs",
    ]


# --- the guest's files ------------------------------------------------------------------------

#: The packages copied into the guest whole (every module of them is listed).
GUEST_PACKAGES = ("contracts", "channel", "guest")


def test_guest_file_list_is_complete_and_guest_only() -> None:
    listed = set(GUEST_FILES)
    assert len(listed) == len(GUEST_FILES) and set(GUEST_FILES) == {*GUEST_MODULES, *GUEST_DATA}
    for rel in GUEST_FILES:
        assert (SRC / rel).is_file(), rel
    on_disk = {"vmsilo/__init__.py"}
    for pkg in GUEST_PACKAGES:
        on_disk |= {
            p.relative_to(SRC).as_posix()
            for p in (SRC / "vmsilo" / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
    assert listed == on_disk
    assert not any(rel.startswith("vmsilo/image/") for rel in listed)


def _vmsilo_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == "vmsilo"}


def test_contracts_import_nothing_of_vmsilo() -> None:
    """Level 0: the contracts import the standard library only."""
    for path in (SRC / "vmsilo" / "contracts").glob("*.py"):
        assert _vmsilo_imports(path) == set(), path.name


def test_guest_imports_only_guest_side_code() -> None:
    """guest/ imports the contracts, the channel (both copied into the image) and itself."""
    allowed = ("vmsilo.contracts", "vmsilo.channel", "vmsilo.guest")
    for path in (SRC / "vmsilo" / "guest").glob("*.py"):
        for module in _vmsilo_imports(path):
            assert module.startswith(allowed), f"{path.name} imports {module}"


# --- ports ------------------------------------------------------------------------------------


def test_port_names_as_the_spec_spells_them() -> None:
    assert ports.READY_PORT == "org.vmsilo.ready"
    assert ports.CHANNEL_PORT == "org.vmsilo.channel"
    assert ports.CONSOLE_PORT == "org.vmsilo.console"
    assert ports.VSOCK_PORT == 5000


def test_port_names_spelled_once_in_src() -> None:
    """No module but the contract spells a port name (docstrings and comments aside)."""
    for path in (SRC / "vmsilo").rglob("*.py"):
        if path == SRC / "vmsilo" / "contracts" / "ports.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if id(node) in docs:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "org.vmsilo." not in node.value, f"{path.relative_to(SRC)}: {node.value}"


# --- atomic write -----------------------------------------------------------------------------


def test_atomic_write_replaces_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write(target, "new\n", 0o600)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(str(target), b"\x00bytes", 0o644, fsync=True)
    assert target.read_bytes() == b"\x00bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_text("old")

    def fail(_src: object, _dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# --- ERROR frames -----------------------------------------------------------------------------


def test_error_frames_are_truncated_and_carry_a_version() -> None:
    payload = json.loads(encode_error("start", "x" * 100_000))
    assert payload == {
        "code": "start",
        "message": "x" * MAX_ERROR_MESSAGE,
        "version": PROTOCOL_VERSION,
    }
    assert json.loads(encode_error("version", "old", 7))["version"] == 7


def test_error_payloads_built_in_one_place() -> None:
    """Nothing but channel/protocol.py spells an ERROR payload's keys."""
    for path in (SRC / "vmsilo").rglob("*.py"):
        if path == SRC / "vmsilo" / "channel" / "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                assert not {"code", "message"} <= keys, f"{path.relative_to(SRC)}:{node.lineno}"
