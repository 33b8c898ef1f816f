"""The kernel command line vmsilo writes and the guest init reads (SPEC §3 "Kernel parameters").

Both directions live here so they cannot drift apart: :func:`encode` (the plan, on the host)
turns :class:`KernelParams` into the parameters in the exact order and spelling of SPEC §3,
and :func:`parse_cmdline` (the guest's PID 1, reading ``/proc/cmdline``) turns a command line
back into :class:`GuestParams`. A property test checks that decoding what was encoded gives
the same values. The decoder also takes the usual kernel/dracut shorthands (``ip=dhcp``,
``ip=<if>:dhcp``, the seven-field ``ip=``), since a user's ``kernelParams`` may use them.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

#: The block id (and so the virtio-blk serial) of the ephemeral overlay disk; stage 1 finds
#: the disk by it.
EPHEMERAL_DISK_ID = "ephemeral"
#: ``vmsilo.rootOverlay=`` values.
ROOT_OVERLAY_RAW = f"raw,{EPHEMERAL_DISK_ID}"
ROOT_OVERLAY_TMPFS = "tmpfs"
#: Guest ids when ``vmsilo.user=`` is missing.
DEFAULT_UID = 1000
DEFAULT_GID = 1000


# --- the values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetInterface:
    """One guest NIC as the command line describes it."""

    name: str
    mac: str
    dhcp: bool = False
    addresses: tuple[str, ...] = ()  # IPv4 CIDRs, in list order
    v6_addresses: tuple[str, ...] = ()  # IPv6 CIDRs, in list order
    routes: tuple[tuple[str, str], ...] = ()  # IPv4 (dest CIDR, via), sorted by dest
    v6_routes: tuple[tuple[str, str], ...] = ()  # IPv6 (dest CIDR, via), sorted by dest


@dataclass(frozen=True)
class Share:
    """One ``vmsilo.share=<tag>,<mountPoint>[,ro]`` parameter."""

    tag: str
    mount_point: str
    read_only: bool = False


@dataclass(frozen=True)
class KernelParams:
    """Everything vmsilo puts on a VM's kernel command line."""

    hostname: str
    uid: int
    gid: int
    interfaces: tuple[NetInterface, ...] = ()
    nameservers: tuple[str, ...] = ()
    auto_shutdown_after: int | None = None
    root_overlay: str = "tmpfs"  # "raw" (the ephemeral disk) or "tmpfs"
    shares: tuple[Share, ...] = ()
    extra: tuple[str, ...] = ()  # the user's kernelParams, verbatim, last


@dataclass(frozen=True)
class IpConfig:
    """One ``ip=`` parameter."""

    iface: str
    address: str | None = None  # CIDR, e.g. "10.0.0.1/31" or "fd00::2/64"
    gateway: str | None = None
    dhcp: bool = False
    hostname: str | None = None


@dataclass(frozen=True)
class Route:
    """One ``rd.route=`` parameter."""

    dest: str  # CIDR
    via: str | None
    iface: str | None

    @property
    def v6(self) -> bool:
        return ":" in self.dest


#: ``vmsilo.sharesLater=1``: a fastStart VM's shares are hot-plugged after its start (SPEC §10)
SHARES_LATER = "vmsilo.sharesLater"


@dataclass(frozen=True)
class GuestParams:
    """What the guest init takes from its command line."""

    hostname: str | None = None
    uid: int = DEFAULT_UID
    gid: int = DEFAULT_GID
    ifnames: tuple[tuple[str, str], ...] = ()  # (name, lower-case MAC)
    ips: tuple[IpConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    nameservers: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    root_overlay: str = ROOT_OVERLAY_TMPFS
    auto_shutdown_after: int | None = None
    console: str = "hvc0"
    #: windows through waypipe over the channel (QEMU with ``gpu.wayland``, SPEC §9.1)
    waypipe: bool = False
    errors: tuple[str, ...] = ()  # parameters that could not be parsed (logged at boot)
    #: the shares' devices come later (hot-plugged by the host, fastStart): the agent mounts
    #: them when the host says so, not the init at boot
    shares_later: bool = False


# --- encoding (host) --------------------------------------------------------------------------


def netmask(prefixlen: int) -> str:
    """The dotted IPv4 netmask of a prefix length (24 → ``255.255.255.0``)."""
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefixlen}").netmask)


