"""Message signatures read from the Wayland protocol XML files.

Why the XML and not a library: the filter must know the signature of *every* message that
crosses it (to find fds, new objects and strings), for the exact protocol versions the
compositor speaks. Debian ships the authoritative descriptions (``libwayland-dev``:
``/usr/share/wayland/wayland.xml``; ``wayland-protocols``: the extensions), the same files
``wayland-scanner`` compiles into every C client and compositor, so reading them at start keeps
the filter in step with the system without generated code. The maintained Python library,
``pywayland``, wraps libwayland's C library through cffi to *be* a client or a compositor; a
relay that parses, rewrites and forwards raw messages with their fds gains nothing from it and
would need a C dependency on the user's side. The wire format itself is small (``wire``).

Our own ``xml/`` directory carries the signatures of protocols the filter needs that Debian 12
does not ship yet (``wp_security_context_manager_v1``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian puts the core protocol and the extensions.
SYSTEM_XML = (Path("/usr/share/wayland"), Path("/usr/share/wayland-protocols"))
#: The signatures vmsilo carries itself.
OWN_XML = Path(__file__).resolve().parent / "xml"

#: Wire type of each XML ``type``: one character each, as libwayland's signatures spell them.
TYPE_CODES = {
    "int": "i",
    "uint": "u",
    "fixed": "f",
    "string": "s",
    "object": "o",
    "new_id": "n",
    "array": "a",
    "fd": "h",
}


class ProtocolFileError(Exception):
    """An XML file that does not describe a Wayland protocol."""


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    code: str  # one of TYPE_CODES' values
    interface: str | None  # for ``o`` and ``n``; ``None`` on an untyped new_id (bind)
    nullable: bool


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    opcode: int
    args: tuple[Arg, ...]
    destructor: bool
    #: how many fds the message carries (they travel beside the bytes, in order)
    nfds: int = field(init=False)
    #: whether the message needs decoding at all (new objects or fds); others pass as bytes
    plain: bool = field(init=False)
    #: whether it names other objects (which may need their ids translated)
    objects: bool = field(init=False)

    def __post_init__(self) -> None:
        nfds = sum(1 for a in self.args if a.code == "h")
        object.__setattr__(self, "nfds", nfds)
        object.__setattr__(self, "plain", not any(a.code in "nh" for a in self.args))
        object.__setattr__(self, "objects", any(a.code == "o" for a in self.args))


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    version: int
    requests: tuple[Message, ...]
    events: tuple[Message, ...]


def _messages(elem: ET.Element, tag: str) -> tuple[Message, ...]:
    out = []
    for opcode, m in enumerate(elem.findall(tag)):
        args = []
        for a in m.findall("arg"):
            kind = a.get("type", "")
            if kind not in TYPE_CODES:
                raise ProtocolFileError(f"{m.get('name')}: unknown arg type {kind!r}")
            args.append(
                Arg(
                    name=a.get("name", ""),
                    code=TYPE_CODES[kind],
                    interface=a.get("interface"),
                    nullable=a.get("allow-null") == "true",
                )
            )
        out.append(Message(m.get("name", ""), opcode, tuple(args), m.get("type") == "destructor"))
    return tuple(out)


def parse_file(path: Path) -> Iterator[Interface]:
    """The interfaces one protocol XML file describes."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ProtocolFileError(f"{path}: {e}") from e
    if root.tag != "protocol":
        raise ProtocolFileError(f"{path}: not a Wayland protocol file")
    for elem in root.findall("interface"):
        yield Interface(
            name=elem.get("name", ""),
            version=int(elem.get("version", "1")),
            requests=_messages(elem, "request"),
            events=_messages(elem, "event"),
        )


def xml_files(dirs: Iterable[Path]) -> list[Path]:
    """Every ``*.xml`` under ``dirs``, in a stable order (later files win on a name clash)."""
    found: list[Path] = []
    for d in dirs:
        if d.is_file():
            found.append(d)
        elif d.is_dir():
            found.extend(sorted(p for p in d.rglob("*.xml") if p.is_file()))
    return found


def load(dirs: Iterable[Path] = (*SYSTEM_XML, OWN_XML)) -> dict[str, Interface]:
    """Interface name → signatures, from every protocol file under ``dirs``.

    When two files describe one interface (e.g. xdg-shell in ``stable`` and an old copy in
    ``unstable``), the higher version wins."""
    out: dict[str, Interface] = {}
    for path in xml_files(dirs):
        for iface in parse_file(path):
            old = out.get(iface.name)
            if old is None or iface.version >= old.version:
                out[iface.name] = iface
    if "wl_display" not in out or "wl_registry" not in out:
        raise ProtocolFileError("wayland.xml not found (Debian: apt-get install libwayland-dev)")
    return out
