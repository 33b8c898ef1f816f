"""Validated scalar types of the configuration.

Each type checks one kind of value and normalises it (lower-case BDFs, MACs and colours,
canonical CIDRs). The checks also enforce what the *consumers* of a value need: anything that
ends up inside a crosvm ``key=value`` list must not need quoting there (``, [ ] " ' =``), and
anything that ends up on the guest kernel command line must be a plain printable ASCII word.
Errors are raised as ``PydanticCustomError('vmsilo', …)`` carrying a hint, which
:mod:`vmsilo.config.load` turns into ``path: message (hint: …)``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from vmsilo.config.colors import CSS_COLOR_NAMES
from vmsilo.config.location import VM_NAME_RE

CROSVM_SPECIAL = ",[]\"'="
IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
SHARE_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,35}$")
BDF_RE = re.compile(
    r"^(?:(?P<dom>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$"
)
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")
SIZE_RE = re.compile(r"^[1-9][0-9]*[KMGT]$")
HEX_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
DEB_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
SUITE_RE = re.compile(r"^[a-z][a-z0-9-]*$")
LOG_LEVEL_RE = re.compile(r"^[A-Za-z0-9_:.,=-]+$")


@dataclass(frozen=True)
class Label:
    """What a value of this type is called in ``docs/CONFIG.md`` (pydantic ignores it)."""

    text: str


def fail(message: str, hint: str) -> PydanticCustomError:
    """A validation error with a hint, in the shape the loader formats."""
    return PydanticCustomError("vmsilo", "{message}", {"message": message, "hint": hint})


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_crosvm_safe(text: str, what: str) -> str:
    bad = sorted({c for c in text if c in CROSVM_SPECIAL})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise fail(
            f"{what} {text!r} contains {shown}, which would need quoting on a crosvm command line",
            "rename it without , [ ] \" ' =",
        )
    if _has_control(text):
        raise fail(f"{what} {text!r} contains a control character", "remove it")
    return text


def crosvm_unsafe_reason(text: str, what: str) -> tuple[str, str] | None:
    """(message, hint) when ``text`` would need quoting on a crosvm command line."""
    try:
        check_crosvm_safe(text, what)
    except PydanticCustomError as e:
        ctx = e.context or {}
        return str(ctx.get("message", e)), str(ctx.get("hint", ""))
    return None


def _host_path(value: str) -> str:
    if not value.startswith("/"):
        raise fail(f"path {value!r} is not absolute", "write the full path, starting with /")
    return check_crosvm_safe(value, "path")


def _guest_path(value: str) -> str:
    if not value.startswith("/"):
        raise fail(f"guest path {value!r} is not absolute", "write the full path, starting with /")
    if any(c.isspace() for c in value) or not value.isascii() or ":" in value:
        raise fail(
            f"guest path {value!r} must be printable ASCII without spaces or ':'",
            "it is passed on the guest kernel command line; choose a simpler path",
        )
    return check_crosvm_safe(value, "guest path")


def _vm_name(value: str) -> str:
    if not VM_NAME_RE.match(value):
        raise fail(
            f"invalid VM name {value!r}",
            "use lower-case letters, digits and '-', starting with a letter, at most 63 chars",
        )
    if value == "host":
        raise fail("the VM name 'host' is reserved", "'host' means the host in network.netvm")
    return value


def _ifname(value: str) -> str:
    if not IFNAME_RE.match(value) or value in (".", ".."):
        raise fail(
            f"invalid network interface name {value!r}",
            "use at most 15 characters from A-Z a-z 0-9 _ . - (Linux interface names)",
        )
    return value


def _share_tag(value: str) -> str:
    if not SHARE_TAG_RE.match(value):
        raise fail(
            f"invalid share tag {value!r}",
            "use at most 36 characters from A-Z a-z 0-9 _ . -, not starting with . or -",
        )
    return value


def normalize_bdf(value: str) -> str:
    """``[DDDD:]BB:DD.F`` in any case → lower-case ``DDDD:BB:DD.F``."""
    m = BDF_RE.match(value)
    if not m:
        raise fail(
            f"invalid PCI address {value!r}", "write it as [DDDD:]BB:DD.F, e.g. 0000:01:00.0"
        )
    dom = (m["dom"] or "0000").lower()
    return f"{dom}:{m['bus'].lower()}:{m['dev'].lower()}.{m['fn']}"


def is_bdf(value: str) -> bool:
    return BDF_RE.match(value) is not None


def _pci_address(value: str) -> str:
    norm = normalize_bdf(value)
    if not norm.startswith("0000:") or int(norm[8:10], 16) > 0x1F:
        raise fail(
            f"invalid guest PCI address {value!r}",
            "domain must be 0000 and device at most 1f",
        )
    return norm


def _mac(value: str) -> str:
    if not MAC_RE.match(value):
        raise fail(f"invalid MAC address {value!r}", "write six hex pairs, e.g. 52:54:00:12:34:56")
    value = value.lower()
    if int(value[:2], 16) & 1:
        raise fail(f"MAC address {value} is a multicast address", "the first octet must be even")
    return value


def _ip_validator(
    parse: Callable[[str], object], what: str, hint: str, *, prefix: bool = False
) -> Callable[[str], str]:
    """A validator that normalises through ``parse`` (an :mod:`ipaddress` constructor) and
    refuses what it rejects as an invalid ``what``; ``prefix``: the prefix length must be
    written out (``10.0.0.2`` alone would silently mean a /32)."""

    def check(value: str) -> str:
        try:
            parsed = parse(value)
        except ValueError:
            raise fail(f"invalid {what} {value!r}", hint) from None
        if prefix and "/" not in value:
            raise fail(f"{value!r} has no prefix length", hint)
        return str(parsed)

    return check


_NETWORK_HINT = "write a network address with its prefix, e.g. {} (host bits zero)"
_ipv4_interface = _ip_validator(
    ipaddress.IPv4Interface, "IPv4 address/prefix", "write e.g. 10.0.0.2/24", prefix=True
)
_ipv6_interface = _ip_validator(
    ipaddress.IPv6Interface, "IPv6 address/prefix", "write e.g. fd00::2/64", prefix=True
)
_ipv4_network = _ip_validator(
    ipaddress.IPv4Network, "IPv4 network", _NETWORK_HINT.format("10.200.0.0/16")
)
_ipv6_network = _ip_validator(
    ipaddress.IPv6Network, "IPv6 network", _NETWORK_HINT.format("fd00::/64")
)
_ipv4 = _ip_validator(ipaddress.IPv4Address, "IPv4 address", "write e.g. 10.0.0.1")
_ipv6 = _ip_validator(ipaddress.IPv6Address, "IPv6 address", "write e.g. fd00::1")
_ip = _ip_validator(ipaddress.ip_address, "IP address", "write e.g. 1.1.1.1 or 2606:4700::1111")


def _color(value: str) -> str:
    low = value.lower()
    if low in CSS_COLOR_NAMES or HEX_COLOR_RE.match(value):
        return low
    raise fail(f"unknown colour {value!r}", "use a CSS colour name (e.g. 'red') or '#RRGGBB'")


def _size(value: str) -> str:
    if not SIZE_RE.match(value):
        raise fail(f"invalid size {value!r}", "write a number with a unit K, M, G or T, e.g. 10G")
    return value


def _kernel_param(value: str) -> str:
    if value == "":
        raise fail("empty kernel parameter", "remove it")
    if value.startswith("-"):
        raise fail(f"kernel parameter {value!r} starts with '-'", "kernel parameters are key=value")
    if any(c.isspace() for c in value) or _has_control(value):
        raise fail(
            f"kernel parameter {value!r} contains whitespace or a control character",
            "write one parameter per list item",
        )
    if not value.isascii():
        raise fail(f"kernel parameter {value!r} contains non-ASCII characters", "use ASCII")
    if '"' in value or "'" in value:
        raise fail(f"kernel parameter {value!r} contains a quote", "remove the quotes")
    return value


def _argv_word(value: str) -> str:
    if "\x00" in value:
        raise fail("argument contains a NUL byte", "remove it")
    return value


def _program(value: str) -> str:
    if value == "" or _has_control(value):
        raise fail(f"invalid program name {value!r}", "write a command name or an absolute path")
    return value


def _deb_package(value: str) -> str:
    if not DEB_PACKAGE_RE.match(value):
        raise fail(f"invalid Debian package name {value!r}", "e.g. 'firefox-esr'")
    return value


def _image_name(value: str) -> str:
    if not IMAGE_NAME_RE.match(value):
        raise fail(f"invalid image name {value!r}", "use lower-case letters, digits, _ . -")
    return check_crosvm_safe(value, "image name")


def _suite(value: str) -> str:
    if not SUITE_RE.match(value):
        raise fail(f"invalid Debian suite {value!r}", "e.g. 'bookworm'")
    return value


def _log_level(value: str) -> str:
    if not LOG_LEVEL_RE.match(value):
        raise fail(f"invalid log level {value!r}", "e.g. 'info' or 'debug,disk=off'")
    return value


def _block_id(value: str) -> str:
    check_crosvm_safe(value, "block id")
    if not value.isascii() or len(value.encode()) > 20 or not value:
        raise fail(f"block id {value!r} must be 1 to 20 ASCII bytes", "shorten it")
    return value


def _kv_string(value: str) -> str:
    return check_crosvm_safe(value, "value")


HostPath = Annotated[str, AfterValidator(_host_path), Label("absolute host path")]
GuestPath = Annotated[str, AfterValidator(_guest_path), Label("absolute guest path")]
VmName = Annotated[str, AfterValidator(_vm_name), Label("VM name")]
IfName = Annotated[str, AfterValidator(_ifname), Label("interface name")]
ShareTag = Annotated[str, AfterValidator(_share_tag), Label("share tag")]
Bdf = Annotated[str, AfterValidator(normalize_bdf), Label("PCI BDF")]
PciAddress = Annotated[str, AfterValidator(_pci_address), Label("guest PCI address")]
MacAddress = Annotated[str, AfterValidator(_mac), Label("MAC address")]
Ipv4Interface = Annotated[str, AfterValidator(_ipv4_interface), Label("IPv4 address/prefix")]
Ipv6Interface = Annotated[str, AfterValidator(_ipv6_interface), Label("IPv6 address/prefix")]
Ipv4Network = Annotated[str, AfterValidator(_ipv4_network), Label("IPv4 network")]
Ipv6Network = Annotated[str, AfterValidator(_ipv6_network), Label("IPv6 network")]
Ipv4Address = Annotated[str, AfterValidator(_ipv4), Label("IPv4 address")]
Ipv6Address = Annotated[str, AfterValidator(_ipv6), Label("IPv6 address")]
IpAddress = Annotated[str, AfterValidator(_ip), Label("IP address")]
Color = Annotated[str, AfterValidator(_color), Label("colour")]
Size = Annotated[str, AfterValidator(_size), Label("size")]
KernelParam = Annotated[str, AfterValidator(_kernel_param), Label("kernel parameter")]
ArgvWord = Annotated[str, AfterValidator(_argv_word), Label("string")]
Program = Annotated[str, AfterValidator(_program), Label("program")]
DebPackage = Annotated[str, AfterValidator(_deb_package), Label("Debian package")]
ImageName = Annotated[str, AfterValidator(_image_name), Label("image name")]
Suite = Annotated[str, AfterValidator(_suite), Label("Debian suite")]
LogLevel = Annotated[str, AfterValidator(_log_level), Label("log level")]
BlockId = Annotated[str, AfterValidator(_block_id), Label("block id")]
KvString = Annotated[str, AfterValidator(_kv_string), Label("string")]