def _network(i: NetInterface) -> list[str]:
    if i.dhcp:
        return [f"ip=:::::{i.name}:dhcp"]
    out = []
    for cidr in i.addresses:
        ip, _, prefix = cidr.partition("/")
        out.append(f"ip={ip}:::{netmask(int(prefix))}::{i.name}:none")
    out += [f"ip=[{cidr}]:::::{i.name}:none" for cidr in i.v6_addresses]
    out += [f"rd.route={dest}:{via}:{i.name}" for dest, via in i.routes]
    out += [f"rd.route=[{dest}]:[{via}]:{i.name}" for dest, via in i.v6_routes]
    return out


#: Added by the QEMU backend when the VM shows windows through waypipe (SPEC §9.1): the guest
#: then runs a waypipe server for its user before it says ready. Not part of the plan's
#: parameters (SPEC §3's list), which crosvm shares; a user's ``vmsilo.waypipe=0`` in
#: ``kernelParams`` comes later and wins.
WAYPIPE_PARAM = "vmsilo.waypipe=1"


def nameserver_params(servers: tuple[str, ...]) -> list[str]:
    """``nameserver=`` parameters (also added at launch for a host-NAT VM, see HostFacts)."""
    return [f"nameserver={ns}" for ns in servers]


def encode(p: KernelParams) -> list[str]:
    """The kernel parameters of ``p``, in SPEC §3's order."""
    params = [f"vmsilo.hostname={p.hostname}", f"vmsilo.user={p.uid}:{p.gid}"]
    params += [f"vmsilo.ifname={i.name},{i.mac}" for i in p.interfaces]
    for i in p.interfaces:
        params += _network(i)
    params += nameserver_params(p.nameservers)
    if p.auto_shutdown_after is not None:
        params += ["autoShutdown.enable=1", f"autoShutdown.after={p.auto_shutdown_after}"]
    overlay = ROOT_OVERLAY_RAW if p.root_overlay == "raw" else ROOT_OVERLAY_TMPFS
    params.append(f"vmsilo.rootOverlay={overlay}")
    params += [
        f"vmsilo.share={s.tag},{s.mount_point}" + (",ro" if s.read_only else "") for s in p.shares
    ]
    params += p.extra
    return params


# --- decoding (guest) -------------------------------------------------------------------------


def split_cmdline(text: str) -> list[str]:
    """Split a kernel command line into words (double quotes group, as the kernel does)."""
    words: list[str] = []
    cur: list[str] = []
    quoted = False
    have = False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
            have = True
        elif ch.isspace() and not quoted:
            if have:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(ch)
            have = True
    if have:
        words.append("".join(cur))
    return words


def split_fields(value: str) -> list[str]:
    """Split on ``:`` outside ``[...]``; brackets around a field are removed."""
    fields: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in value:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == ":" and depth == 0:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur))
    return [f[1:-1] if f.startswith("[") and f.endswith("]") else f for f in fields]


def _cidr(addr: str, netmask: str = "") -> str:
    """``addr`` (+ dotted or numeric ``netmask``) as a normalised interface CIDR."""
    if "/" in addr:
        return str(ipaddress.ip_interface(addr))
    ip = ipaddress.ip_address(addr)
    if netmask:
        return str(ipaddress.ip_interface(f"{ip}/{netmask}"))
    return str(ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}"))


def parse_ip(value: str) -> IpConfig:
    """``ip=`` in the kernel/dracut forms vmsilo writes (and the usual shorthands):
    ``<ip>:::<netmask>::<if>:none``, ``[<v6cidr>]:::::<if>:none``, ``:::::<if>:dhcp``,
    ``<client>:<server>:<gw>:<netmask>:<hostname>:<if>:<autoconf>``, ``<if>:dhcp``, ``dhcp``."""
    f = split_fields(value)
    if len(f) == 1:
        if f[0] in ("dhcp", "on", "any"):
            return IpConfig(iface="", dhcp=True)
        raise ValueError(f"unsupported ip={value}")
    if len(f) == 2:
        if f[1] in ("dhcp", "on", "any"):
            return IpConfig(iface=f[0], dhcp=True)
        raise ValueError(f"unsupported ip={value}")
    f += [""] * (7 - len(f))
    client, _server, gw, mask, hostname, iface, autoconf = f[:7]
    if not iface:
        raise ValueError(f"ip={value}: no interface")
    mode = autoconf or "none"
    if mode in ("dhcp", "on", "any"):
        return IpConfig(iface=iface, dhcp=True, hostname=hostname or None)
    if mode not in ("none", "off", "static"):
        raise ValueError(f"ip={value}: unsupported autoconf {mode!r}")
    if not client:
        raise ValueError(f"ip={value}: no address")
    return IpConfig(
        iface=iface,
        address=_cidr(client, mask),
        gateway=str(ipaddress.ip_address(gw)) if gw else None,
        hostname=hostname or None,
    )


