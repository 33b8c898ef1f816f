"""Which virtiofsd this host has, and the exact argv to run it for one share.

Two daemons exist in the wild with different option syntaxes:

* the **Rust** virtiofsd (``virtiofsd`` in PATH or ``/usr/libexec/virtiofsd``; production
  hosts): ``--fd=N --shared-dir=DIR --sandbox=namespace --cache=auto [--readonly]``;
* QEMU's old **C** virtiofsd (``/usr/lib/qemu/virtiofsd``, shipped by qemu-system-common up
  to QEMU 7.2 — the only one on Debian 12): ``--fd=N -o source=DIR -o sandbox=namespace
  -o cache=auto``.

The flavor is recognised from the daemon's own ``--help`` rather than from its path, so a
distribution that installs either one anywhere still gets the right syntax.

Read-only shares: the C daemon has no read-only option (``-o ro`` is rejected as unknown), and
Rust versions before 1.11 lack ``--readonly``. There the daemon is started through
:func:`ro_exec` (``python -m vmsilo.host.virtiofsd ro-exec DIR -- ARGV``), which enters a
private mount namespace, makes ``DIR`` (and every mount below it) a read-only bind mount and
execs the daemon, so the host kernel refuses every write whatever the guest sends. The
namespace dies with the daemon: nothing is left mounted on the host, even after a SIGKILL.

Guest root is not host root in a share (SPEC §11.4). Both daemons switch to the requesting
guest's ids for each operation; run as root with ids passed through, guest root would create
setuid-root files and device nodes on the host. So:

* the C daemon (no id translation) is started through :func:`jail_exec` (``python -m
  vmsilo.host.virtiofsd jail --as UID:GID [--ro] DIR -- ARGV``): it runs as the config's
  ``user`` in a user namespace that maps that account alone (:mod:`vmsilo.host.userns`), with
  ``-o sandbox=chroot`` — the namespace sandbox would mount a fresh /proc, which the kernel
  refuses in a user namespace once systemd's hardening has masked parts of /proc;
* the Rust daemon translates ids itself (``--translate-uid``/``--translate-gid``, 1.13 and
  later): every guest id becomes the user's; an older Rust daemon is refused with a hint.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

from vmsilo.contracts.mount import (
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    check,
    libc,
    sys_mount,
)
from vmsilo.errors import VmsiloError
from vmsilo.host import userns
from vmsilo.plan.model import SharePlan

Flavor = Literal["rust", "c"]

#: Where a virtiofsd may live when it is not in PATH, in order of preference.
FALLBACK_PATHS: tuple[str, ...] = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")

#: Both flavors log this (at the default info level) right before blocking in accept(): the
#: daemon has parsed its options, checked the shared dir and is serving the socket.
READY_MARK = b"Waiting for vhost-user socket connection"

INSTALL_HINT = (
    "install virtiofsd (Debian 13 / Ubuntu: apt-get install virtiofsd; Debian 12: apt-get install"
    " qemu-system-common, which ships /usr/lib/qemu/virtiofsd), or set sharedHome = false and"
    " remove sharedDirectories"
)


@dataclass(frozen=True, slots=True)
class VirtiofsdBinary:
    path: str
    flavor: Flavor
    has_readonly: bool  # the daemon itself can refuse guest writes (Rust ≥ 1.11)
    has_translate: bool = False  # the daemon maps guest ids itself (Rust ≥ 1.13)


def find_virtiofsd(
    search_path: str | None = None, fallbacks: tuple[str, ...] = FALLBACK_PATHS
) -> str:
    """The virtiofsd to run: ``virtiofsd`` in PATH, else the first executable fallback."""
    found = shutil.which("virtiofsd", path=search_path)
    if found is not None:
        return found
    for candidate in fallbacks:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise VmsiloError(
        "virtiofsd not found (needed for the VM's shares; looked in PATH and "
        + ", ".join(fallbacks)
        + ")",
        INSTALL_HINT,
    )


def flavor_from_help(text: str) -> tuple[Flavor, bool] | None:
    """(flavor, has --readonly) from a daemon's ``--help`` output; None if unrecognised."""
    if "--shared-dir" in text:
        return "rust", "--readonly" in text
    if "source=PATH" in text or "-o source=" in text:
        return "c", False
    return None


