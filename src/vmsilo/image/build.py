"""Guest image builder (host side): ``vmsilo image build`` / ``vmsilo image list``.

An image is three files in ``<state_dir>/images/<name>/<version>/``:

* ``vmlinuz`` — the **uncompressed** ELF kernel (vmlinux) extracted from Debian's bzImage;
  QEMU boots it via its PVH note, crosvm boots ELF kernels directly;
* ``initrd.img`` — the stage-1 initramfs (gzip newc cpio): static busybox, the guest kernel
  modules and ``/init`` (``data/stage1-init``);
* ``root.erofs`` — the read-only root: an mmdebstrap'ed Debian (essential + python3, busybox,
  e2fsprogs and the image's packages), the same modules under ``/usr/lib/modules`` and the
  guest half of vmsilo in ``/usr/lib/python3/dist-packages/vmsilo`` (stage-2 init:
  ``/sbin/vmsilo-init`` → ``vmsilo.guest.init``).

``<version>`` is a hash of every input, so an unchanged image is never rebuilt; a version
directory, once renamed into place, is never modified or deleted (a running VM may use it);
``current`` is a relative symlink switched atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import vmsilo
from vmsilo.contracts.guest_files import GUEST_DATA, GUEST_FILES
from vmsilo.errors import VmsiloError
from vmsilo.image.cpio import write_initramfs
from vmsilo.image.desktop import DESKTOP_DIR, collect_entries
from vmsilo.image.kernel import (
    GUEST_MODULES,
    ON_DEMAND_MODULES,
    OPTIONAL_MODULES,
    KernelRef,
    available_modules,
    cached_kernels,
    fetch_kernel,
    resolve_kernel_cached,
    stage_modules,
)
from vmsilo.image.store import clean_stale, locked
from vmsilo.runcmd import run

#: Bump when the layout or content of what the builder produces changes.
FORMAT_VERSION = "2"  # 2: the menu entries kept beside the image (desktop/)
#: Bump when the post-processing of the cached mmdebstrap root changes.
ROOT_FORMAT = "1"
#: ``iproute2``: ``ip`` for whoever debugs a guest's network (busybox's applet is not enough).
#: Sound (SPEC §9.2): PulseAudio for the VM user, its tools, ALSA's tools and its pulse plugin
#: (ALSA programs play through the server), started by :mod:`vmsilo.guest.sound`.
BASE_PACKAGES: tuple[str, ...] = (
    "python3",
    "busybox",
    "e2fsprogs",
    "iproute2",
    "nftables",
    "pulseaudio",
    "pulseaudio-utils",
    "alsa-utils",
    "libasound2-plugins",
    # windows on the host desktop (SPEC §9.1): waypipe's server, and a font for programs
    "waypipe",
    "fonts-dejavu-core",
)
HOST_BUSYBOX = Path("/bin/busybox")
GUEST_PYTHON_DIR = "usr/lib/python3/dist-packages/vmsilo"
STAGE2_INIT = "/sbin/vmsilo-init"

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9]+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
)
_STAGE2_WRAPPER = (
    "#!/usr/bin/python3 -Iu\n"
    "# vmsilo stage-2 init (PID 1 in the real root); see vmsilo.guest.init.\n"
    "import sys\n\n"
    "from vmsilo.guest.init import main\n\n"
    "sys.exit(main())\n"
)
_ETC_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@dataclass(frozen=True)
class ImageSpec:
    name: str  # e.g. "default"
    suite: str  # e.g. "bookworm"
    packages: tuple[str, ...]  # extra Debian packages from images.<name>.packages


@dataclass(frozen=True)
class BuiltImage:
    name: str
    version: str  # hash of all inputs
    path: Path  # <state_dir>/images/<name>/<version>
    reused: bool  # True if that version already existed (nothing rebuilt)


# --- inputs -----------------------------------------------------------------------------------


def _validate(spec: ImageSpec) -> None:
    if not _NAME_RE.match(spec.name):
        raise VmsiloError(f"invalid image name {spec.name!r}", "use letters, digits, _ . -")
    if not _PACKAGE_RE.match(spec.suite):
        raise VmsiloError(f"invalid Debian suite {spec.suite!r}", "e.g. bookworm")
    bad = [p for p in spec.packages if not _PACKAGE_RE.match(p)]
    if bad:
        raise VmsiloError(
            f"image {spec.name}: invalid Debian package name(s): {', '.join(bad)}",
            'give plain package names, e.g. packages = ["curl"]',
        )


def all_packages(spec: ImageSpec) -> tuple[str, ...]:
    """The packages mmdebstrap includes: the base set plus the image's, sorted, unique."""
    return tuple(sorted(set(BASE_PACKAGES) | set(spec.packages)))


