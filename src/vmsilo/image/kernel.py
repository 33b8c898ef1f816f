"""Guest kernel handling for the image builder (host side).

Fetches Debian's ``linux-image`` package with ``apt-get download``, unpacks it with ``dpkg-deb
-x`` into a cache keyed by package name and version, extracts the uncompressed ELF ``vmlinux``
from the bzImage (QEMU boots it through its PVH note, crosvm boots ELF kernels directly, and
under TCG it saves the ~2 s the kernel spends decompressing itself), and computes the closure of
the kernel modules the guest needs from the modules' own ``.modinfo`` sections.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vmsilo.contracts.fs import atomic_write
from vmsilo.errors import VmsiloError
from vmsilo.runcmd import run

#: Modules the guest loads (stage 1 loads all of them; their dependencies come along).
GUEST_MODULES: tuple[str, ...] = (
    "crc32c_generic",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "erofs",
    "overlay",
    "ext4",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
)

#: Shipped in the image but loaded on demand only (a netvm's routing, vmsilo.guest.netvm), so
#: they cost nothing at boot.
ON_DEMAND_MODULES: tuple[str, ...] = (
    "nf_tables",
    "nft_chain_nat",
    "nft_ct",
    "nft_masq",
    "nf_conntrack",
    "nf_nat",
    "nfnetlink",
    # the sound card's driver, loaded by vmsilo.guest.sound when the VM has a card: QEMU's
    # Intel HDA (hda-output/hda-duplex codecs are driven by the generic codec)
    "snd_hda_intel",
    "snd_hda_codec_generic",
)

#: Shipped when the kernel has them: crosvm's virtio-snd (CONFIG_SND_VIRTIO; Debian 12's 6.1
#: kernel is built without it, SPEC §9.2).
OPTIONAL_MODULES: tuple[str, ...] = ("virtio_snd",)

KERNEL_META_PACKAGE = "linux-image-amd64"
APT_HINT = "check the Debian mirror in /etc/apt/sources.list* and run apt-get update"


@dataclass(frozen=True)
class KernelRef:
    """A Debian kernel package: e.g. ``linux-image-6.1.0-56-amd64`` version ``6.1.192-2``."""

    package: str
    version: str

    @property
    def key(self) -> str:
        return f"{self.package}_{self.version}".replace(":", "%3a")


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package in the cache."""

    ref: KernelRef
    root: Path  # the dpkg-deb -x tree
    kver: str  # e.g. 6.1.0-56-amd64
    vmlinux: Path  # uncompressed ELF kernel

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.kver