def translates_ids(text: str) -> bool:
    """Whether a daemon's ``--help`` offers guest/host id translation (Rust ≥ 1.13)."""
    return "--translate-uid" in text and "--translate-gid" in text


def detect(path: str) -> VirtiofsdBinary:
    """Ask the daemon at ``path`` for its ``--help`` and classify it."""
    try:
        proc = subprocess.run(
            [path, "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VmsiloError(f"{path} --help failed: {e}", INSTALL_HINT) from e
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    found = flavor_from_help(text)
    if found is None:
        raise VmsiloError(
            f"{path} does not look like virtiofsd (its --help mentions neither --shared-dir"
            " nor -o source=)",
            INSTALL_HINT,
        )
    return VirtiofsdBinary(path, found[0], found[1], translates_ids(text))


def locate(search_path: str | None = None) -> VirtiofsdBinary:
    return detect(find_virtiofsd(search_path))


#: Every id a guest can send (the Rust daemon's squash ranges are first id and count).
_ALL_IDS = 4294967295

Owner = tuple[int, int]


def daemon_argv(
    binary: VirtiofsdBinary, share: SharePlan, fd: int, owner: Owner | None = None
) -> list[str]:
    """The daemon's own argv for ``share`` served on the listening socket ``fd``.

    Cache ``auto`` (the host may change a share behind the guest's back) is both flavors'
    default, spelled out so a changed default cannot silently change behaviour. The Rust daemon
    runs as root in its namespace sandbox and, given ``owner`` (the config's user), squashes
    every guest uid/gid onto it. The C daemon runs as ``owner`` in :func:`jail_exec`'s user
    namespace and chroots into the share (see the module docstring for why not its namespace
    sandbox); its ids pass through, so the guest user's files are the host user's.
    """
    if binary.flavor == "rust":
        argv = [
            binary.path,
            f"--fd={fd}",
            f"--shared-dir={share.host_path}",
            "--sandbox=namespace",
            "--cache=auto",
            "--announce-submounts",
            "--log-level=info",
        ]
        if owner is not None:
            uid, gid = owner
            argv += [
                f"--translate-uid=squash-guest:0:{uid}:{_ALL_IDS}",
                f"--translate-gid=squash-guest:0:{gid}:{_ALL_IDS}",
            ]
        if share.read_only and binary.has_readonly:
            argv.append("--readonly")
        return argv
    return [
        binary.path,
        f"--fd={fd}",
        "-o",
        f"source={share.host_path}",
        "-o",
        "sandbox=chroot",
        "-o",
        "cache=auto",
        "-o",
        "announce_submounts",
        "-o",
        "log_level=info",
    ]


def needs_ro_wrapper(binary: VirtiofsdBinary, share: SharePlan) -> bool:
    return share.read_only and not binary.has_readonly


def launch_argv(
    binary: VirtiofsdBinary,
    share: SharePlan,
    fd: int,
    owner: Owner,
    python: str = sys.executable,
) -> list[str]:
    """What the supervisor executes: the daemon, behind :func:`jail_exec` when it must be.

    ``owner``: the config's user, whom guest root (every guest id) becomes in the share."""
    if binary.flavor == "rust" and not binary.has_translate:
        raise VmsiloError(
            f"{binary.path} cannot map guest ids (no --translate-uid): guest root would be"
            f" host root in share {share.tag}",
            "install virtiofsd 1.13 or later, or QEMU's /usr/lib/qemu/virtiofsd",
        )
    argv = daemon_argv(binary, share, fd, owner)
    if binary.flavor == "c":
        ro = ["--ro"] if share.read_only else []
        uid, gid = owner
        return [
            python,
            "-m",
            "vmsilo.host.virtiofsd",
            "jail",
            "--as",
            f"{uid}:{gid}",
            *ro,
            share.host_path,
            "--",
            *argv,
        ]
    if needs_ro_wrapper(binary, share):
        return [python, "-m", "vmsilo.host.virtiofsd", "ro-exec", share.host_path, "--", *argv]
    return argv


# --- ro-exec: a read-only view of the share in a private mount namespace ------------------------

_CLONE_NEWNS = 0x00020000
_PR_SET_PDEATHSIG = 1
#: statvfs f_flag bits → the mount flags a bind remount must repeat (or the kernel drops them).
_KEEP_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\NNN``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root: str, mountinfo: str) -> list[str]:
    """Mount points at or below ``root`` listed in a mountinfo text, parents first."""
    root = root.rstrip("/") or "/"
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape_mountinfo(fields[4])
        if point == root or point.startswith(root.rstrip("/") + "/"):
            found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"))


def make_readonly_view(source: str) -> None:
    """In a new private mount namespace, turn ``source`` and its submounts read-only."""
    check(libc().unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # nothing done below may propagate back to the host's namespace
    sys_mount(None, "/", flags=MS_REC | MS_PRIVATE)
    source = os.path.realpath(source)
    sys_mount(source, source, flags=MS_BIND | MS_REC)
    with open("/proc/self/mountinfo") as f:
        points = mounts_under(source, f.read())
    for point in points:
        keep = 0
        try:
            st_flags = os.statvfs(point).f_flag
        except OSError:
            continue  # an unreachable submount (e.g. a dead FUSE mount): nothing to write to
        for st_bit, ms_bit in _KEEP_FLAGS:
            if st_flags & st_bit:
                keep |= ms_bit
        sys_mount(None, point, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def ro_exec(argv: list[str]) -> int:
    """``ro-exec DIR -- CMD…``: exec CMD with DIR read-only in a private mount namespace."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m vmsilo.host.virtiofsd ro-exec DIR -- CMD [ARG…]", file=sys.stderr)
        return 2
    source, cmd = argv[0], argv[2:]
    try:
        # die with the supervisor, like the VMM does; survives the exec below
        libc().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        make_readonly_view(source)
    except OSError as e:
        print(f"vmsilo ro-exec: cannot make {source} read-only: {e}", file=sys.stderr)
        return 1
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        print(f"vmsilo ro-exec: cannot run {cmd[0]}: {e}", file=sys.stderr)
        return 127


#: File descriptors the C daemon may keep open (one O_PATH fd per inode the guest looks up);
#: raised here while still root, since the daemon itself may no longer raise its hard limit.
_NOFILE = 1_000_000

JAIL_USAGE = "usage: python -m vmsilo.host.virtiofsd jail --as UID:GID [--ro] DIR -- CMD [ARG…]"


def _raise_nofile() -> None:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            limit = min(_NOFILE, int(f.read()))
    except (OSError, ValueError):
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def jail_exec(argv: list[str]) -> int:
    """``jail --as UID:GID [--ro] DIR -- CMD…``: exec CMD as UID:GID in a user namespace that
    maps only that account (:func:`vmsilo.host.userns.enter`), DIR read-only if ``--ro``."""
    try:
        sep = argv.index("--")
    except ValueError:
        sep = -1
    opts, cmd = (argv[:sep], argv[sep + 1 :]) if sep >= 0 else (argv, [])
    read_only = "--ro" in opts
    opts = [o for o in opts if o != "--ro"]
    if len(opts) != 3 or opts[0] != "--as" or not cmd:
        print(JAIL_USAGE, file=sys.stderr)
        return 2
    try:
        uid, gid = (int(x) for x in opts[1].split(":", 1))
    except ValueError:
        print(JAIL_USAGE, file=sys.stderr)
        return 2
    source = opts[2]
    try:
        if read_only:
            make_readonly_view(source)
        _raise_nofile()
        userns.enter(uid, gid)
        # set last: a change of credentials clears it; survives the exec below
        libc().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError as e:
        print(f"vmsilo jail: cannot run {cmd[0]} as {uid}:{gid}: {e}", file=sys.stderr)
        return 1
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        print(f"vmsilo jail: cannot run {cmd[0]}: {e}", file=sys.stderr)
        return 127


def main(argv: list[str]) -> int:
    if argv[:1] == ["ro-exec"]:
        return ro_exec(argv[1:])
    if argv[:1] == ["jail"]:
        return jail_exec(argv[1:])
    print("usage: python -m vmsilo.host.virtiofsd ro-exec DIR -- CMD [ARG…]", file=sys.stderr)
    print(JAIL_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
