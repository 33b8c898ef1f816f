"""Become one host account inside a fresh user namespace that maps that account alone.

Why (SPEC §11.4): a file server such as virtiofsd switches to the guest's uid for every request
and needs capabilities to do so. Run as host root, guest root becomes host root in the shared
directory: it can leave setuid-root programs and device nodes there. QEMU 7.2's C virtiofsd
cannot translate ids, so the kernel has to: :func:`enter` moves the (root, single-threaded)
calling process into a new user namespace whose only uid and gid are the account's own,
``uid → uid`` and ``gid → gid``, becomes that account and keeps a file server's capabilities as
*ambient* capabilities, so they survive the ``execve`` of the daemon.

What that buys, all enforced by the host kernel whatever the daemon is made to do:

* capabilities in a user namespace act only on inodes whose owner and group are mapped in it,
  i.e. on the account's own files; everything else is reached with the account's own rights;
* uid 0 is not mapped: a request as guest root cannot switch to it (``EINVAL``), and nothing can
  be chowned to root — the worst guest root can leave is a setuid-*user* file, which the user
  could make anyway;
* device nodes need ``CAP_MKNOD`` in the initial namespace: ``mknod`` of a device fails;
* the daemon runs as the account, so it is the account's (who owns the VM anyway) and nobody
  else's to signal or trace.

Mappings that name other ids than the writer's own may only be written by a process with
``CAP_SETUID``/``CAP_SETGID`` over the *parent* namespace, which the process inside no longer
has: a forked helper that stayed outside writes them, then exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

from vmsilo.contracts.mount import check, libc

CLONE_NEWUSER = 0x10000000
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: A file server's capabilities (capabilities(7) numbers), only ever effective inside the new
#: namespace: ownership and permission overrides over the account's files, switching to the
#: account's ids, chroot into the share, and the capabilities the daemons keep in their own
#: allow-lists (``mknod``, ``setfcap``, ``setpcap`` to trim the bounding set), which they refuse
#: to start without even though nothing can come of them here.
FILE_SERVER_CAPS: tuple[int, ...] = (
    0,  # CAP_CHOWN
    1,  # CAP_DAC_OVERRIDE
    2,  # CAP_DAC_READ_SEARCH
    3,  # CAP_FOWNER
    4,  # CAP_FSETID
    6,  # CAP_SETGID
    7,  # CAP_SETUID
    8,  # CAP_SETPCAP
    18,  # CAP_SYS_CHROOT
    27,  # CAP_MKNOD
    31,  # CAP_SETFCAP
)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def id_map(first: int) -> str:
    """A ``uid_map``/``gid_map`` text mapping the single id ``first`` onto itself."""
    return f"{first} {first} 1\n"


def _write_maps(pid: int, uid: int, gid: int) -> None:
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(id_map(uid))
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(id_map(gid))


def _mapper(target: int, uid: int, gid: int, go: int, done: int) -> None:
    """The forked helper (still in the parent namespace): map ``target`` once it unshared."""
    code = 1
    try:
        if os.read(go, 1) == b"1":
            _write_maps(target, uid, gid)
            code = 0
    except OSError as e:
        print(f"vmsilo userns: cannot write the id maps of {target}: {e}", file=sys.stderr)
    finally:
        os.write(done, bytes([code]))
        os._exit(code)


def _keep_ambient(caps: tuple[int, ...]) -> None:
    """Raise ``caps`` into the inheritable and then the ambient set (so they survive exec)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc().capget(ctypes.byref(header), data), "capget")
    for cap in caps:
        data[cap // 32].inheritable |= 1 << (cap % 32)
    check(libc().capset(ctypes.byref(header), data), "capset")
    for cap in caps:
        check(libc().prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"ambient {cap}")


def enter(uid: int, gid: int, caps: tuple[int, ...] = FILE_SERVER_CAPS) -> None:
    """Move this process into a new user namespace mapping only ``uid``/``gid``; become them.

    The caller must be root in the initial namespace and single-threaded (``unshare`` of a user
    namespace refuses threaded processes). Raises :class:`OSError` on any failure."""
    if uid == 0 or gid == 0:
        raise OSError(f"refusing to map root ({uid}:{gid}) into the namespace")
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(done_r)
        _mapper(me, uid, gid, go_r, done_w)
    os.close(go_r)
    os.close(done_w)
    try:
        try:
            check(libc().unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        except OSError:
            os.write(go_w, b"0")
            raise
        os.write(go_w, b"1")
        status = os.read(done_r, 1)
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(helper, 0)
    if status != b"\0":
        raise OSError("the user namespace's id maps were not written")
    _keep_ambient(caps)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    # uid 0 is not mapped here, so this uid change does not clear the capabilities (and
    # the ambient ones stay raised for the exec)
    os.setresuid(uid, uid, uid)
