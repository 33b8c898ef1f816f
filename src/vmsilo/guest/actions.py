"""What the guest init does at boot, as data (stdlib only; pure, unit-tested on the host).

Each function turns the :class:`~vmsilo.contracts.cmdline.GuestParams` of the kernel command
line (and, for users and hosts, the files' current text) into a list of :data:`Action`;
:mod:`vmsilo.guest.boot` applies them. Nothing here touches the system.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmsilo.contracts.cmdline import GuestParams
from vmsilo.contracts.mount import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY

BUSYBOX = "/bin/busybox"
UDHCPC_SCRIPT = "/usr/lib/python3/dist-packages/vmsilo/guest/data/udhcpc-script"
USER_NAME = "user"
USER_HOME = "/home/user"
#: Groups the guest user joins when the image has them.
USER_GROUPS = ("audio", "video", "render", "input", "plugdev", "users")


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
