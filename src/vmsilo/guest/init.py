"""vmsilo stage-2 init: PID 1 inside the guest's real root (stdlib only; Python 3.11).

Started by the stage-1 initramfs through ``/sbin/vmsilo-init`` after ``switch_root``. The pure
part parses ``/proc/cmdline`` into :class:`GuestParams` and turns it into lists of
:data:`Action` (unit-tested on the host); the thin part applies them, then supervises:

* the agent — ``vmsilo.guest.agent.main(argv)`` called in a forked child (no re-exec: saves a
  Python start); exit status 0 = "power off" (auto-shutdown), anything else = restart;
* an autologin shell as ``user`` on the console (``/dev/hvc0``), started when a line is typed
  there (``vm-shell``: press Enter) and again after it exits. A shell nobody uses costs
  nothing, and one started at boot would compete with the agent's first command for the
  guest's CPU (measured: ~60 ms of a cold ``vm-run`` under emulation). The typed line is
  not consumed: the shell reads it;
* orphans (``waitpid(-1)``), the ACPI power button (``KEY_POWER`` on the "Power Button" input
  device) and SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGPWR, all of which shut the VM down cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import select
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

BUSYBOX = "/bin/busybox"
UDHCPC_SCRIPT = "/usr/lib/python3/dist-packages/vmsilo/guest/data/udhcpc-script"
USER_NAME = "user"
USER_HOME = "/home/user"
DEFAULT_UID = 1000
DEFAULT_GID = 1000
READY_PORT = "org.vmsilo.ready"
CHANNEL_PORT = "org.vmsilo.channel"
VSOCK_PORT = 5000
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Modules stage 2 makes sure of (stage 1 normally loaded them all already).
STAGE2_MODULES = (
    "virtio_console",
    "virtio_net",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
)
#: Groups the guest user joins when the image has them.
USER_GROUPS = ("audio", "video", "render", "input", "plugdev", "users")
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPWR)

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MNT_DETACH = 2
RB_POWER_OFF = 0x4321FEDC
RB_DISABLE_CAD = 0
EV_KEY = 1
KEY_POWER = 116
_INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit Linux


# --- parameters -------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Share:
    """One ``vmsilo.share=<tag>,<mountPoint>[,ro]`` parameter."""

    tag: str
    mount_point: str
    read_only: bool = False


@dataclass(frozen=True)
class GuestParams:
    hostname: str | None = None
    uid: int = DEFAULT_UID
    gid: int = DEFAULT_GID
    ifnames: tuple[tuple[str, str], ...] = ()  # (name, lower-case MAC)
    ips: tuple[IpConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    nameservers: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    root_overlay: str = "tmpfs"
    auto_shutdown_after: int | None = None
    console: str = "hvc0"
    errors: tuple[str, ...] = ()  # parameters that could not be parsed (logged at boot)


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
    client, _server, gw, netmask, hostname, iface, autoconf = f[:7]
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
        address=_cidr(client, netmask),
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
    overlay = "tmpfs"
    auto_enable = False
    auto_after = 300
    console = "hvc0"
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
            elif key == "autoShutdown.enable":
                auto_enable = value in ("1", "true", "yes")
            elif key == "autoShutdown.after":
                auto_after = int(value)
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
        errors=tuple(errors),
    )


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run a command to completion (failure is logged, boot goes on)."""

    argv: tuple[str, ...]


@dataclass(frozen=True)
class Spawn:
    """Start a long-running child (supervised only by being reaped)."""

    argv: tuple[str, ...]


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: str
    mode: int = 0o644


@dataclass(frozen=True)
class RenameLink:
    """Rename the interface with ``mac`` to ``name``."""

    mac: str
    name: str


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    skel: bool = False  # populate from /etc/skel when freshly created


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    flags: int = 0
    data: str = ""


@dataclass(frozen=True)
class SetHostname:
    name: str


