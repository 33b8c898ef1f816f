"""What ``vm-run`` reads of the config on its way to a VM, without the typed model.

vm-run to a running VM only needs ``runtimeDir`` and that the config names the VM, and a cold
start can reuse the cached plan (:mod:`vmsilo.plan.cache`): skipping pydantic saves most of
vm-run's start-up time. Anything unusual (no such file, a TOML error, an odd ``runtimeDir``, a
VM the file does not plainly name) returns None and vm-run takes the full, validated path, which
reports problems properly.

An unchanged config is not even parsed: what the last look found is remembered in the caller's
own runtime directory (``$XDG_RUNTIME_DIR``, else ``/run/user/<uid>``; no memo without one),
keyed by the file's path and stat (device, inode, size, modification and change times). The
memo is trusted only if the caller owns it and nobody else may write it, is written only for a
file whose last change is older than :data:`SETTLED` (a change within the same timestamp tick
could otherwise go unseen), and any doubt means "parse the file". Importing :mod:`tomllib`
(with its regular expressions and :mod:`datetime`) and parsing cost a warm ``vm-run`` a few ms,
a tenth of what it may add to a bare round trip to the guest (docs/BENCHMARKS.md).

Import-light on purpose: the standard library, :mod:`vmsilo.defaults` and
:mod:`vmsilo.config.location` only.
"""

from __future__ import annotations

import os

from vmsilo.config.location import VM_NAME_RE, config_file
from vmsilo.defaults import RUNTIME_DIR

#: A config changed this recently (ns) is not memoised: see the module docstring.
SETTLED = 2_000_000_000
MEMO_NAME = "vmsilo-vm-run.memo"
_MAGIC = "vmsilo vm-run memo 1"


class QuickLook:
    """What vm-run learnt from the config: its path, ``runtimeDir``, ``user`` and VM names;
    ``text`` is the file's text when it was read (None when it came from the memo)."""

    __slots__ = ("path", "runtime_dir", "text", "user", "vms")

    def __init__(
        self,
        path: str,
        runtime_dir: str,
        user: str | None,
        vms: frozenset[str],
        text: str | None = None,
    ) -> None:
        self.path = path
        self.runtime_dir = runtime_dir
        self.user = user
        self.vms = vms
        self.text = text


def quick_look(config: str | None, name: str, memo: bool = True) -> QuickLook | None:
    """The config at ``config`` (``-c``; else the usual places), if it plainly names VM
    ``name``; None sends vm-run the full way. ``memo=False`` always reads the file (a cold
    start needs its text for the plan cache's key)."""
    path = config_file(config)
    memo_path = _memo_path() if memo else None
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = _key(path, st)
    look = _recall(memo_path, key) if memo_path is not None else None
    if look is None:
        look = _read(path)
        if look is not None and memo_path is not None:
            _remember(memo_path, key, st, look)
    if look is None or name not in look.vms:
        return None
    return look


def _read(path: str) -> QuickLook | None:
    import tomllib

    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        data = tomllib.loads(text)
    except (OSError, ValueError):
        return None
    runtime_dir = data.get("runtimeDir", RUNTIME_DIR)
    vms = data.get("vms")
    user = data.get("user")
    if not isinstance(runtime_dir, str) or not runtime_dir.startswith("/"):
        return None
    if not isinstance(vms, dict):
        return None
    names = frozenset(n for n in vms if VM_NAME_RE.match(n))
    return QuickLook(
        path, runtime_dir.rstrip("/"), user if isinstance(user, str) else None, names, text
    )


def _key(path: str, st: os.stat_result) -> str:
    return f"{path}\0{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _memo_path() -> str | None:
    """The memo file in the caller's runtime directory, if it has a safe one."""
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    if not base.startswith("/"):
        return None
    try:
        st = os.stat(base)
    except OSError:
        return None
    if st.st_uid != uid or st.st_mode & 0o022:
        return None
    return f"{base}/{MEMO_NAME}"


def _recall(memo_path: str, key: str) -> QuickLook | None:
    try:
        fd = os.open(memo_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_size > 65536:
            return None
        text = os.read(fd, 65536).decode("utf-8")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    lines = text.split("\n")
    if len(lines) != 5 or lines[0] != _MAGIC or lines[1] != key or lines[4] != "":
        return None
    path = key.split("\0", 1)[0]
    return QuickLook(path, lines[2], None, frozenset(lines[3].split()))


def _remember(memo_path: str, key: str, st: os.stat_result, look: QuickLook) -> None:
    """Keep ``look``'s runtime dir and VM names for ``key`` (its ``user`` and ``text`` only
    matter to a cold start, which reads the file) unless the file changed too recently or a
    value does not fit on a line of the memo: then it is just parsed next time."""
    import time

    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLED:
        return
    if "\n" in key or "\n" in look.runtime_dir:
        return
    text = "\n".join((_MAGIC, key, look.runtime_dir, " ".join(sorted(look.vms)), ""))
    tmp = f"{memo_path}.{os.getpid()}"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, memo_path)
    except OSError:
        try:  # noqa: SIM105 (contextlib is not imported for this alone)
            os.unlink(tmp)
        except OSError:
            pass