def _sha(*parts: bytes) -> hashlib._Hash:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h


def root_key(spec: ImageSpec) -> str:
    """Cache key of the mmdebstrap root: (suite, sorted packages, root format)."""
    return _sha(
        ROOT_FORMAT.encode(), spec.suite.encode(), ",".join(all_packages(spec)).encode()
    ).hexdigest()[:24]


def guest_code_dir() -> Path:
    """The installed ``vmsilo`` package directory (the guest code is copied from here)."""
    return Path(vmsilo.__file__).resolve().parent


def guest_files(code_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(path relative to the guest ``vmsilo`` dir, source) for every file put in the image:
    :data:`vmsilo.contracts.guest_files.GUEST_FILES`, in its order."""
    base = code_dir or guest_code_dir()
    inner = [rel.removeprefix("vmsilo/") for rel in GUEST_FILES]
    return [(rel, base / rel) for rel in inner]


def image_version(
    spec: ImageSpec,
    *,
    kernel: KernelRef,
    root_status: bytes = b"",
    busybox: Path = HOST_BUSYBOX,
    code_dir: Path | None = None,
) -> str:
    """The version of the image built from these inputs: a hash of all of them.

    ``root_status`` is the cached root's ``/var/lib/dpkg/status`` (so a re-bootstrapped root
    with newer packages is a new version).
    """
    parts: list[bytes] = [
        FORMAT_VERSION.encode(),
        spec.suite.encode(),
        ",".join(all_packages(spec)).encode(),
        f"{kernel.package}={kernel.version}".encode(),
        ",".join((*GUEST_MODULES, *ON_DEMAND_MODULES)).encode(),
        hashlib.sha256(busybox.read_bytes()).digest(),
        hashlib.sha256(root_status).digest(),
        _STAGE2_WRAPPER.encode(),
    ]
    for rel, src in guest_files(code_dir):
        parts += [rel.encode(), hashlib.sha256(src.read_bytes()).digest()]
    return _sha(*parts).hexdigest()[:16]


# --- helpers ----------------------------------------------------------------------------------


def _require_tools() -> None:
    needed = {
        "mmdebstrap": "apt-get install mmdebstrap",
        "mkfs.erofs": "apt-get install erofs-utils",
        "depmod": "apt-get install kmod",
        "apt-get": "vmsilo builds images from Debian packages: run it on Debian or Ubuntu",
        "dpkg-deb": "apt-get install dpkg",
        "chroot": "apt-get install coreutils",
    }
    for tool, hint in needed.items():
        if shutil.which(tool) is None:
            raise VmsiloError(f"{tool}: command not found (needed to build guest images)", hint)
    if not HOST_BUSYBOX.is_file() or not _is_static_elf(HOST_BUSYBOX):
        raise VmsiloError(
            f"{HOST_BUSYBOX} is missing or not statically linked (needed for the initramfs)",
            "apt-get install busybox-static",
        )


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _set_current(image_dir: Path, version: str) -> None:
    link = image_dir / "current"
    try:
        if os.readlink(link) == version:
            return
    except OSError:
        pass
    tmp = image_dir / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)
    os.replace(tmp, link)


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_dir():
            _fsync_tree(p)
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the root ---------------------------------------------------------------------------------


def ensure_root(
    spec: ImageSpec,
    cache_dir: Path,
    say: Callable[[str], None],
    *,
    force: bool = False,
) -> Path:
    """The cached mmdebstrap root for ``spec`` (bootstrapped now if missing or ``force``)."""
    roots = cache_dir / "roots"
    final = roots / root_key(spec)
    if final.is_dir() and not force:
        return final
    roots.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=roots))
    target = tmp / "root"
    pkgs = all_packages(spec)
    say(f"bootstrapping Debian {spec.suite} with {', '.join(pkgs)} (mmdebstrap)")
    t0 = time.monotonic()
    argv = [
        "mmdebstrap",
        "--quiet",
        "--variant=essential",
        "--include=" + ",".join(pkgs),
        '--aptopt=Acquire::Check-Valid-Until "false"',
    ]
    argv += [f"--dpkgopt={o}" for o in _DPKG_EXCLUDES]
    argv += [spec.suite, str(target)]
    try:
        run(argv, hint="check the package names and the Debian mirror; apt-get install mmdebstrap")
        _postprocess_root(target)
        old = None
        if final.exists():
            old = roots / f".old-{os.getpid()}"
            os.rename(final, old)
        os.rename(target, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"root bootstrapped in {time.monotonic() - t0:.1f} s")
    return final


def _postprocess_root(root: Path) -> None:
    """Drop host leftovers and caches from a fresh mmdebstrap root."""
    for rel in ("etc/hostname", "etc/resolv.conf", "etc/machine-id"):
        p = root / rel
        if p.is_symlink() or p.exists():
            p.unlink()
    (root / "etc/hosts").write_text(_ETC_HOSTS)
    (root / "etc/resolv.conf").write_text("")
    for rel in ("var/lib/apt/lists", "var/cache/apt", "var/log"):
        d = root / rel
        if d.is_dir():
            for p in d.iterdir():
                if p.is_dir() and not p.is_symlink():
                    if p.name != "partial":
                        shutil.rmtree(p)
                else:
                    p.unlink()


def _root_status(root: Path) -> bytes:
    status = root / "var/lib/dpkg/status"
    return status.read_bytes() if status.is_file() else b""


# --- build ------------------------------------------------------------------------------------


def _kernel_ref(cache_dir: Path, say: Callable[[str], None]) -> KernelRef:
    try:
        return resolve_kernel_cached(cache_dir)
    except VmsiloError:
        cached = cached_kernels(cache_dir)
        if not cached:
            raise
        say(f"apt-cache failed; using the cached kernel {cached[-1].package}")
        return cached[-1]


def build_image(
    spec: ImageSpec,
    state_dir: Path,
    *,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> BuiltImage:
    """Build (or reuse) the image ``spec`` under ``state_dir/images/<name>/<version>``.

    ``force`` re-runs mmdebstrap even when its root is cached (picking up package updates);
    identical inputs still give the identical, reused version.
    """
    say = progress or (lambda _m: None)
    _validate(spec)
    state_dir = Path(state_dir)
    cache = Path(cache_dir) if cache_dir is not None else state_dir / "cache"
    image_dir = state_dir / "images" / spec.name
    with locked(image_dir / ".lock"), locked(cache / ".lock"):
        say("resolving the kernel package")
        kref = _kernel_ref(cache, say)
        root = cache / "roots" / root_key(spec)
        if root.is_dir() and not force:
            version = image_version(spec, kernel=kref, root_status=_root_status(root))
            if (image_dir / version).is_dir():
                _set_current(image_dir, version)
                say(f"image {spec.name} {version} is up to date")
                return BuiltImage(spec.name, version, image_dir / version, reused=True)
        _require_tools()
        root = ensure_root(spec, cache, say, force=force)
        version = image_version(spec, kernel=kref, root_status=_root_status(root))
        final = image_dir / version
        if final.is_dir():
            _set_current(image_dir, version)
            say(f"image {spec.name} {version} is up to date")
            return BuiltImage(spec.name, version, final, reused=True)
        kernel = fetch_kernel(kref, cache, say)
        clean_stale(image_dir, ".tmp-")
        clean_stale(cache / "staging", "")
        out = image_dir / f".tmp-{version}-{os.getpid()}"
        out.mkdir(parents=True)
        (cache / "staging").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache / "staging"))
        try:
            t0 = time.monotonic()
            say(f"collecting kernel modules for {kernel.kver}")
            boot_mods = work / "boot-mods"  # what stage 1 needs: small initramfs, fast boot
            names = stage_modules(kernel, boot_mods)
            say(f"{len(names)} modules: {' '.join(names)}")
            mods = work / "mods"  # the root also carries the on-demand ones (netfilter)
            optional = available_modules(kernel.modules_dir, OPTIONAL_MODULES)
            stage_modules(kernel, mods, (*GUEST_MODULES, *ON_DEMAND_MODULES, *optional))

            say("writing the stage-1 initramfs")
            _build_initramfs(work / "initrd", boot_mods, out / "initrd.img")

            say("assembling the root")
            tree = _assemble_root(root, work / "root", mods, spec, version, kernel.kver)
            entries = collect_entries(tree, spec.packages, out / DESKTOP_DIR)
            if entries:
                say(f"menu entries kept: {' '.join(entries)}")

            say("packing root.erofs (mkfs.erofs)")
            run(
                ["mkfs.erofs", "--quiet", "--all-root", str(out / "root.erofs"), str(tree)],
                hint="apt-get install erofs-utils",
            )
            shutil.copyfile(kernel.vmlinux, out / "vmlinuz")
            _fsync_tree(out)
            os.utime(out)
            os.rename(out, final)
            _set_current(image_dir, version)
            say(f"image {spec.name} {version} built in {time.monotonic() - t0:.1f} s")
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return BuiltImage(spec.name, version, final, reused=False)


def _data_file(name: str) -> Path:
    return guest_code_dir() / "guest" / "data" / name


def _build_initramfs(tree: Path, mods: Path, dest: Path) -> None:
    for d in ("bin", "dev", "etc", "proc", "sys", "run", "newroot", "lower", "upper"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "vmsilo-modules").write_text(" ".join(GUEST_MODULES) + "\n")
    shutil.copy2(HOST_BUSYBOX, tree / "bin" / "busybox")
    os.chmod(tree / "bin" / "busybox", 0o755)
    shutil.copytree(mods / "lib", tree / "lib", symlinks=True)
    shutil.copyfile(_data_file("stage1-init"), tree / "init")
    os.chmod(tree / "init", 0o755)
    write_initramfs(tree, dest, devices=(("dev/console", 0o20600, 5, 1),))


def _assemble_root(
    cached: Path, tree: Path, mods: Path, spec: ImageSpec, version: str, kver: str
) -> Path:
    """A hard-linked copy of the cached root plus modules and the guest code.

    Only new paths are written into the copy, so the cached root's files (shared through the
    hard links) are never modified.
    """
    try:
        run(["cp", "-al", str(cached), str(tree)])
    except VmsiloError:
        shutil.rmtree(tree, ignore_errors=True)
        run(["cp", "-a", str(cached), str(tree)])
    moddest = tree / "usr" / "lib" / "modules"
    if moddest.exists():
        shutil.rmtree(moddest)
    shutil.copytree(mods / "lib" / "modules", moddest, symlinks=True)

    pkg = tree / GUEST_PYTHON_DIR
    for rel, src in guest_files():
        dst = pkg / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        if f"vmsilo/{rel}" in GUEST_DATA:
            os.chmod(dst, 0o755)
    init = tree / STAGE2_INIT.lstrip("/")
    if init.parent.is_symlink():  # merged /usr: /sbin -> usr/sbin
        init = tree / "usr" / "sbin" / init.name
    init.write_text(_STAGE2_WRAPPER)
    os.chmod(init, 0o755)
    # No systemd in the guest: poweroff/reboot/halt are busybox's, which signal our PID 1.
    sbin = tree / "usr" / "sbin"
    for applet in ("poweroff", "reboot", "halt"):
        if not (sbin / applet).exists() and not (sbin / applet).is_symlink():
            os.symlink("/bin/busybox", sbin / applet)
    info = tree / "usr" / "lib" / "vmsilo"
    info.mkdir(parents=True, exist_ok=True)
    (info / "image").write_text(f"name={spec.name}\nversion={version}\nkernel={kver}\n")
    # Byte-compile with the guest's own Python; hash-based pycs stay valid on the erofs root.
    run(
        [
            "chroot",
            str(tree),
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
            "/" + GUEST_PYTHON_DIR,
        ],
        hint="the guest code must compile with the image's Python",
    )
    return tree