Action = Run | Spawn | WriteFile | RenameLink | MakeDir | Mount | SetHostname


def _ip(*args: str) -> Run:
    return Run((BUSYBOX, "ip", *args))


def network_actions(p: GuestParams) -> list[Action]:
    """NIC renames, addresses, links up, routes, DHCP clients and resolv.conf, in order."""
    acts: list[Action] = [_ip("link", "set", "dev", "lo", "up")]
    acts += [RenameLink(mac=mac, name=name) for name, mac in p.ifnames]
    ifaces: list[str] = []

    def touch(iface: str) -> None:
        if iface and iface not in ifaces:
            ifaces.append(iface)

    for name, _mac in p.ifnames:
        touch(name)
    dhcp: list[str] = []
    gateways: list[Action] = []
    for cfg in p.ips:
        iface = cfg.iface or (p.ifnames[0][0] if p.ifnames else "eth0")
        touch(iface)
        if cfg.dhcp:
            if iface not in dhcp:
                dhcp.append(iface)
            continue
        assert cfg.address is not None
        if ":" in cfg.address:
            acts.append(WriteFile(f"/proc/sys/net/ipv6/conf/{iface}/accept_dad", "0\n"))
            acts.append(_ip("-6", "addr", "add", cfg.address, "dev", iface))
        else:
            acts.append(_ip("addr", "add", cfg.address, "dev", iface))
        if cfg.gateway:
            fam = "-6" if ":" in cfg.gateway else "-4"
            default = "::/0" if fam == "-6" else "0.0.0.0/0"
            gateways.append(_ip(fam, "route", "replace", default, "via", cfg.gateway, "dev", iface))
    acts += [_ip("link", "set", "dev", i, "up") for i in ifaces]
    acts += gateways
    for r in p.routes:
        argv = ["-6" if r.v6 else "-4", "route", "replace", r.dest]
        if r.via:
            argv += ["via", r.via]
        if r.iface:
            argv += ["dev", r.iface]
        acts.append(_ip(*argv))
    if p.nameservers:
        resolv = "".join(f"nameserver {n}\n" for n in p.nameservers)
        acts.append(WriteFile("/etc/resolv.conf", resolv))
        acts.append(WriteFile("/run/vmsilo/static-resolv", resolv))
    for iface in dhcp:
        acts.append(
            Spawn(
                (
                    BUSYBOX,
                    "udhcpc",
                    "-f",
                    "-i",
                    iface,
                    "-s",
                    UDHCPC_SCRIPT,
                    "-t",
                    "5",
                    "-T",
                    "1",
                    "-A",
                    "5",
                    "-p",
                    f"/run/udhcpc.{iface}.pid",
                )
            )
        )
    return acts