def _apt_field(text: str, field: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def resolve_kernel(meta: str = KERNEL_META_PACKAGE) -> KernelRef:
    """Ask apt which kernel package the meta package currently points at."""
    out = run(
        ["apt-cache", "show", "--no-all-versions", meta],
        hint="install apt, or " + APT_HINT,
    ).stdout.decode(errors="replace")
    depends = _apt_field(out, "Depends")
    if not depends:
        raise VmsiloError(f"apt-cache: no candidate for {meta}", APT_HINT)
    first = depends.split(",")[0].split("|")[0].strip()
    package = first.split()[0]
    pinned = re.fullmatch(r"\S+\s*\(\s*=\s*(\S+)\s*\)", first)
    if pinned:
        return KernelRef(package, pinned.group(1))
    show = run(["apt-cache", "show", "--no-all-versions", package], hint=APT_HINT)
    version = _apt_field(show.stdout.decode(errors="replace"), "Version")
    if not version:
        raise VmsiloError(f"apt-cache: no version for {package}", APT_HINT)
    return KernelRef(package, version)


def _apt_stamp() -> str:
    """Changes whenever apt's package lists or sources change."""
    parts: list[str] = []
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list.d"), Path("/etc/apt")):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and (d.name != "apt" or p.name.startswith("sources.list")):
                st = p.stat()
                parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def resolve_kernel_cached(cache_dir: Path, meta: str = KERNEL_META_PACKAGE) -> KernelRef:
    """:func:`resolve_kernel`, memoised in ``cache_dir`` until apt's lists change (each
    ``apt-cache`` call costs ~0.6 s, which would make an up-to-date build slow)."""
    memo = cache_dir / "kernel-resolve"
    stamp = f"{meta}\n{_apt_stamp()}"
    try:
        head, _, body = memo.read_text().partition("\n\n")
        if body == stamp:
            pkg, _, ver = head.partition(" ")
            return KernelRef(pkg, ver)
    except OSError:
        pass
    ref = resolve_kernel(meta)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(memo, f"{ref.package} {ref.version}\n\n{stamp}")
    return ref


def cached_kernels(cache_dir: Path) -> list[KernelRef]:
    """Kernels already unpacked in the cache (for offline rebuilds), oldest first."""
    base = cache_dir / "kernels"
    refs: list[tuple[float, KernelRef]] = []
    if base.is_dir():
        for d in base.iterdir():
            meta = d / "ref"
            if meta.is_file():
                pkg, _, ver = meta.read_text().strip().partition(" ")
                refs.append((d.stat().st_mtime, KernelRef(pkg, ver)))
    return [r for _, r in sorted(refs, key=lambda x: x[0])]


def fetch_kernel(
    ref: KernelRef, cache_dir: Path, progress: Callable[[str], None] | None = None
) -> KernelTree:
    """Download and unpack ``ref`` into ``cache_dir/kernels/<key>`` unless it is there."""
    say = progress or (lambda _m: None)
    base = cache_dir / "kernels"
    final = base / ref.key
    if not (final / "ref").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
        try:
            say(f"downloading {ref.package} {ref.version}")
            run(
                [
                    "apt-get",
                    "download",
                    "-q",
                    "-o",
                    "APT::Sandbox::User=root",
                    f"{ref.package}={ref.version}",
                ],
                cwd=str(tmp),
                hint=APT_HINT,
            )
            debs = sorted(tmp.glob("*.deb"))
            if not debs:
                raise VmsiloError(f"apt-get download {ref.package}: no .deb appeared", APT_HINT)
            say(f"unpacking {debs[0].name}")
            run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "tree")], hint="apt-get install dpkg")
            debs[0].unlink()
            kver = _find_kver(tmp / "tree")
            say("extracting the uncompressed kernel")
            bz = tmp / "tree" / "boot" / f"vmlinuz-{kver}"
            (tmp / "vmlinux").write_bytes(extract_vmlinux(bz.read_bytes()))
            (tmp / "ref").write_text(f"{ref.package} {ref.version}\n")
            if final.exists():  # a stale, incomplete entry
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    kver = _find_kver(final / "tree")
    return KernelTree(ref=ref, root=final / "tree", kver=kver, vmlinux=final / "vmlinux")


def _find_kver(tree: Path) -> str:
    mods = tree / "lib" / "modules"
    if not mods.is_dir():
        mods = tree / "usr" / "lib" / "modules"
    kvers = sorted(p.name for p in mods.iterdir()) if mods.is_dir() else []
    if len(kvers) != 1:
        raise VmsiloError(f"{tree}: expected one kernel module tree, found {kvers}")
    return kvers[0]


# --- bzImage -> vmlinux -------------------------------------------------------------------

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x02\x21\x4c\x18", "lz4"),
)