def parse_route(value: str) -> Route:
    """``rd.route=<dest>:<via>:<if>`` or ``rd.route=[<dest>]:[<via>]:<if>``."""
    f = split_fields(value)
    if len(f) < 2 or len(f) > 3 or not f[0]:
        raise ValueError(f"unsupported rd.route={value}")
    dest = str(ipaddress.ip_network(f[0], strict=False))
    via = str(ipaddress.ip_address(f[1])) if f[1] else None
    iface = f[2] if len(f) == 3 and f[2] else None
    return Route(dest=dest, via=via, iface=iface)


def parse_share(value: str) -> Share:
    """``vmsilo.share=<tag>,<mountPoint>[,ro|rw]``."""
    parts = value.split(",")
    if len(parts) < 2 or not parts[0] or not parts[1].startswith("/"):
        raise ValueError(f"unsupported vmsilo.share={value}")
    opts = parts[2:]
    if any(o not in ("ro", "rw") for o in opts):
        raise ValueError(f"vmsilo.share={value}: unknown option")
    return Share(tag=parts[0], mount_point=os.path.normpath(parts[1]), read_only="ro" in opts)


def parse_cmdline(text: str) -> GuestParams:
    """Parse the parameters vmsilo passes (SPEC §3 "Kernel parameters")."""
    hostname: str | None = None
    uid, gid = DEFAULT_UID, DEFAULT_GID
    ifnames: list[tuple[str, str]] = []
    ips: list[IpConfig] = []
    routes: list[Route] = []
    nameservers: list[str] = []
    shares: list[Share] = []
    overlay = ROOT_OVERLAY_TMPFS
    auto_enable = False
    auto_after = 300
    console = "hvc0"
    waypipe = False
    shares_later = False
    errors: list[str] = []
    for word in split_cmdline(text):
        key, sep, value = word.partition("=")
        if not sep:
            continue
        try:
            if key == "vmsilo.hostname":
                hostname = value or None
            elif key == "vmsilo.user":
                u, _, g = value.partition(":")
                uid, gid = int(u), int(g or u)
                if uid < 0 or gid < 0:
                    raise ValueError(f"vmsilo.user={value}: negative id")
            elif key == "vmsilo.ifname":
                name, _, mac = value.partition(",")
                if not name or len(mac.split(":")) != 6:
                    raise ValueError(f"unsupported vmsilo.ifname={value}")
                ifnames.append((name, mac.lower()))
            elif key == "ip":
                ips.append(parse_ip(value))
            elif key == "rd.route":
                routes.append(parse_route(value))
            elif key == "nameserver":
                nameservers.append(str(ipaddress.ip_address(value)))
            elif key == "vmsilo.share":
                shares.append(parse_share(value))
            elif key == "vmsilo.rootOverlay":
                overlay = value
            elif key == SHARES_LATER:
                shares_later = value == "1"
            elif key == "autoShutdown.enable":
                auto_enable = value in ("1", "true", "yes")
            elif key == "autoShutdown.after":
                auto_after = int(value)
            elif key == "vmsilo.waypipe":
                waypipe = value in ("1", "true", "yes")
            elif key == "console":
                console = value.split(",")[0]
        except ValueError as e:
            errors.append(str(e) or f"bad parameter {word}")
    return GuestParams(
        hostname=hostname,
        uid=uid,
        gid=gid,
        ifnames=tuple(ifnames),
        ips=tuple(ips),
        routes=tuple(routes),
        nameservers=tuple(nameservers),
        shares=tuple(shares),
        root_overlay=overlay,
        auto_shutdown_after=auto_after if auto_enable else None,
        console=console,
        waypipe=waypipe,
        errors=tuple(errors),
        shares_later=shares_later,
    )
