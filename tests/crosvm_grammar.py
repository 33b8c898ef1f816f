"""Check a crosvm command line against upstream crosvm's real command-line grammar.

Why this exists
---------------
vmsilo builds ``crosvm ... run ...`` command lines, but crosvm cannot be installed where
the tests run. Without a check, a command line that upstream crosvm rejects (an option
that only a patched crosvm knows, ``ro=1`` where crosvm wants ``ro=true``, a comma inside
an unquoted path...) would only fail on a user's machine. This module is the project's
proof that its argv is right: it re-implements, in plain Python, the layers crosvm uses
to read its argv, and reports every place where upstream crosvm would refuse to start.

The grammar itself (every option, its kind, its value type, the key=value schemas...) is
data, vendored from upstream into ``tests/data/crosvm-grammar.json`` by
``tests/data/vendor_crosvm_grammar.py``. This module holds the *parsing rules*, each
modelled on the upstream code that applies them:

1. ``main.rs`` pre-processing (:func:`preprocess_argv`): ``--opt=val`` is split at the
   first ``=``, ``-h`` becomes ``--help``, ``--host_ip`` becomes ``--host-ip``.
2. argh 0.1.10 (:func:`validate_argv`): global options before the subcommand, switches vs
   options, values consumed verbatim, duplicates of non-repeatable options, positionals,
   ``--``, ``help``, "Unrecognized argument".
3. serde_keyvalue (:func:`parse_keyvalue`): the ``key=value,...`` parser behind most
   device options, including its positional first key, bare-bool keys, quoting rules,
   ``[...]`` lists and nested structs, integer prefixes, enum variants and aliases,
   ``deny_unknown_fields``, duplicate keys, required keys, and ``--net``'s flattened
   untagged enum with type guessing.
4. The value checks crosvm applies right after parsing (PCI addresses, MAC addresses,
   ``id`` length, ``--serial`` rules...) and the ``run`` validation rules that can be
   decided from the argv alone (``--cid`` vs ``--vsock``, one ``--gpu``, KERNEL or
   ``--bios``, one root disk...).

What is *not* checked is anything that needs the host: whether paths exist, whether a
socket is listening, whether KVM or a tap device is available.

The target build is Linux x86_64 with crosvm's default features (see ``DEFAULT_BUILD``):
options and keys that upstream compiles out of that build are reported as unknown, just
as that crosvm binary would.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shlex
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILDS",
    "DEFAULT_BUILD",
    "GRAMMAR_PATH",
    "KeyValueError",
    "assert_valid",
    "cfg_available",
    "grammar",
    "parse_enum_variant",
    "parse_keyvalue",
    "parse_mac_address",
    "parse_option_value",
    "parse_pci_address",
    "preprocess_argv",
    "validate_argv",
]

GRAMMAR_PATH = Path(__file__).resolve().parent / "data" / "crosvm-grammar.json"

#: Builds the grammar records availability for (the ``available`` field of an option).
#: ``linux_x86_64`` means "some Linux x86_64 build, any cargo features enabled".
BUILDS = ("linux_x86_64_default_features", "linux_x86_64")
DEFAULT_BUILD = "linux_x86_64_default_features"

Spec = Mapping[str, Any]


@functools.cache
def grammar() -> dict[str, Any]:
    """The vendored grammar (``tests/data/crosvm-grammar.json``), loaded once."""
    loaded: dict[str, Any] = json.loads(GRAMMAR_PATH.read_text(encoding="utf-8"))
    return loaded


# ---------------------------------------------------------------------------------------
# cfg handling: which options / keys / variants exist in the target build
# ---------------------------------------------------------------------------------------


def _cfg_token_available(token: str, build: str) -> bool:
    """Decide one informal cfg token of the grammar (``unix``, ``feature audio_cras``...)."""
    token = token.strip()
    if token.startswith("feature"):
        # Cargo features that are not default are only present in "any features" builds.
        return build == "linux_x86_64"
    if token in {"unix", "linux", "linux/android", "x86_64", "target_arch=x86_64"}:
        return True
    if token in {"windows", "aarch64", "target_arch=aarch64"}:
        return False
    raise ValueError(f"crosvm_grammar does not understand cfg token {token!r}")


def cfg_available(cfg: str | None, build: str = DEFAULT_BUILD) -> bool:
    """Whether a key/variant ``cfg`` string of the grammar is satisfied by ``build``.

    Key-level cfgs in the grammar are short informal strings such as ``"windows"``,
    ``"target_arch=aarch64"`` or ``"unix + feature audio_cras"``. An unknown token raises,
    so that a grammar update with new cfg spellings cannot silently loosen the checks.
    """
    if cfg is None:
        return True
    return all(_cfg_token_available(token, build) for token in cfg.split("+"))


def _option_available(spec: Spec, build: str) -> bool:
    available = spec.get("available")
    if available is None:
        return True
    return bool(available[build])


# ---------------------------------------------------------------------------------------
# Rust scalar parsing
# ---------------------------------------------------------------------------------------

_INT_RANGES: dict[str, tuple[int, int]] = {
    "u8": (0, 2**8 - 1),
    "u16": (0, 2**16 - 1),
    "u32": (0, 2**32 - 1),
    "u64": (0, 2**64 - 1),
    "usize": (0, 2**64 - 1),
    "i8": (-(2**7), 2**7 - 1),
    "i16": (-(2**15), 2**15 - 1),
    "i32": (-(2**31), 2**31 - 1),
    "i64": (-(2**63), 2**63 - 1),
    "isize": (-(2**63), 2**63 - 1),
    "NonZeroU32": (1, 2**32 - 1),
    "NonZeroUsize": (1, 2**64 - 1),
}


def _int_range(rust: str | None) -> tuple[int, int]:
    if rust is None:
        return _INT_RANGES["i64"]
    try:
        return _INT_RANGES[rust]
    except KeyError:
        raise ValueError(f"crosvm_grammar does not know the Rust integer type {rust!r}") from None


def rust_from_str_radix(text: str, radix: int, rust: str | None) -> int | None:
    """Mirror Rust's ``<int>::from_str_radix``: optional ``+`` (or ``-`` for signed types),
    then at least one digit of ``radix``; the value must fit the type. None if rejected.

    With ``radix=10`` this is also Rust's ``FromStr`` for integers, which argh uses for
    plain integer options such as ``--cid 3`` (so ``0x10`` is rejected there).
    """
    low, high = _int_range(rust)
    signed = low < 0
    digits = text
    negative = False
    if digits[:1] in {"+", "-"} and len(digits) > 1:
        if digits[0] == "-":
            if not signed:
                return None
            negative = True
        digits = digits[1:]
    if not digits:
        return None
    value = 0
    for char in digits:
        try:
            digit = int(char, 36)
        except ValueError:
            return None
        if digit >= radix:
            return None
        value = value * radix + digit
    if negative:
        value = -value
    if not low <= value <= high:
        return None
    return value


def parse_pci_address(text: str) -> tuple[int, int, int]:
    """Mirror ``devices::PciAddress::from_str``: ``[DOMAIN:]BUS:DEV.FUNC``, unprefixed hex.

    The domain must be 0, the bus at most 0xff, the device at most 0x1f and the function
    at most 7. Returns ``(bus, device, function)``; raises ValueError otherwise.
    """
    rest, dot, func_s = text.rpartition(".")
    if not dot:
        raise ValueError(f"PCI address {text!r} is missing the '.' before the function")
    bus_domain, colon, dev_s = rest.rpartition(":")
    if not colon:
        raise ValueError(f"PCI address {text!r} is missing the ':' before the device")
    domain_s, colon, bus_s = bus_domain.rpartition(":")
    if not colon:
        domain_s = "0"
    parts = {"function": func_s, "device": dev_s, "bus": bus_s, "domain": domain_s}
    values: dict[str, int] = {}
    for name in ("function", "device", "bus"):
        parsed = rust_from_str_radix(parts[name], 16, "u32")
        if parsed is None:
            raise ValueError(f"PCI address {text!r}: {name} {parts[name]!r} is not hex")
        values[name] = parsed
    if ":" in domain_s:
        raise ValueError(f"PCI address {text!r} has too many components")
    domain = rust_from_str_radix(domain_s, 16, "u32")
    if domain is None:
        raise ValueError(f"PCI address {text!r}: domain {domain_s!r} is not hex")
    if values["bus"] > 0xFF:
        raise ValueError(f"PCI address {text!r}: bus {values['bus']:#x} is above 0xff")
    if values["device"] > 0x1F:
        raise ValueError(f"PCI address {text!r}: device {values['device']:#x} is above 0x1f")
    if values["function"] > 7:
        raise ValueError(f"PCI address {text!r}: function {values['function']} is above 7")
    if domain != 0:
        raise ValueError(f"PCI address {text!r}: only PCI domain 0 is supported")
    return values["bus"], values["device"], values["function"]


def parse_mac_address(text: str) -> tuple[int, ...]:
    """Mirror ``net_util::MacAddress::from_str``: six ``:``-separated hex octets."""
    octets = text.split(":")
    if len(octets) != 6:
        raise ValueError(f"MAC address {text!r} must have 6 ':'-separated octets")
    values = []
    for octet in octets:
        value = rust_from_str_radix(octet, 16, "u8")
        if value is None:
            raise ValueError(f"MAC address {text!r}: {octet!r} is not a hex octet")
        values.append(value)
    return tuple(values)


def parse_ipv4(text: str) -> str:
    """Mirror ``std::net::Ipv4Addr::from_str`` (strict dotted quad, no leading zeros)."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def parse_cpuset(text: str) -> list[int]:
    """Mirror ``arch::CpuSet::from_str``: ``0,1-3,5`` (ascending ranges)."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        start = rust_from_str_radix(first, 10, "usize")
        end = rust_from_str_radix(last, 10, "usize") if dash else start
        if start is None or end is None:
            raise ValueError(f"invalid CPU set {text!r}: {part!r} is not a CPU or CPU range")
        if end < start:
            raise ValueError(f"invalid CPU set {text!r}: range {part!r} is descending")
        cpus.extend(range(start, end + 1))
    return cpus


# ---------------------------------------------------------------------------------------
# serde_keyvalue
# ---------------------------------------------------------------------------------------


class KeyValueError(ValueError):
    """A key=value string that upstream serde_keyvalue (or crosvm's checks) would reject.

    ``key`` is the key being parsed when the error happened (dotted for nested structs),
    ``position`` the character offset in the input, both when known.
    """

    def __init__(self, message: str, *, key: str | None = None, position: int | None = None):
        self.message = message
        self.key = key
        self.position = position
        where = []
        if key:
            where.append(f"key '{key}'")
        if position is not None:
            where.append(f"position {position}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


# serde_keyvalue's any_identifier: ASCII alphanumeric or '_', then also '-'.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# any_number: optional '-', optional radix prefix, then nom's alphanumeric1 (ASCII).
_NUMBER = re.compile(r"(-?)(0x|0o|0b)?([A-Za-z0-9]+)")
_RADIX = {"0x": 16, "0o": 8, "0b": 2, None: 10}
# An unquoted string runs up to the next ',', '[', ']' and may not contain quotes.
_UNQUOTED = re.compile(r"""[^,\[\]"']+""")


@dataclass
class _Fields:
    """The keys of one struct (or struct-like enum variant) as the deserializer sees them."""

    name: str
    keys: dict[str, Spec]  # canonical key -> spec, only keys present in the build
    absent: dict[str, str]  # keys compiled out of the build -> their cfg
    aliases: dict[str, str]  # every accepted spelling -> canonical key
    deny_unknown: bool
    first: str | None  # the positional first key (None: the first item must be a key)

    @classmethod
    def from_keys(
        cls,
        name: str,
        keys: Mapping[str, Spec],
        *,
        build: str,
        deny_unknown: bool = True,
        positional: bool = True,
    ) -> _Fields:
        present: dict[str, Spec] = {}
        absent: dict[str, str] = {}
        aliases: dict[str, str] = {}
        for key, spec in keys.items():
            if not isinstance(spec, Mapping):
                continue  # e.g. the "cfg" entry of an enum variant
            if not cfg_available(spec.get("cfg"), build):
                absent[key] = str(spec.get("cfg"))
                continue
            present[key] = spec
            aliases[key] = key
            for alias in spec.get("aliases", ()):
                aliases[alias] = key
        # serde's "first declared field" is the first field compiled into this build.
        first = next(iter(present), None) if positional else None
        return cls(name, present, absent, aliases, deny_unknown, first)

    def expected(self) -> str:
        return ", ".join(f"`{key}`" for key in self.keys)


# Enum values the grammar documents (in a "note") as compiled in only with a cargo feature:
# SndParameters.backend -- "cras only with feature audio_cras, aaudio only with feature
# audio_aaudio". Keyed by (schema, key, value).
_FEATURE_GATED_VALUES: dict[tuple[str, str, str], str] = {
    ("SndParameters", "backend", "cras"): "feature audio_cras",
    ("SndParameters", "backend", "aaudio"): "feature audio_aaudio",
}


class _KeyValueParser:
    """A line-by-line model of serde_keyvalue's ``KeyValueDeserializer`` (key_values.rs).

    It is type-directed like the real one: the spec of the key being parsed decides which
    ``deserialize_*`` path runs, so for example a bare key is only accepted for bools, and
    ``tap-name=123`` is guessed to be an integer only where upstream guesses (flattened
    fields and ignored values go through ``deserialize_any``).
    """

    def __init__(self, text: str, build: str):
        self.text = text
        self.pos = 0
        self.build = build
        self.top_struct_parsed = False
        self.key_stack: list[str] = []
        self.schema_stack: list[str] = ["?"]

    # -- low level ---------------------------------------------------------------------

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def at_separator(self) -> bool:
        return self.peek() in {None, ",", "]"}

    def fail(self, message: str) -> KeyValueError:
        key = ".".join(self.key_stack) or None
        return KeyValueError(message, key=key, position=self.pos)

    def describe_here(self) -> str:
        rest = self.text[self.pos :]
        if not rest:
            return "the end of the value"
        return repr(rest if len(rest) <= 30 else rest[:27] + "...")

    def confirm_separator(self) -> None:
        """After a value: ',' (consumed), ']' or the end; anything else is an error."""
        char = self.peek()
        if char == ",":
            self.pos += 1
        elif char not in {None, "]"}:
            raise self.fail(f"expected ',' before {self.describe_here()}")

    def expect_char(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise self.fail(f"expected '{char}' {what}, found {self.describe_here()}")
        self.pos += 1

    def finish(self) -> None:
        if self.pos != len(self.text):
            raise self.fail(f"remaining characters in input: {self.describe_here()}")

    # -- scalars -----------------------------------------------------------------------

    def parse_identifier(self) -> str:
        match = _IDENTIFIER.match(self.text, self.pos)
        if not match:
            raise self.fail(f"expected an identifier, found {self.describe_here()}")
        self.pos = match.end()
        return match.group()

    def scan_number(self, rust: str | None) -> tuple[int, int] | None:
        """``any_number::<T>``: (value, end) if a number of type ``rust`` starts here."""
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            return None
        end = match.end()
        if end < len(self.text) and self.text[end] not in ",]":
            return None  # the number must be followed by a separator
        sign, prefix, digits = match.groups()
        value = rust_from_str_radix(sign + digits, _RADIX[prefix], rust)
        return None if value is None else (value, end)

    def parse_number(self, rust: str | None) -> int:
        scanned = self.scan_number(rust)
        if scanned is None:
            raise self.fail(
                f"invalid number for {rust or 'an integer'} at {self.describe_here()} "
                "(decimal, or 0x/0o/0b prefixed, and within range)"
            )
        value, self.pos = scanned
        return value

    def parse_bool(self) -> bool:
        for word, value in (("true", True), ("false", False)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        raise self.fail(f"expected a boolean ('true' or 'false'), found {self.describe_here()}")

    def parse_string(self) -> str:
        """``any_string``: "double quoted" (\\" and \\\\ escapes), 'single quoted', or
        unquoted up to the next ',', '[' or ']' (non-empty, no quotes)."""
        char = self.peek()
        start = self.pos
        if char == '"':
            out: list[str] = []
            index = self.pos + 1
            while True:
                if index >= len(self.text):
                    raise self.fail("expected a string: unterminated double-quoted string")
                current = self.text[index]
                if current == "\\":
                    escaped = self.text[index + 1 : index + 2]
                    if escaped not in {'"', "\\"}:
                        self.pos = index
                        raise self.fail(
                            'expected a string: only \\" and \\\\ may be escaped in "..."'
                        )
                    out.append(escaped)
                    index += 2
                    continue
                index += 1
                if current == '"':
                    break
                out.append(current)
            value = "".join(out)
            self.pos = index
        elif char == "'":
            end = self.text.find("'", self.pos + 1)
            if end < 0:
                raise self.fail("expected a string: unterminated single-quoted string")
            value = self.text[self.pos + 1 : end]
            self.pos = end + 1
        else:
            match = _UNQUOTED.match(self.text, self.pos)
            if not match:
                raise self.fail(
                    f"expected a string, found {self.describe_here()} "
                    '(an empty value must be written "")'
                )
            value = match.group()
            self.pos = match.end()
        if not self.at_separator():
            bad = self.peek()
            after = self.text[start : self.pos]
            if bad in {'"', "'"}:
                reason = f"\" and ' can only be used in quoted strings: {bad!r} after {after!r}"
            else:
                reason = (
                    f"{bad!r} after {after!r}: an unquoted string ends at ',', '[' or ']', "
                    "and a quoted one at its closing quote"
                )
            raise self.fail(f'{reason} (quote the whole value with "...")')
        return value

    # -- deserialize_any (type guessing) -------------------------------------------------

    def parse_any(self, has_equal: bool) -> object:
        """``deserialize_any``: used for ignored keys and ``#[serde(flatten)]`` fields.

        No type information: a separator means a bool flag, ``[`` a sequence, then it
        tries i64, u64, bool and finally a string -- so ``tap-name=123`` is an integer.
        """
        if self.at_separator():
            return self.parse_bool() if has_equal else True
        if self.peek() == "[":
            return self.parse_seq(lambda: self.parse_any(True))
        for rust in ("i64", "u64"):
            if self.scan_number(rust) is not None:
                return self.parse_number(rust)
        if self.text.startswith(("true", "false"), self.pos):
            return self.parse_bool()
        return self.parse_string()

    # -- compound values -----------------------------------------------------------------

    def parse_seq(self, item: Callable[[], object], length: int | None = None) -> list[object]:
        """``deserialize_seq``/``deserialize_tuple``: ``[a,b,...]``."""
        if self.peek() != "[":
            raise self.fail(f"expected '[' to open a list, found {self.describe_here()}")
        self.pos += 1
        items: list[object] = []
        while self.peek() != "]":
            if length is not None and len(items) == length:
                raise self.fail(f"expected ']' after {length} elements")
            items.append(item())
            self.confirm_separator()
        if length is not None and len(items) != length:
            raise self.fail(f"invalid length {len(items)}, expected a tuple of size {length}")
        self.pos += 1
        return items

    def parse_fields(self, fields: _Fields, *, positional_first: str | None) -> dict[str, object]:
        """``visit_map`` over a struct's items, with serde's duplicate/unknown checks."""
        result: dict[str, object] = {}
        implicit = positional_first
        self.schema_stack.append(fields.name)
        while self.peek() not in {None, "]"}:
            if implicit is not None:
                raw_key, implicit, has_equal = implicit, None, True
            else:
                raw_key = self.parse_identifier()
                char = self.peek()
                has_equal = char == "="
                if has_equal:
                    self.pos += 1
                elif char not in {None, ",", "]"}:
                    self.key_stack.append(raw_key)
                    raise self.fail(f"expected '=' after the key, found {self.describe_here()}")
            key = fields.aliases.get(raw_key)
            self.key_stack.append(raw_key)
            if key is None:
                if fields.deny_unknown and raw_key in fields.absent:
                    raise self.fail(
                        f"unknown field `{raw_key}`: only compiled in with cfg "
                        f"{fields.absent[raw_key]!r}, not in a {self.build} build"
                    )
                if fields.deny_unknown:
                    raise self.fail(
                        f"unknown field `{raw_key}`, expected one of {fields.expected()}"
                    )
                # Without deny_unknown_fields serde skips the key, but its value is still
                # parsed (IgnoredAny goes through deserialize_any).
                self.parse_any(has_equal)
            else:
                if key in result:
                    raise self.fail(f"duplicate field `{key}`")
                result[key] = self.parse_value(fields.keys[key], has_equal)
            self.key_stack.pop()
            self.confirm_separator()
        self.schema_stack.pop()
        return result

    def parse_struct(self, schema_name: str, schema: Spec | None = None) -> dict[str, object]:
        """``deserialize_struct``: only the outermost struct may omit its ``[...]``.

        The first item may omit its key (``--block /disk.img,ro=true``) unless it is an
        identifier followed by ``=``, or an identifier that is itself a field name (so
        ``--block ro`` means ``ro=true``).
        """
        if schema is None:
            schema = grammar()["keyvalue_schemas"][schema_name]
        if "modes" in schema:
            return self.parse_flattened(schema_name, schema)
        fields = _Fields.from_keys(
            schema_name,
            schema["keys"],
            build=self.build,
            deny_unknown=bool(schema.get("deny_unknown_fields", True)),
        )
        nested = self.top_struct_parsed
        self.top_struct_parsed = True
        if nested:
            self.expect_char("[", f"to open a nested {schema_name}")
        positional: str | None = fields.first
        match = _IDENTIFIER.match(self.text, self.pos)
        if match and (
            self.text[match.end() : match.end() + 1] == "=" or match.group() in fields.aliases
        ):
            positional = None
        result = self.parse_fields(fields, positional_first=positional)
        missing = [
            key for key, spec in fields.keys.items() if spec.get("required") and key not in result
        ]
        if missing:
            raise self.fail(f"missing field `{missing[0]}` in {schema_name}")
        if nested:
            self.expect_char("]", f"to close the nested {schema_name}")
        return result

    def parse_flattened(self, schema_name: str, schema: Spec) -> dict[str, object]:
        """A struct with a ``#[serde(flatten)]`` untagged enum (``NetParameters``).

        serde reads such a struct with ``deserialize_map``: there is no positional first
        key, the struct's own fields are typed, and the flattened enum's fields are read
        with ``deserialize_any`` (type guessing) and matched against each variant in turn.
        """
        modes: dict[str, Any] = schema["modes"]
        flattened = {key for mode in modes.values() for key in mode["required"] + mode["optional"]}
        all_fields = _Fields.from_keys(schema_name, schema["keys"], build=self.build)
        typed = {k: v for k, v in all_fields.keys.items() if k not in flattened}
        guessed = {k: {"type": "any"} for k in all_fields.keys if k in flattened}
        fields = _Fields.from_keys(
            schema_name, {**typed, **guessed}, build=self.build, positional=False
        )
        self.top_struct_parsed = True
        result = self.parse_fields(fields, positional_first=None)
        _resolve_flattened_mode(schema_name, schema, result, self.fail)
        return result

    def parse_enum(self, values: Iterable[str], aliases: Mapping[str, str]) -> str:
        """A unit enum variant: an identifier naming a variant (or a serde alias)."""
        start = self.pos
        if self.at_separator():
            raise self.fail("expected an enum variant; this key cannot be given bare")
        variant = self.parse_identifier()
        allowed = list(values)
        if variant in aliases:
            return aliases[variant]
        if variant not in allowed:
            self.pos = start
            expected = ", ".join(f"`{v}`" for v in [*allowed, *aliases])
            raise self.fail(f"unknown variant `{variant}`, expected one of {expected}")
        return variant

    # -- the type-directed dispatcher ----------------------------------------------------

    def parse_value(self, spec: Spec, has_equal: bool) -> object:
        kind = spec["type"]
        if kind == "bool":
            return self.parse_bool() if has_equal else True
        if not has_equal and kind not in {"any", "bool_or_struct"}:
            raise self.fail(f"this {kind} key needs a value (only bool keys may be given bare)")
        if kind == "any":
            return self.parse_any(has_equal)
        if kind == "int":
            value = self.parse_number(spec.get("rust"))
            if "min" in spec and value < spec["min"]:
                raise self.fail(f"{value} is below the minimum {spec['min']}")
            if "max" in spec and value > spec["max"]:
                raise self.fail(f"{value} is above the maximum {spec['max']}")
            return value
        if kind in {"string", "path"}:
            text = self.parse_string()
            max_len = spec.get("max_len")
            if max_len is not None and len(text.encode()) > max_len:
                raise self.fail(f"{text!r} is {len(text.encode())} bytes, at most {max_len}")
            return text
        if kind == "enum":
            start = self.pos
            variant = self.parse_enum(spec["values"], spec.get("value_aliases", {}))
            gate = (self.schema_stack[-1], self.key_stack[-1], variant)
            cfg = _FEATURE_GATED_VALUES.get(gate)
            if cfg is not None and not cfg_available(cfg, self.build):
                self.pos = start
                raise self.fail(
                    f"unknown variant `{variant}`: only compiled in with cfg {cfg!r}, "
                    f"not in a {self.build} build"
                )
            return variant
        if kind == "enum_args":
            # A tuple variant such as GpuDisplayParameters' mode=windowed[W,H].
            variant = self.parse_enum(spec["values"], {})
            template = spec["values"][variant]
            arity = template.count(",") + 1
            args = self.parse_seq(lambda: self.parse_number("u32"), length=arity)
            return {variant: args}
        if kind == "pci_address":
            return self._checked_string(parse_pci_address)
        if kind == "mac_address":
            return self._checked_string(parse_mac_address)
        if kind == "ipv4":
            return self._checked_string(parse_ipv4)
        if kind == "uuid":
            return self._checked_string(lambda text: uuid.UUID(text))
        if kind == "colon_list":
            # deserialize_context_mask: a String split at ':'; unknown names are ignored
            # by rutabaga_gfx, but the String itself must parse (no empty unquoted value).
            return self.parse_string().split(":")
        if kind == "list":
            item = spec["item"]
            return self.parse_seq(lambda: self.parse_value(item, True))
        if kind == "tuple":
            items = spec["items"]
            values = iter(items)
            return self.parse_seq(lambda: self.parse_number(next(values)), length=len(items))
        if kind == "struct":
            return self.parse_struct(spec["schema"])
        if kind == "cpuset_list":
            return self._parse_cpuset_list()
        if kind == "bool_or_struct":
            # NetParameters' vhost-net: a bare flag, true/false, or [device=PATH].
            if not has_equal:
                return True
            if self.peek() == "[":
                return self.parse_struct(spec["schema"])
            return self.parse_bool()
        raise self.fail(f"crosvm_grammar does not know the key type {kind!r}")

    def _checked_string(self, check: Callable[[str], object]) -> str:
        start = self.pos
        text = self.parse_string()
        try:
            check(text)
        except ValueError as error:
            self.pos = start
            raise self.fail(str(error)) from None
        return text

    def _parse_cpuset_list(self) -> list[int]:
        """``CpuSet``'s Deserialize: ``[0,2-3]``, items are numbers or ``A-B`` strings."""

        def item() -> list[int]:
            scanned = self.scan_number("usize")
            if scanned is not None:
                value, self.pos = scanned
                return [value]
            start = self.pos
            text = self.parse_string()
            try:
                return parse_cpuset(text)
            except ValueError as error:
                self.pos = start
                raise self.fail(str(error)) from None

        cpus: list[int] = []
        for chunk in self.parse_seq(item):
            assert isinstance(chunk, list)
            cpus.extend(chunk)
        return cpus


def _resolve_flattened_mode(
    schema_name: str,
    schema: Spec,
    result: dict[str, object],
    fail: Callable[[str], KeyValueError],
) -> str:
    """Match the guessed fields against the untagged enum's variants, as serde does."""
    modes: dict[str, Any] = schema["modes"]
    keys: dict[str, Any] = schema["keys"]
    flattened = {key for mode in modes.values() for key in mode["required"] + mode["optional"]}
    present = {key for key in result if key in flattened}
    reasons: list[str] = []
    for mode_name, mode in modes.items():
        required, optional = set(mode["required"]), set(mode["optional"])
        if not required <= present:
            continue
        extra = present - required - optional
        if extra:
            reasons.append(f"mode {mode_name} does not take {', '.join(sorted(extra))}")
            continue
        problem = next(
            (
                msg
                for key in sorted(present)
                if (msg := _guessed_type_problem(key, keys[key], result[key])) is not None
            ),
            None,
        )
        if problem is None:
            return mode_name
        reasons.append(f"mode {mode_name}: {problem}")
    if not reasons:
        needed = "; ".join(f"{name}: {', '.join(m['required'])}" for name, m in modes.items())
        reasons.append(f"exactly one mode must be given ({needed})")
    raise fail(
        f"data did not match any variant of untagged enum {schema_name} mode: " + "; ".join(reasons)
    )


def _guessed_type_problem(key: str, spec: Spec, value: object) -> str | None:
    """Why a type-guessed value (from ``deserialize_any``) does not fit ``spec``."""
    kind = spec["type"]
    if isinstance(value, bool):
        found = "a bool (the key was given without a value)" if value else "a bool"
    elif isinstance(value, int):
        found = f"an integer ({value})"
    elif isinstance(value, list):
        found = "a list"
    else:
        found = "a string"
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            low, high = _int_range(spec.get("rust"))
            return None if low <= value <= high else f"{key}={value} is out of range"
        return f"{key} must be an integer, got {found} (do not quote it)"
    if not isinstance(value, str):
        numeric = isinstance(value, int) and not isinstance(value, bool)
        hint = f' (quote it: {key}="{value}")' if numeric else ""
        return f"{key} must be a string, but the value was read as {found}{hint}"
    checks: dict[str, Callable[[str], object]] = {
        "mac_address": parse_mac_address,
        "ipv4": parse_ipv4,
        "pci_address": parse_pci_address,
    }
    if kind in checks:
        try:
            checks[kind](value)
        except ValueError as error:
            return f"{key}: {error}"
    return None


# Per-schema checks crosvm applies when it turns a parsed struct into its configuration.
def _validate_serial(params: dict[str, object]) -> str | None:
    hardware = params.get("hardware", "serial")
    num = params.get("num", 1)
    assert isinstance(num, int)
    if params.get("stdin") and "input" in params:
        return "Cannot specify both stdin and input options"
    if num < 1:
        return f"num={num}: Serial port num must be at least 1"
    if hardware == "serial" and num > 4:
        return f"num={num}: Serial port num must be 4 or less for hardware=serial"
    if "pci-address" in params and hardware != "virtio-console":
        return "pci-address is only supported for hardware=virtio-console"
    return None


def _validate_gpu(params: dict[str, object]) -> str | None:
    bar = params.get("pci-bar-size")
    if isinstance(bar, int) and (bar <= 0 or bar & (bar - 1)):
        return f"pci-bar-size={bar} must be a power of two"
    max_displays = params.get("max-num-displays", 16)
    displays = params.get("displays", [])
    assert isinstance(max_displays, int) and isinstance(displays, list)
    if len(displays) > max_displays:
        return f"{len(displays)} displays exceed max-num-displays={max_displays}"
    if ("width" in params) != ("height" in params):
        return "width and height must be given together"
    return None


def _validate_net(params: dict[str, object]) -> str | None:
    if params.get("mrg-rxbuf") and params.get("packed-queue"):
        return "mrg-rxbuf cannot be combined with packed-queue"
    return None


def _validate_fw_cfg(params: dict[str, object]) -> str | None:
    if ("string" in params) == ("path" in params):
        return "exactly one of string= or path= must be given"
    return None


def _validate_file_backed_mapping(params: dict[str, object]) -> str | None:
    if params.get("align"):
        return None
    for key in ("addr", "size"):
        value = params.get(key)
        if isinstance(value, int) and value % 4096:
            return f"{key}={value:#x} must be page aligned (4096) unless align is set"
    return None


def _validate_pmem(params: dict[str, object]) -> str | None:
    if "swap-interval-ms" in params:
        if "vma-size" not in params:
            return "swap-interval-ms needs vma-size"
        if params.get("ro"):
            return "swap-interval-ms only works on a writable (ro=false) pmem"
    return None


_SCHEMA_VALIDATORS: dict[str, Callable[[dict[str, object]], str | None]] = {
    "SerialParameters": _validate_serial,
    "GpuParameters": _validate_gpu,
    "NetParameters": _validate_net,
    "FwCfgParameters": _validate_fw_cfg,
    "FileBackedMappingParameters": _validate_file_backed_mapping,
    "PmemOption": _validate_pmem,
}


def parse_keyvalue(text: str, schema_name: str, *, build: str = DEFAULT_BUILD) -> dict[str, object]:
    """Parse ``text`` the way crosvm parses a key=value option typed ``schema_name``.

    This is serde_keyvalue's ``from_key_values`` plus the checks crosvm runs on the parsed
    struct straight away (``--serial``'s ``validate_serial_parameters``, ``--net``'s mode
    selection, the schema's documented ``validation`` rules). Returns the keys that were
    given, under their canonical names (aliases resolved, enum aliases resolved to the
    canonical variant); defaults are *not* filled in. Raises :class:`KeyValueError` with
    the offending key and position when upstream crosvm would reject the value.
    """
    schemas = grammar()["keyvalue_schemas"]
    if schema_name not in schemas:
        raise KeyError(f"unknown keyvalue schema {schema_name!r}")
    return _parse_with_schema(text, schema_name, schemas[schema_name], build)


def _parse_with_schema(text: str, schema_name: str, schema: Spec, build: str) -> dict[str, object]:
    parser = _KeyValueParser(text, build)
    result = parser.parse_struct(schema_name, schema)
    parser.finish()
    validator = _SCHEMA_VALIDATORS.get(schema_name)
    problem = validator(result) if validator else None
    if problem is not None:
        raise KeyValueError(problem)
    return result


def parse_enum_variant(
    text: str, schema_name: str, *, build: str = DEFAULT_BUILD
) -> dict[str, object]:
    """Parse an enum-typed option value (``--hypervisor kvm[device=/dev/kvm]``).

    Returns ``{"variant": name, **fields}``. A variant with fields may be written bare
    when none of its fields is required; otherwise its ``[key=value,...]`` is mandatory.
    """
    schema = grammar()["enum_schemas"][schema_name]
    parser = _KeyValueParser(text, build)
    variants = {
        name: fields
        for name, fields in schema["variants"].items()
        if cfg_available((fields or {}).get("cfg"), build)
    }
    variant = parser.parse_enum(variants, {})
    fields = variants[variant] or {}
    result: dict[str, object] = {"variant": variant}
    if any(isinstance(spec, Mapping) for spec in fields.values()):
        struct = _Fields.from_keys(f"{schema_name}::{variant}", fields, build=build)
        if parser.peek() == "[":
            parser.pos += 1
            parser.top_struct_parsed = True
            result.update(parser.parse_fields(struct, positional_first=None))
            parser.expect_char("]", f"to close {variant}[...]")
            missing = [k for k, s in struct.keys.items() if s.get("required") and k not in result]
            if missing:
                raise parser.fail(f"missing field `{missing[0]}` in {variant}[...]")
        elif any(spec.get("required") for spec in struct.keys.values()):
            raise parser.fail(f"expected '[' with the fields of {variant}, e.g. {variant}[...]")
    parser.finish()
    return result


# ---------------------------------------------------------------------------------------
# Custom (from_str_fn) option values
# ---------------------------------------------------------------------------------------


def _parse_wayland_sock(value: str) -> tuple[str, str]:
    """``parse_wayland_sock``: ``PATH[,name=NAME]`` -> (name, path)."""
    path, *components = value.split(",")
    name = ""
    for component in components:
        kind, equal, item = component.partition("=")
        if not equal:
            raise ValueError(f"option must be of the form `kind=value`: {component}")
        if kind != "name":
            raise ValueError(f"unrecognized option: {kind}")
        name = item
    return name, path


def _parse_cpu_btreemap_u32(value: str) -> dict[int, int]:
    """``parse_cpu_btreemap_u32``: ``CPU=INT[,CPU=INT...]`` with unique CPUs."""
    parsed: dict[int, int] = {}
    for pair in value.split(","):
        parts = pair.split("=")
        if len(parts) != 2:
            raise ValueError(f"{pair!r}: invalid CPU pair syntax, missing '='")
        cpu = rust_from_str_radix(parts[0], 10, "usize")
        number = rust_from_str_radix(parts[1], 10, "u32")
        if cpu is None or number is None:
            raise ValueError(f"{pair!r}: CPU and value must be decimal integers")
        if cpu in parsed:
            raise ValueError(f"{pair!r}: CPU index must be unique")
        parsed[cpu] = number
    return parsed


def _parse_cpu_affinity(value: str) -> object:
    """``parse_cpu_affinity``: a CPU set, or ``GUEST=CPUSET[:GUEST=CPUSET...]``."""
    if "=" not in value:
        return parse_cpuset(value)
    affinity: dict[int, list[int]] = {}
    for pair in value.split(":"):
        parts = pair.split("=")
        if len(parts) != 2:
            raise ValueError(f"{pair!r}: invalid VCPU assignment syntax")
        guest = rust_from_str_radix(parts[0], 10, "usize")
        if guest is None:
            raise ValueError(f"{pair!r}: CPU index must be a non-negative integer")
        if guest in affinity:
            raise ValueError(f"{pair!r}: VCPU index must be unique")
        affinity[guest] = parse_cpuset(parts[1])
    return affinity


def _parse_mmio_address_range(value: str) -> list[tuple[int, int]]:
    """``parse_mmio_address_range``: ``START-END[,START-END...]``, hex (0x) or decimal."""

    def number(text: str) -> int:
        if text.startswith(("0x", "0X")):
            parsed = rust_from_str_radix(text[2:], 16, "u64")
        else:
            parsed = rust_from_str_radix(text, 10, "u64")
        if parsed is None:
            raise ValueError(f"{text!r}: expected u64 value")
        return parsed

    ranges = []
    for item in value.split(","):
        parts = item.split("-")
        if len(parts) != 2:
            raise ValueError(f"{item!r}: invalid range")
        ranges.append((number(parts[0]), number(parts[1])))
    return ranges


def _split_colon_options(value: str, what: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``A:B:key=value:key=value`` -> (leading components, [(key, value)])."""
    components = value.split(":")
    leading: list[str] = []
    options: list[tuple[str, str]] = []
    for component in components:
        key, equal, item = component.partition("=")
        if not equal:
            if options:
                raise ValueError(f"{what} options must be of the form `kind=value`: {component}")
            leading.append(component)
        else:
            options.append((key, item))
    return leading, options


def _parse_shared_dir(value: str, build: str) -> object:
    """``SharedDir::from_str``: ``SRC_DIR:TAG[:key=value...]``."""
    spec = grammar()["commands"]["run"]["options"]["--shared-dir"]["value"]
    leading, options = _split_colon_options(value, "`shared-dir`")
    if len(leading) < 2:
        raise ValueError("expected SRC_DIR:TAG (missing tag)")
    if len(leading) > 2:
        raise ValueError(f"`shared-dir` options must be of the form `kind=value`: {leading[2]}")
    common: dict[str, Spec] = spec["keys"]
    kind = "p9"
    rest: list[str] = []
    for key, item in options:
        if key == "type":
            if item not in common["type"]["values"]:
                raise ValueError(f"type={item}: must be one of {common['type']['values']}")
            kind = item
        elif key in {"uid", "gid"}:
            if rust_from_str_radix(item, 10, "u32") is None:
                raise ValueError(f"{key}={item}: must be a decimal u32")
        elif key not in common:
            rest.append(f"{key}={item}")
    if kind == "fs" and rest:
        # The fs device's own options are parsed with serde_keyvalue (joined with ',').
        fs_schema = {"deny_unknown_fields": True, "keys": spec["type_fs_keys"]}
        _parse_with_schema(",".join(rest), "shared-dir fs options", fs_schema, build)
    return {"src": leading[0], "tag": leading[1], "type": kind}


def _parse_pmem_ext2(value: str, build: str) -> object:
    """``parse_pmem_ext2_option``: ``PATH[:key=value...]``."""
    spec = grammar()["commands"]["run"]["options"]["--pmem-ext2"]["value"]
    leading, options = _split_colon_options(value, "`pmem-ext2`")
    if len(leading) != 1:
        raise ValueError("expected PATH[:key=value...]")
    keys: dict[str, Spec] = spec["keys"]
    for key, item in options:
        if key not in keys:
            raise ValueError(f"unknown pmem-ext2 option `{key}`")
        if keys[key]["type"] == "int" and rust_from_str_radix(item, 10, keys[key]["rust"]) is None:
            raise ValueError(f"{key}={item}: must be a decimal {keys[key]['rust']}")
    return {"path": leading[0], **dict(options)}


_CUSTOM_PARSERS: dict[str, Callable[[str, str], object]] = {
    "--wayland-sock": lambda value, build: _parse_wayland_sock(value),
    "--cpu-affinity": lambda value, build: _parse_cpu_affinity(value),
    "--cpu-capacity": lambda value, build: _parse_cpu_btreemap_u32(value),
    "--cpu-ipc-ratio": lambda value, build: _parse_cpu_btreemap_u32(value),
    "--dynamic-power-coefficient": lambda value, build: _parse_cpu_btreemap_u32(value),
    "--mmio-address-range": lambda value, build: _parse_mmio_address_range(value),
    "--shared-dir": _parse_shared_dir,
    "--pmem-ext2": _parse_pmem_ext2,
}


def parse_option_value(option: str, spec: Spec, value: str, build: str) -> object:
    """Parse one option value as argh's ``FromArgValue`` / ``from_str_fn`` would.

    Raises ValueError (KeyValueError for key=value values) when crosvm rejects it.
    Value types the grammar only describes loosely (``custom`` options without a parser
    here) are accepted as long as a value is present -- argh already ensured that.
    """
    value_spec = spec["value"]
    kind = value_spec["type"]
    if kind in {"string", "path"}:
        return value
    if kind == "int":
        parsed = rust_from_str_radix(value, 10, value_spec.get("rust"))
        if parsed is None:
            raise ValueError(
                f"expected a decimal {value_spec.get('rust')} (argh uses Rust's FromStr: "
                "no 0x prefix, no spaces, within range)"
            )
        return parsed
    if kind == "bool_word":
        if value not in value_spec["values"]:
            raise ValueError("expected `true` or `false` (Rust's bool::from_str)")
        return value == "true"
    if kind == "keyvalue":
        return parse_keyvalue(value, value_spec["schema"], build=build)
    if kind == "enum_variant":
        return parse_enum_variant(value, value_spec["schema"], build=build)
    if kind == "cpuset":
        return parse_cpuset(value)
    if kind == "ipv4":
        return parse_ipv4(value)
    if kind == "mac_address":
        return parse_mac_address(value)
    if kind == "custom":
        custom = _CUSTOM_PARSERS.get(option)
        return custom(value, build) if custom else value
    raise ValueError(f"crosvm_grammar does not know the option value type {kind!r}")


# ---------------------------------------------------------------------------------------
# argv: main.rs pre-processing and argh
# ---------------------------------------------------------------------------------------


class _Arg(str):
    """An argv element after pre-processing, remembering the element it was split from."""

    split_from: str | None = None

    @classmethod
    def from_split(cls, text: str, original: str) -> _Arg:
        arg = cls(text)
        arg.split_from = original
        return arg


def preprocess_argv(args: Iterable[str]) -> list[str]:
    """crosvm ``main.rs`` ``prepare_argh_args``, applied to every element.

    ``--host_ip`` -> ``--host-ip``; ``-h`` -> ``--help``; any other element longer than one
    character that starts with ``-`` and contains ``=`` is split at the first ``=``. The
    split also hits *values*: ``-p -x=1`` becomes ``-p -x 1``.
    """
    out: list[str] = []
    for arg in args:
        if arg == "--host_ip":
            out.append("--host-ip")
        elif arg == "-h":
            out.append("--help")
        elif len(arg) > 1 and arg.startswith("-") and "=" in arg:
            key, _, value = arg.partition("=")
            out.extend([_Arg.from_split(key, arg), _Arg.from_split(value, arg)])
        else:
            out.append(arg)
    return out


@dataclass
class _Occurrence:
    """One option as argh saw it."""

    option: str  # canonical long name
    spelled: str  # as written (-m, --mem)
    value: str | None
    parsed: object = None
    ok: bool = True

    def label(self) -> str:
        return self.spelled if self.spelled == self.option else f"{self.spelled} ({self.option})"


@dataclass
class _Parsed:
    """What argh collected for one (sub)command."""

    occurrences: dict[str, list[_Occurrence]] = field(default_factory=dict)
    positionals: list[str] = field(default_factory=list)
    help: bool = False

    def has(self, option: str) -> bool:
        return bool(self.occurrences.get(option))

    def values(self, option: str) -> list[_Occurrence]:
        return self.occurrences.get(option, [])


def _lookup_table(options: Mapping[str, Spec]) -> dict[str, str]:
    table = {name: name for name in options}
    for name, spec in options.items():
        if spec.get("short"):
            table[spec["short"]] = name
    return table


def _unknown_option_hint(arg: str, where: str) -> str:
    data = grammar()
    patched = data.get("non_upstream_seen_in_seed", {})
    if arg in patched.get("global", []) or arg in patched.get("run", []):
        return " (not an upstream crosvm option: it only exists in vmsilo's patched crosvm)"
    if where != "global" and arg in data["global_options"]:
        return " (a global option: it must come before the subcommand name)"
    if where == "global" and arg in data["commands"]["run"]["options"]:
        return " (a `run` option: it must come after `run`)"
    return ""


def _parse_command_args(
    command: str,
    options: Mapping[str, Spec],
    args: list[str],
    build: str,
    problems: list[str],
    *,
    stop_at: Callable[[str], bool] | None = None,
) -> tuple[_Parsed, int]:
    """argh's ``parse_struct_args`` for one (sub)command.

    Returns what was collected and the index where parsing stopped (``stop_at`` returns
    True for the subcommand name at top level). Unlike argh, which stops at the first
    error, this keeps going so that one run reports every problem; an unknown option is
    assumed to take as many values as vmsilo's patched crosvm gives it (else none).
    """
    table = _lookup_table(options)
    parsed = _Parsed()
    arity = grammar().get("non_upstream_seen_in_seed", {}).get("arity", {})
    options_ended = False
    index = 0
    where = "global" if stop_at else command
    while index < len(args):
        arg = args[index]
        index += 1
        if not options_ended and arg in {"--help", "help"}:
            parsed.help = True
            problems.append(
                f"{command}: {arg!r} requests help: crosvm prints usage and exits "
                "instead of running"
            )
            continue
        if not options_ended and arg.startswith("-"):
            if arg == "--":
                options_ended = True
                continue
            name = table.get(arg)
            spec = options.get(name) if name else None
            if spec is None or not _option_available(spec, build):
                hint = _unknown_option_hint(arg, where)
                if spec is not None:
                    hint = (
                        f" (compiled only with cfg {' and '.join(spec.get('cfg', []))}; "
                        f"not in a {build} build)"
                    )
                problems.append(f"{command}: Unrecognized argument: {arg}{hint}")
                index += int(arity.get(arg, 0))
                continue
            occurrence = _Occurrence(option=name or arg, spelled=arg, value=None)
            original = getattr(arg, "split_from", None)
            split_value = index < len(args) and getattr(args[index], "split_from", None)
            if not spec["takes_value"] and original is not None and split_value == original:
                problems.append(
                    f"{command}: {original!r}: {arg} is a switch and takes no value; crosvm "
                    f"splits it into {arg!r} {args[index]!r}, and {args[index]!r} becomes a "
                    f"stray positional (write just {arg})"
                )
            if spec["takes_value"]:
                if index >= len(args):
                    problems.append(f"{command}: No value provided for option '{arg}'")
                    continue
                occurrence.value = args[index]
                index += 1
                value_from = getattr(occurrence.value, "split_from", None)
                if value_from is not None and value_from != original:
                    left_over = args[index] if index < len(args) else ""
                    problems.append(
                        f"{command}: {arg} {value_from!r}: crosvm splits {value_from!r} at '=' "
                        f"into {occurrence.value!r} {left_over!r} before parsing, so {arg} "
                        f"gets {occurrence.value!r} and {left_over!r} becomes a stray positional"
                    )
            previous = parsed.occurrences.setdefault(occurrence.option, [])
            if previous and not spec["repeatable"]:
                problems.append(
                    f"{command}: {occurrence.label()} given twice: duplicate values provided "
                    "(this option may appear only once)"
                )
            previous.append(occurrence)
            continue
        if stop_at is not None and stop_at(arg):
            return parsed, index - 1
        parsed.positionals.append(arg)
    return parsed, index


def _check_values(
    command: str, parsed: _Parsed, options: Mapping[str, Spec], build: str
) -> list[str]:
    problems = []
    for name, occurrences in parsed.occurrences.items():
        spec = options[name]
        if not spec["takes_value"]:
            continue
        for occurrence in occurrences:
            assert occurrence.value is not None
            try:
                occurrence.parsed = parse_option_value(name, spec, occurrence.value, build)
            except ValueError as error:
                occurrence.ok = False
                problems.append(f"{command}: {occurrence.label()} {occurrence.value!r}: {error}")
    return problems


def _check_positionals(command: str, parsed: _Parsed, spec: Spec) -> list[str]:
    declared = spec.get("positionals", [])
    problems = []
    for extra in parsed.positionals[len(declared) :]:
        names = ", ".join(p["name"] for p in declared) or "none"
        problems.append(
            f"{command}: Unrecognized argument: {extra} (extra positional argument; "
            f"{command} takes at most {len(declared)}: {names})"
        )
    for index, positional in enumerate(declared):
        if positional.get("required") and index >= len(parsed.positionals):
            problems.append(
                f"{command}: Required positional argument not provided: {positional['name']}"
            )
    return problems


# ---------------------------------------------------------------------------------------
# `run` validation rules
# ---------------------------------------------------------------------------------------

_DISK_OPTIONS = (
    "--block",
    "--disk",
    "--rwdisk",
    "--pmem",
    "--pmem-device",
    "--rw-pmem-device",
    "--scsi-block",
)
_PROTECTED_VM_OPTIONS = (
    "--protected-vm",
    "--protected-vm-with-firmware",
    "--protected-vm-without-firmware",
    "--unprotected-vm-with-firmware",
)


def _parsed_dicts(parsed: _Parsed, option: str) -> list[dict[str, object]]:
    return [
        occurrence.parsed
        for occurrence in parsed.values(option)
        if occurrence.ok and isinstance(occurrence.parsed, dict)
    ]


def _exclusive(parsed: _Parsed, first: str, second: str, why: str = "") -> list[str]:
    if parsed.has(first) and parsed.has(second):
        return [f"run: {first} and {second} are mutually exclusive{why}"]
    return []


def _check_serials(parsed: _Parsed) -> list[str]:
    """crosvm's ``--serial`` rules across options, and its device-creation checks."""
    problems = []
    seen: set[tuple[object, object]] = set()
    console = earlycon = stdin = None
    for params in _parsed_dicts(parsed, "--serial"):
        hardware = params.get("hardware", "serial")
        num = params.get("num", 1)
        serial_type = params.get("type", "sink")
        label = f"--serial hardware={hardware},num={num}"
        if (hardware, num) in seen:
            problems.append(f"run: {label}: (hardware, num) already used by another --serial")
        seen.add((hardware, num))
        if params.get("console"):
            if console:
                problems.append(f"run: {label}: console already set on {console}")
            console = console or label
        if params.get("earlycon"):
            if hardware != "serial":
                problems.append(f"run: {label}: earlycon not supported for hardware {hardware}")
            if earlycon:
                problems.append(f"run: {label}: earlycon already set on {earlycon}")
            earlycon = earlycon or label
        if params.get("stdin"):
            if stdin:
                problems.append(f"run: {label}: stdin already set on {stdin}")
            stdin = stdin or label
        if params.get("input-unix-stream"):
            if serial_type != "unix-stream":
                problems.append(f"run: {label}: input-unix-stream requires type=unix-stream")
            if "input" in params:
                problems.append(f"run: {label}: input-unix-stream cannot be combined with input=")
        needs_path = serial_type in {"file", "unix-stream"} or params.get("input-unix-stream")
        if needs_path and "path" not in params:
            problems.append(f"run: {label}: type={serial_type} (or input-unix-stream) needs path=")
    return problems


def _check_run_rules(parsed: _Parsed) -> list[str]:
    """The ``run`` validation rules that can be decided from the argv alone."""
    problems: list[str] = []
    problems += _exclusive(parsed, "--cid", "--vsock", " (--cid is the deprecated form)")
    problems += _exclusive(parsed, "--suspended", "--suspended-vcpus")
    problems += _exclusive(parsed, "--irqchip", "--split-irqchip")
    problems += _exclusive(parsed, "--hypervisor", "--kvm-device")
    problems += _exclusive(parsed, "--swap", "--disable-sandbox")
    if len(parsed.values("--gpu")) > 1:
        problems.append(f"run: --gpu given {len(parsed.values('--gpu'))} times: at most one --gpu")
    protected = [option for option in _PROTECTED_VM_OPTIONS if parsed.has(option)]
    if len(protected) > 1:
        problems.append(f"run: only one of {', '.join(protected)} may be given")
    if parsed.positionals and parsed.has("--bios"):
        problems.append("run: --bios conflicts with KERNEL (give one executable)")
    if not parsed.positionals and not parsed.has("--bios"):
        problems.append("run: Executable is not specified: give a KERNEL positional or --bios")
    roots = sum(
        bool(params.get("root")) for opt in _DISK_OPTIONS for params in _parsed_dicts(parsed, opt)
    )
    roots += len(parsed.values("--root")) + len(parsed.values("--rwroot"))
    if roots > 1:
        problems.append(f"run: {roots} root disks (root=true, --root, --rwroot): only one allowed")
    if parsed.has("--unmap-guest-memory-on-fork") and not parsed.has("--disable-sandbox"):
        problems.append("run: --unmap-guest-memory-on-fork requires --disable-sandbox")
    for option in ("--balloon-page-reporting", "--balloon-control"):
        if parsed.has(option) and parsed.has("--no-balloon"):
            problems.append(f"run: {option} requires the balloon device, but --no-balloon is set")
    cpus = _parsed_dicts(parsed, "--cpus")
    clusters = any(params.get("clusters") for params in cpus)
    if clusters and parsed.has("--cpu-cluster"):
        problems.append("run: cannot specify both --cpus clusters=[...] and --cpu-cluster")
    if parsed.has("--host-cpu-topology"):
        for option in ("--no-smt", "--cpu-affinity", "--cpu-capacity"):
            if parsed.has(option):
                problems.append(f"run: --host-cpu-topology conflicts with {option}")
        if clusters:
            problems.append("run: --host-cpu-topology conflicts with --cpus clusters=[...]")
    names: dict[str, str] = {}
    for occurrence in parsed.values("--wayland-sock"):
        if occurrence.ok and isinstance(occurrence.parsed, tuple):
            name, path = occurrence.parsed
            if name in names:
                label = f"name={name}" if name else "the unnamed socket"
                problems.append(f"run: --wayland-sock {label} given twice ({names[name]}, {path})")
            names[name] = path
    problems += _check_serials(parsed)
    return problems


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def validate_argv(argv: list[str], *, build: str = DEFAULT_BUILD) -> list[str]:
    """Every reason upstream crosvm would refuse ``argv``; an empty list means it accepts it.

    ``argv[0]`` is the crosvm binary. Global options come first, then a subcommand
    (``run`` and the control commands vmsilo runs are vendored) and its arguments. ``build`` selects
    which compiled-in options and keys exist (see ``BUILDS``).
    """
    if build not in BUILDS:
        raise ValueError(f"build must be one of {BUILDS}")
    if not argv:
        return ["argv is empty: argv[0] must be the crosvm binary"]
    data = grammar()
    args = preprocess_argv(argv[1:])
    problems: list[str] = []
    commands = data["commands"]

    def is_subcommand(arg: str) -> bool:
        return arg in commands or arg in data["other_commands"]

    global_parsed, stop = _parse_command_args(
        "crosvm", data["global_options"], args, build, problems, stop_at=is_subcommand
    )
    problems += _check_values("crosvm", global_parsed, data["global_options"], build)
    for stray in global_parsed.positionals:
        problems.append(f"crosvm: Unrecognized argument: {stray} (expected a subcommand)")
    if stop >= len(args):
        problems.append(f"crosvm: no subcommand given (one of: {', '.join(commands)}, ...)")
        return problems
    command = args[stop]
    if command not in commands:
        problems.append(
            f"crosvm: subcommand {command!r} exists upstream but is not covered by "
            "tests/data/crosvm-grammar.json (vendor it first)"
        )
        return problems
    spec = commands[command]
    rest = args[stop + 1 :]
    while "subcommands" in spec:  # e.g. `snapshot take`: argh's nested subcommand enum
        subcommands = spec["subcommands"]
        outer, at = _parse_command_args(
            command,
            spec["options"],
            rest,
            build,
            problems,
            stop_at=lambda a, names=subcommands: a in names,
        )
        problems += _check_values(command, outer, spec["options"], build)
        if at >= len(rest):
            problems.append(f"{command}: no subcommand given (one of: {', '.join(subcommands)})")
            return problems
        command, spec, rest = f"{command} {rest[at]}", subcommands[rest[at]], rest[at + 1 :]
    parsed, _ = _parse_command_args(command, spec["options"], rest, build, problems)
    problems += _check_values(command, parsed, spec["options"], build)
    problems += _check_positionals(command, parsed, spec)
    if command == "run":
        problems += _check_run_rules(parsed)
    return problems


def assert_valid(argv: list[str], *, build: str = DEFAULT_BUILD) -> None:
    """Raise AssertionError listing every problem :func:`validate_argv` finds in ``argv``."""
    problems = validate_argv(argv, build=build)
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        command = " \\\n    ".join(shlex.quote(arg) for arg in argv)
        raise AssertionError(
            f"upstream crosvm would reject this command line ({len(problems)} problem(s)):\n"
            f"{listing}\nargv:\n    {command}"
        )