def _decompress(kind: str, blob: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(blob)
    tool = {"zstd": ["zstd", "-d", "-c", "-q"], "lz4": ["lz4", "-d", "-c", "-q"]}[kind]
    return run(tool, input=blob, hint=f"apt-get install {tool[0]}").stdout


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (any compressor Linux uses).

    Uses the boot protocol header (``payload_offset``/``payload_length``, protocol ≥ 2.08) and
    falls back to scanning for compression magic; the result must be an ELF file.
    """
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    candidates: list[tuple[int, int | None]] = []
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        setup_sects = bzimage[0x1F1] or 4
        payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
        start = (setup_sects + 1) * 512 + payload_offset
        candidates.append((start, payload_length))
    for magic, _kind in _MAGICS:
        pos = bzimage.find(magic)
        if pos >= 0:
            candidates.append((pos, None))
    errors: list[str] = []
    for start, length in candidates:
        blob = bzimage[start : start + length] if length else bzimage[start:]
        for magic, kind in _MAGICS:
            if not blob.startswith(magic):
                continue
            try:
                out = _decompress(kind, blob)
            except (OSError, EOFError, ValueError, lzma.LZMAError, VmsiloError) as e:
                errors.append(f"{kind} at {start}: {e}")
                continue
            if out[:4] == b"\x7fELF":
                return out
            errors.append(f"{kind} at {start}: not an ELF image")
    raise VmsiloError(
        "cannot extract vmlinux from the kernel image: " + ("; ".join(errors) or "no payload"),
        "is it an x86 bzImage?",
    )


# --- modules --------------------------------------------------------------------------------


def modinfo(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` key/value strings of a (possibly compressed) ELF kernel module."""
    data = read_module(path)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise VmsiloError(f"{path}: not a 64-bit ELF module")
    endian = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, _t, _f, _a, off, size = struct.unpack_from(endian + "IIQQQQ", data, base)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\x00", stroff + name)
        if data[stroff + name : end] != b".modinfo":
            continue
        for item in data[off : off + size].split(b"\x00"):
            if b"=" in item:
                k, _, v = item.decode(errors="replace").partition("=")
                info.setdefault(k, []).append(v)
    return info


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return run(["zstd", "-d", "-c", "-q"], input=data, hint="apt-get install zstd").stdout
    return data


def _modname(path: Path) -> str:
    name = path.name
    for ext in (".ko", ".ko.xz", ".ko.gz", ".ko.zst"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name.replace("-", "_")


def module_closure(moddir: Path, wanted: Iterable[str]) -> dict[str, Path]:
    """Module name → file (relative to ``moddir``) for ``wanted`` and all their dependencies.

    Built-in modules (listed in ``modules.builtin``) are skipped silently; an unknown module is
    an error.
    """
    index: dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index.setdefault(_modname(p), p.relative_to(moddir))
    builtin: set[str] = set()
    bfile = moddir / "modules.builtin"
    if bfile.is_file():
        builtin = {_modname(Path(line.strip())) for line in bfile.read_text().splitlines()}
    result: dict[str, Path] = {}
    todo = [m.replace("-", "_") for m in wanted]
    while todo:
        m = todo.pop()
        if m in result or m in builtin:
            continue
        if m not in index:
            raise VmsiloError(f"kernel module {m} not found in {moddir}")
        result[m] = index[m]
        for deps in modinfo(moddir / index[m]).get("depends", []):
            todo.extend(d.replace("-", "_") for d in deps.split(",") if d)
    return result


def available_modules(moddir: Path, names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` this kernel has, as a module file or built in."""
    have = {_modname(p) for p in (moddir / "kernel").rglob("*.ko*")}
    bfile = moddir / "modules.builtin"
    if bfile.is_file():
        have |= {_modname(Path(line.strip())) for line in bfile.read_text().splitlines()}
    return tuple(n for n in names if n.replace("-", "_") in have)


def stage_modules(
    tree: KernelTree, dest_root: Path, wanted: Iterable[str] = GUEST_MODULES
) -> list[str]:
    """Copy the module closure into ``dest_root/lib/modules/<kver>`` and run depmod there.

    Returns the sorted module names.
    """
    closure = module_closure(tree.modules_dir, wanted)
    out = dest_root / "lib" / "modules" / tree.kver
    for rel in closure.values():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree.modules_dir / rel, out / rel)
    for f in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (tree.modules_dir / f).is_file():
            shutil.copy2(tree.modules_dir / f, out / f)
    run(["depmod", "-b", str(dest_root), tree.kver], hint="apt-get install kmod")
    return sorted(closure)
