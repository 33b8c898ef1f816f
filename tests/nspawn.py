"""A real systemd as PID 1 of a systemd-nspawn container, for tests of the host integration.

Safety (TESTING.md): systemd only ever runs as PID 1 *inside* nspawn, each container in a fresh
cgroup of its own (with ``--keep-unit`` nspawn splits the cgroup it starts in, so two containers
sharing one would kill each other's services), with its own network namespace
(``--private-network``: taps made in there never touch the host) and a volatile overlay root so
the cached root file system is never modified.

Readiness is an event: nspawn gets a ``NOTIFY_SOCKET`` and ``--notify-ready=yes`` and forwards
the container's READY=1 (and its leader pid). Commands run in the container through
``nsenter -t <leader> -a`` (``systemctl -M``/``machinectl`` need a host systemd).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
#: What vmsilo's supervisor needs on a host, plus systemd itself.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "qemu-system-x86",
    "busybox-static",
    "iproute2",
    "nftables",  # NAT and the input filter of every netvm link
    "kmod",
    "procps",
    "polkitd",  # the real polkit evaluates vmsilo's rule for systemctl as the user
)
ROOT_FORMAT = "1"  # bump when the post-processing below changes


def nspawn_blocker() -> str | None:
    """Why a container cannot be booted here (None: it can)."""
    if os.geteuid() != 0:
        return "systemd-nspawn tests need root"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/install-deps installs it)"
    return None


def ensure_rootfs(cache: Path, packages: Sequence[str] = PACKAGES) -> Path:
    """The container root for ``packages``, built once and cached keyed on the package list."""
    key = hashlib.sha256("\n".join([SUITE, ROOT_FORMAT, *sorted(packages)]).encode()).hexdigest()[
        :16
    ]
    root = cache / "nspawn-roots" / key
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root.parent))
    partial.rmdir()
    try:
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--include=" + ",".join(sorted(packages)),
                '--aptopt=Acquire::Check-Valid-Until "false"',
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                SUITE,
                str(partial),
            ],
            check=True,
            capture_output=True,
            timeout=1200,
        )
        # quiet, fast boots: nothing in the container but what the tests start
        for unit in (
            "systemd-networkd-wait-online.service",
            "apt-daily.timer",
            "apt-daily-upgrade.timer",
            "e2scrub_all.timer",
            "fstrim.timer",
        ):
            mask = partial / "etc/systemd/system" / unit
            mask.unlink(missing_ok=True)
            mask.symlink_to("/dev/null")
        (partial / "etc/hostname").write_text("vmsilo-test\n")
        os.rename(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


def _own_cgroups(name: str) -> list[Path]:
    """One fresh cgroup per container in each hierarchy systemd tracks (v2, or hybrid)."""
    dirs: list[Path] = []
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        rel = next(
            line.split("::", 1)[1].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        dirs.append(Path("/sys/fs/cgroup" + rel.rstrip("/")) / name)
    else:
        for h in ("unified", "systemd"):
            if Path(f"/sys/fs/cgroup/{h}").is_dir():
                dirs.append(Path(f"/sys/fs/cgroup/{h}") / name)
    for d in dirs:
        d.mkdir(exist_ok=True)
    return dirs


def _remove_cgroups(dirs: list[Path]) -> None:
    for top in dirs:
        for sub, _subdirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(sub)


@dataclass
class Bind:
    source: str
    target: str
    read_only: bool = False

    def arg(self) -> str:
        return f"--bind{'-ro' if self.read_only else ''}={self.source}:{self.target}"


@dataclass
class Container:
    rootfs: Path
    binds: list[Bind]
    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    machine: str = field(default_factory=lambda: f"vmsilo-t{os.getpid()}-{time.monotonic_ns()}")
    leader: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    cgroups: list[Path] = field(default_factory=list)
    boot_s: float = 0.0

    @property
    def log(self) -> Path:
        return self.workdir / "nspawn.log"

    def boot(self, timeout: float = 60) -> None:
        notify_path = self.workdir / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={self.rootfs}",
            f"--machine={self.machine[:64]}",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--private-network",
            "--console=pipe",
            "--notify-ready=yes",
            *(b.arg() for b in self.binds),
            *self.extra_args,
        ]
        self.cgroups = _own_cgroups(self.machine)
        cgroups = self.cgroups

        def enter() -> None:
            for d in cgroups:
                (d / "cgroup.procs").write_text("0")

        started = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                preexec_fn=enter,
            )
        ready = False
        deadline = started + timeout
        with notify:
            while not ready:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    break
                notify.settimeout(min(left, 1.0))  # wake to notice an nspawn that died
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                for line in msg.splitlines():
                    if line.startswith("X_NSPAWN_LEADER_PID="):
                        self.leader = int(line.split("=", 1)[1])
                    ready = ready or line == "READY=1"
        self.boot_s = time.monotonic() - started
        if not ready or self.leader is None:
            self.stop()
            raise RuntimeError(f"container did not boot in {timeout} s:\n{self.log.read_text()}")

    def run(
        self,
        *argv: str,
        user: str | None = None,
        timeout: float = 120,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv inside the container (as ``user`` via runuser), bounded by ``timeout``."""
        assert self.leader is not None
        inner = list(argv)
        if env:
            inner = ["env", *(f"{k}={v}" for k, v in env.items()), *inner]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *inner],
            capture_output=True,
            input=input,
            timeout=timeout,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )

    def check(self, *argv: str, **kw: object) -> str:
        p = self.run(*argv, **kw)  # type: ignore[arg-type]
        if p.returncode != 0:
            raise AssertionError(
                f"{argv} -> {p.returncode}\n{p.stdout.decode()}\n{p.stderr.decode()}"
            )
        return p.stdout.decode()

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to nspawn halts the container in order; SIGKILL only as the backstop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        # nspawn cannot remove its propagate dir when the host's /run is not a tmpfs
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.machine[:64]}", ignore_errors=True)
        _remove_cgroups(self.cgroups)
        self.cgroups = []
