"""vmsilo stage-2 init: PID 1 inside the guest's real root (stdlib only; Python 3.11).

Started by the stage-1 initramfs through ``/sbin/vmsilo-init`` after ``switch_root``. It parses
``/proc/cmdline`` with the shared decoder (:mod:`vmsilo.contracts.cmdline`), has
:mod:`vmsilo.guest.actions` turn that into boot actions and :mod:`vmsilo.guest.boot` apply
them, then supervises (this module):

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
import os
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

from vmsilo.contracts.cmdline import GuestParams, parse_cmdline
from vmsilo.contracts.mount import MNT_DETACH, libc, sys_umount
from vmsilo.contracts.ports import CHANNEL_PORT, READY_PORT, VSOCK_PORT
from vmsilo.guest.actions import (
    USER_HOME,
    USER_NAME,
    Action,
    base_mounts,
    hostname_actions,
    network_actions,
    share_actions,
    user_actions,
)
from vmsilo.guest.boot import (
    SHUTDOWN_SIGNALS,
    apply,
    load_modules,
    log,
    mounted_targets,
    read_text,
    setup_dev_links,
)

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
RB_POWER_OFF = 0x4321FEDC
RB_DISABLE_CAD = 0
EV_KEY = 1
KEY_POWER = 116
_INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit Linux


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
    if p.waypipe:
        argv.append("--waypipe")
    return argv


def restart_delay(failures: int) -> float:
    """Back-off before restarting a crashed child: 0.5, 1, 2, … capped at 30 s."""
    return float(min(30.0, 0.5 * 2 ** max(0, failures - 1)))


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
    #: the guest's sound server socket (bound before the agent starts; -1: no sound card)
    sound_fd: int = -1
    sound_modules: tuple[str, ...] = ()

    # -- setup --
    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for sig in (*SHUTDOWN_SIGNALS, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, lambda _s, _f: None)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")
        libc().reboot(RB_DISABLE_CAD)  # Ctrl-Alt-Del → SIGINT to us

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

    def setup_sound(self) -> None:
        """With a sound card, bind the sound server's socket now (before the agent says
        hello, so a program started at once waits for the server instead of missing it) and
        start the helper that brings the card and PulseAudio up (:mod:`vmsilo.guest.sound`)."""
        from vmsilo.guest import sound

        self.sound_modules = sound.sound_modules()
        if not self.sound_modules:
            return
        try:
            sock = sound.bind_server(self.params.uid, self.params.gid)
        except OSError as e:
            log(f"sound: cannot bind {sound.SERVER_SOCKET}: {e}")
            return
        self.sound_fd = sock.detach()
        self.start("sound")

    def start_sound(self) -> None:
        if self.sound_fd < 0:
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._in_child()
                os.setsid()
                from vmsilo.guest import sound

                code = sound.main(
                    self.params.uid, self.params.gid, self.sound_fd, self.sound_modules
                )
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.children[pid] = Child("sound", time.monotonic())
        log(f"sound helper started (pid {pid}): {' '.join(self.sound_modules)}")

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
            elif role == "sound":
                self.start_sound()
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
        elif child.role == "sound":
            log(f"sound helper exited ({_describe(code)}); restarting")
            self.schedule("sound")
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
        libc().reboot(RB_POWER_OFF)
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
    acts += hostname_actions(params, read_text("/etc/hosts"))
    acts += user_actions(
        params,
        read_text("/etc/passwd"),
        read_text("/etc/group"),
        read_text("/etc/shadow"),
        init.shell,
    )
    acts += network_actions(params)
    if not params.shares_later:  # (fastStart: the agent mounts them when the host says)
        acts += share_actions(params)
    apply(acts, spawned)
    log(f"hostname {socket.gethostname()}, user {USER_NAME} {params.uid}:{params.gid}")


def main(argv: Sequence[str] | None = None) -> int:
    if os.getpid() != 1 and "--force" not in (argv if argv is not None else sys.argv[1:]):
        print("vmsilo-init: must run as PID 1 (the guest's init)", file=sys.stderr)
        return 2
    params = parse_cmdline(read_text("/proc/cmdline"))
    init = Init(params)
    try:
        init.install_signals()
        boot(params, init)
        init.agent_main = _import_agent()
        init.setup_sound()
        init.start("agent")
        init.watch_console()
        log("ready: console on " + init.console_path())
        init.loop()
    except BaseException:
        log("fatal error in init:\n" + traceback.format_exc())
        init.shutdown("init failed")


if __name__ == "__main__":
    sys.exit(main())