def hostname_actions(p: GuestParams, hosts: str) -> list[Action]:
    name = p.hostname or next((c.hostname for c in p.ips if c.hostname), None)
    if not name:
        return []
    lines = [ln for ln in hosts.splitlines() if not ln.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{name}")
    return [
        SetHostname(name),
        WriteFile("/etc/hostname", name + "\n"),
        WriteFile("/etc/hosts", "\n".join(lines) + "\n"),
    ]


def _without(lines: str | list[str], name: str) -> list[str]:
    if isinstance(lines, str):
        lines = lines.splitlines()
    return [ln for ln in lines if ln and ln.split(":", 1)[0] != name]


def user_files(p: GuestParams, passwd: str, group: str, shadow: str, shell: str) -> dict[str, str]:
    """New /etc/passwd, /etc/group and /etc/shadow with ``user`` (ids from ``vmsilo.user``) and
    ``root``, both with an empty password (the VM is the isolation boundary; the console logs
    in automatically)."""
    pw = _without(_without(passwd, "root"), USER_NAME)
    pw.insert(0, f"root:x:0:0:root:/root:{shell}")
    pw.append(f"{USER_NAME}:x:{p.uid}:{p.gid}:vmsilo user:{USER_HOME}:{shell}")
    grp_lines = _without(group, USER_NAME)
    out_groups: list[str] = []
    for ln in grp_lines:
        parts = ln.split(":")
        if len(parts) == 4 and parts[0] in USER_GROUPS:
            members = [m for m in parts[3].split(",") if m and m != USER_NAME]
            parts[3] = ",".join([*members, USER_NAME])
            ln = ":".join(parts)
        out_groups.append(ln)
    if not any(ln.split(":")[0] == "root" for ln in out_groups):
        out_groups.insert(0, "root:x:0:")
    out_groups.append(f"{USER_NAME}:x:{p.gid}:")
    sh = _without(_without(shadow, "root"), USER_NAME)
    sh.insert(0, "root::19000:0:99999:7:::")
    sh.append(f"{USER_NAME}::19000:0:99999:7:::")
    return {
        "/etc/passwd": "\n".join(pw) + "\n",
        "/etc/group": "\n".join(out_groups) + "\n",
        "/etc/shadow": "\n".join(sh) + "\n",
    }


def user_actions(p: GuestParams, passwd: str, group: str, shadow: str, shell: str) -> list[Action]:
    files = user_files(p, passwd, group, shadow, shell)
    acts: list[Action] = [
        WriteFile(path, text, 0o640 if path == "/etc/shadow" else 0o644)
        for path, text in files.items()
    ]
    acts.append(MakeDir("/root", 0o700))
    if not any(s.mount_point == USER_HOME for s in p.shares):
        acts.append(MakeDir(USER_HOME, 0o755, p.uid, p.gid, skel=True))
    return acts


def share_actions(p: GuestParams) -> list[Action]:
    """Mount points and virtiofs mounts, parents before children."""
    acts: list[Action] = []
    for s in sorted(p.shares, key=lambda s: s.mount_point.rstrip("/").count("/")):
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if s.read_only else 0)
        if s.mount_point == USER_HOME:
            acts.append(MakeDir(USER_HOME, 0o755, p.uid, p.gid))
        else:
            acts.append(MakeDir(s.mount_point))
        acts.append(Mount(s.tag, s.mount_point, "virtiofs", flags))
    return acts


def base_mounts() -> list[Mount]:
    """The API filesystems (each skipped at apply time when already mounted)."""
    return [
        Mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        Mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
        Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
        Mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        Mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        Mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ]


def agent_argv(p: GuestParams) -> list[str]:
    """The argv for ``vmsilo.guest.agent.main``."""
    argv = [
        "--ready-port",
        READY_PORT,
        "--channel-port",
        CHANNEL_PORT,
        "--vsock-port",
        str(VSOCK_PORT),
        "--user",
        f"{p.uid}:{p.gid}",
    ]
    if p.auto_shutdown_after is not None:
        argv += ["--auto-shutdown-after", str(p.auto_shutdown_after)]
    return argv


def restart_delay(failures: int) -> float:
    """Back-off before restarting a crashed child: 0.5, 1, 2, … capped at 30 s."""
    return float(min(30.0, 0.5 * 2 ** max(0, failures - 1)))


# --- applying ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_T0 = time.monotonic()


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _T0


def log(msg: str) -> None:
    line = f"vmsilo-init: [{_uptime():8.2f}] {msg}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode(errors="replace"))


def sys_mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    rc = _libc.mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() if data else None
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} {source} on {target}: {os.strerror(e)}")


def sys_umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


def mounted_targets() -> set[str]:
    try:
        with open("/proc/self/mounts") as f:
            return {line.split()[1] for line in f if len(line.split()) > 2}
    except OSError:
        return set()


def run_argv(argv: Sequence[str], timeout: float = 30.0) -> int:
    """Run a command (stdio on the console); returns its exit status (-signal if killed)."""
    pid = os.posix_spawn(
        argv[0],
        list(argv),
        dict(os.environ),
        setsigdef=(signal.SIGPIPE, *SHUTDOWN_SIGNALS, signal.SIGCHLD),
        setsigmask=(),
    )
    # wait on a pidfd: the kernel wakes us when the child exits, bounded by the timeout
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def spawn_argv(argv: Sequence[str]) -> int:
    return os.posix_spawn(
        argv[0],
        list(argv),
        dict(os.environ),
        setsigdef=(signal.SIGPIPE, *SHUTDOWN_SIGNALS, signal.SIGCHLD),
        setsigmask=(),
        setsid=True,
    )


def write_file(path: str, content: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically (in /proc/sys: a plain write)."""
    if path.startswith("/proc/"):
        with open(path, "w") as f:
            f.write(content)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.vmsilo-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, content.encode())
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _mac_map() -> dict[str, str]:
    out: dict[str, str] = {}
    base = Path("/sys/class/net")
    for d in base.iterdir() if base.is_dir() else ():
        try:
            out[(d / "address").read_text().strip().lower()] = d.name
        except OSError:
            continue
    return out


def rename_links(renames: list[RenameLink], timeout: float = 5.0) -> None:
    """Rename NICs by MAC, collision-safe (through temporary names when needed)."""
    deadline = time.monotonic() + timeout
    while True:
        macs = _mac_map()
        missing = [r for r in renames if r.mac not in macs]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # sleep-ok: no udev in the guest; NICs appear during probe (bounded)
    for r in missing:
        log(f"no network interface with MAC {r.mac} (for {r.name})")
    todo = [r for r in renames if r.mac in macs and macs[r.mac] != r.name]
    targets = {r.name for r in todo}
    for i, r in enumerate(todo):
        if macs[r.mac] in targets:  # its current name is someone else's target
            tmp = f"vmsilotmp{i}"
            if run_argv([BUSYBOX, "ip", "link", "set", "dev", macs[r.mac], "name", tmp]) == 0:
                macs[r.mac] = tmp
    for r in todo:
        rc = run_argv([BUSYBOX, "ip", "link", "set", "dev", macs[r.mac], "name", r.name])
        if rc != 0:
            log(f"renaming {macs[r.mac]} ({r.mac}) to {r.name} failed")
        else:
            log(f"network interface {r.mac} is {r.name}")


def make_dir(a: MakeDir) -> None:
    fresh = not os.path.isdir(a.path)
    os.makedirs(a.path, mode=a.mode, exist_ok=True)
    if fresh or a.uid or a.gid:
        os.chown(a.path, a.uid, a.gid)
        os.chmod(a.path, a.mode)
    if fresh and a.skel and os.path.isdir("/etc/skel"):
        for name in os.listdir("/etc/skel"):
            src, dst = os.path.join("/etc/skel", name), os.path.join(a.path, name)
            if os.path.isfile(src) and not os.path.exists(dst):
                with open(src, "rb") as fi, open(dst, "wb") as fo:
                    fo.write(fi.read())
                os.chown(dst, a.uid, a.gid)


def apply(actions: Sequence[Action], spawned: Callable[[int, str], None]) -> None:
    """Apply actions in order; a failure is logged and the next action runs."""
    renames = [a for a in actions if isinstance(a, RenameLink)]
    if renames:
        rename_links(renames)
    for a in actions:
        try:
            if isinstance(a, RenameLink):
                continue
            if isinstance(a, Run):
                rc = run_argv(a.argv)
                if rc != 0:
                    log(f"{' '.join(a.argv[1:] if a.argv[0] == BUSYBOX else a.argv)}: status {rc}")
            elif isinstance(a, Spawn):
                pid = spawn_argv(a.argv)
                spawned(pid, " ".join(a.argv[1:3]))
            elif isinstance(a, WriteFile):
                write_file(a.path, a.content, a.mode)
            elif isinstance(a, MakeDir):
                make_dir(a)
            elif isinstance(a, Mount):
                if a.target in mounted_targets():
                    continue
                os.makedirs(a.target, exist_ok=True)
                sys_mount(a.source, a.target, a.fstype, a.flags, a.data)
                if a.fstype == "virtiofs":
                    log(f"share {a.source} mounted on {a.target}")
            elif isinstance(a, SetHostname):
                socket.sethostname(a.name)
        except OSError as e:
            log(f"{type(a).__name__} {a}: {e}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def load_modules(names: Sequence[str]) -> None:
    missing = [m for m in names if not os.path.isdir(f"/sys/module/{m}")]
    if missing and run_argv([BUSYBOX, "modprobe", "-a", *missing]) != 0:
        log(f"modprobe {' '.join(missing)} failed")


def setup_dev_links() -> None:
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        path = f"/dev/{name}"
        if not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.symlink(target, path)


# --- supervision ------------------------------------------------------------------------------


@dataclass
class Child:
    role: str
    started: float
    failures: int = 0


@dataclass
class Init:
    params: GuestParams
    shell: str = "/bin/sh"
    children: dict[int, Child] = field(default_factory=dict)
    timers: dict[str, float] = field(default_factory=dict)  # role -> monotonic due time
    failures: dict[str, int] = field(default_factory=dict)
    agent_main: Callable[[list[str]], object] | None = None
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    wakeup_r: int = -1
    wakeup_w: int = -1
    buttons: dict[int, str] = field(default_factory=dict)
    shutting_down: bool = False
    #: the console, watched for a typed line while no shell runs there (-1: not watched)
    console_watch: int = -1

    # -- setup --
    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for sig in (*SHUTDOWN_SIGNALS, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, lambda _s, _f: None)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")
        _libc.reboot(RB_DISABLE_CAD)  # Ctrl-Alt-Del → SIGINT to us

    def find_power_buttons(self) -> None:
        base = Path("/sys/class/input")
        for ev in sorted(base.glob("event*")) if base.is_dir() else []:
            try:
                name = (ev / "device" / "name").read_text().strip()
            except OSError:
                continue
            dev = f"/dev/input/{ev.name}"
            if name != "Power Button" or dev in self.buttons.values():
                continue
            try:
                fd = os.open(dev, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                log(f"cannot open {dev}: {e}")
                continue
            self.buttons[fd] = dev
            self.selector.register(fd, selectors.EVENT_READ, "button")
        if self.buttons:
            log(f"power button: {', '.join(sorted(self.buttons.values()))}")

    # -- children --
    def _in_child(self) -> None:
        """Undo PID-1 state in a freshly forked child."""
        signal.set_wakeup_fd(-1)
        for sig in (*SHUTDOWN_SIGNALS, signal.SIGCHLD, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self.wakeup_r, self.wakeup_w, self.console_watch, *self.buttons):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            self.selector.close()

    def start_agent(self) -> None:
        if self.agent_main is None:
            return
        argv = agent_argv(self.params)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._in_child()
                signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's default
                os.setsid()
                rc = self.agent_main(argv)
                code = rc if isinstance(rc, int) else 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.children[pid] = Child("agent", time.monotonic())
        log(f"agent started (pid {pid}): {' '.join(argv)}")

    def console_path(self) -> str:
        dev = f"/dev/{self.params.console}"
        return dev if os.path.exists(dev) else "/dev/console"

    def start_getty(self) -> None:
        tty = self.console_path()
        home = USER_HOME
        pid = os.fork()
        if pid == 0:
            try:
                self._in_child()
                os.setsid()
                fd = os.open(tty, os.O_RDWR)
                import fcntl
                import termios

                fcntl.ioctl(fd, termios.TIOCSCTTY, 1)
                for i in (0, 1, 2):
                    os.dup2(fd, i)
                if fd > 2:
                    os.close(fd)
                os.initgroups(USER_NAME, self.params.gid)
                os.setgid(self.params.gid)
                os.setuid(self.params.uid)
                try:
                    os.chdir(home)
                except OSError:
                    os.chdir("/")
                env = {
                    "HOME": home,
                    "USER": USER_NAME,
                    "LOGNAME": USER_NAME,
                    "SHELL": self.shell,
                    "PATH": "/usr/local/bin:/usr/bin:/bin",
                    "TERM": os.environ.get("TERM", "linux"),
                    "LANG": "C.UTF-8",
                }
                os.execve(self.shell, ["-" + os.path.basename(self.shell)], env)
            except BaseException:
                traceback.print_exc()
            os._exit(127)
        self.children[pid] = Child("getty", time.monotonic())

    def watch_console(self) -> None:
        """Start the console shell once a line is typed on the console (read by the shell)."""
        if self.console_watch >= 0:
            return
        tty = self.console_path()
        try:
            fd = os.open(tty, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            log(f"cannot watch {tty} ({e}); starting the console shell now")
            self.start("getty")
            return
        self.console_watch = fd
        self.selector.register(fd, selectors.EVENT_READ, "console")
        log(f"console: press Enter for a shell on {tty}")

    def console_typed(self) -> None:
        self.selector.unregister(self.console_watch)
        os.close(self.console_watch)
        self.console_watch = -1
        self.start("getty")

    def start(self, role: str) -> None:
        try:
            if role == "agent":
                self.start_agent()
            elif role == "console":
                self.watch_console()
            elif role == "getty":
                self.start_getty()
        except OSError as e:
            log(f"cannot start {role}: {e}")
            self.schedule(role)

    def schedule(self, role: str) -> None:
        n = self.failures.get(role, 0) + 1
        self.failures[role] = n
        self.timers[role] = time.monotonic() + restart_delay(n)

    def child_exited(self, pid: int, status: int) -> None:
        child = self.children.pop(pid, None)
        if child is None or self.shutting_down:
            return
        code = os.waitstatus_to_exitcode(status)
        ran = time.monotonic() - child.started
        if ran > 60:
            self.failures[child.role] = 0
        if child.role == "agent":
            if code == 0:
                log("agent asked for power off")
                self.shutdown("auto-shutdown")
                return
            log(f"agent exited ({_describe(code)}); restarting")
            self.schedule("agent")
        elif child.role == "getty":
            if ran < 2:  # a shell that dies at once: back off instead of spinning on input
                self.schedule("console")
            else:
                self.failures["console"] = 0
                self.watch_console()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.child_exited(pid, status)

    def drain_signals(self) -> list[int]:
        sigs: list[int] = []
        while True:
            try:
                data = os.read(self.wakeup_r, 512)
            except BlockingIOError:
                return sigs
            if not data:
                return sigs
            sigs.extend(data)

    def read_button(self, fd: int) -> bool:
        try:
            data = os.read(fd, _INPUT_EVENT.size * 32)
        except OSError:
            return False
        for off in range(0, len(data) - _INPUT_EVENT.size + 1, _INPUT_EVENT.size):
            _s, _u, etype, code, value = _INPUT_EVENT.unpack_from(data, off)
            if etype == EV_KEY and code == KEY_POWER and value == 1:
                return True
        return False

    def loop(self) -> NoReturn:
        rescan_until = time.monotonic() + 10.0
        next_rescan = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            due = [*self.timers.values()]
            if not self.buttons and now < rescan_until:
                due.append(next_rescan)
            timeout = max(0.0, min(due) - now) if due else None
            for key, _ev in self.selector.select(timeout):
                if key.data == "signal":
                    for sig in self.drain_signals():
                        if sig in SHUTDOWN_SIGNALS:
                            self.shutdown(f"signal {signal.Signals(sig).name}")
                elif key.data == "button" and self.read_button(int(key.fd)):
                    self.shutdown("power button")
                elif key.data == "console":
                    self.console_typed()
            self.reap()
            now = time.monotonic()
            for role, when in list(self.timers.items()):
                if when <= now:
                    del self.timers[role]
                    self.start(role)
            if not self.buttons and now >= next_rescan and now < rescan_until:
                self.find_power_buttons()
                next_rescan = now + 1.0

    def _wait_children(self, timeout: float) -> bool:
        """Reap until no child is left (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                while True:
                    pid, _status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    self.children.pop(pid, None)
            except ChildProcessError:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.selector.select(min(left, 0.1))
                self.drain_signals()
            except (OSError, ValueError):
                time.sleep(0.05)  # sleep-ok: only if the selector itself failed (bounded)

    def shutdown(self, reason: str) -> NoReturn:
        self.shutting_down = True
        log(f"shutting down ({reason})")
        try:
            os.kill(-1, signal.SIGTERM)
            os.kill(-1, signal.SIGHUP)  # interactive shells ignore SIGTERM
            os.kill(-1, signal.SIGCONT)
        except OSError:
            pass
        if not self._wait_children(3.0):
            log("killing the remaining processes")
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
            self._wait_children(2.0)
        os.sync()
        for target in sorted(
            (t for t in mounted_targets() if t.startswith(("/home", "/mnt", "/media"))),
            reverse=True,
        ):
            with contextlib.suppress(OSError):
                sys_umount(target, MNT_DETACH)
        os.sync()
        log("power off")
        _libc.reboot(RB_POWER_OFF)
        log(f"reboot(RB_POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")
        os._exit(1)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _import_agent() -> Callable[[list[str]], object] | None:
    try:
        from vmsilo.guest import agent
    except Exception as e:  # the agent is optional for booting
        log(f"agent unavailable ({type(e).__name__}: {e}); running without it")
        return None
    main = getattr(agent, "main", None)
    if not callable(main):
        log("vmsilo.guest.agent has no main(); running without it")
        return None
    return main  # type: ignore[no-any-return]


def boot(params: GuestParams, init: Init) -> None:
    """Everything between switch_root and the supervision loop."""
    os.environ["PATH"] = PATH
    os.environ.setdefault("TERM", "linux")
    os.umask(0o022)
    apply(base_mounts(), lambda _p, _r: None)
    setup_dev_links()
    log("start")
    for err in params.errors:
        log(f"kernel parameter ignored: {err}")
    load_modules(STAGE2_MODULES)
    init.find_power_buttons()
    init.shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    os.makedirs("/run/vmsilo", exist_ok=True)

    def spawned(pid: int, what: str) -> None:
        init.children[pid] = Child(f"daemon {what}", time.monotonic())

    acts: list[Action] = []
    acts += hostname_actions(params, _read("/etc/hosts"))
    acts += user_actions(
        params, _read("/etc/passwd"), _read("/etc/group"), _read("/etc/shadow"), init.shell
    )
    acts += network_actions(params)
    acts += share_actions(params)
    apply(acts, spawned)
    log(f"hostname {socket.gethostname()}, user {USER_NAME} {params.uid}:{params.gid}")


def main(argv: Sequence[str] | None = None) -> int:
    if os.getpid() != 1 and "--force" not in (argv if argv is not None else sys.argv[1:]):
        print("vmsilo-init: must run as PID 1 (the guest's init)", file=sys.stderr)
        return 2
    params = parse_cmdline(_read("/proc/cmdline"))
    init = Init(params)
    try:
        init.install_signals()
        boot(params, init)
        init.agent_main = _import_agent()
        init.start("agent")
        init.watch_console()
        log("ready: console on " + init.console_path())
        init.loop()
    except BaseException:
        log("fatal error in init:\n" + traceback.format_exc())
        init.shutdown("init failed")


if __name__ == "__main__":
    sys.exit(main())
