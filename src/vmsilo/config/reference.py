"""Write ``docs/CONFIG.md`` from the configuration model, so the reference cannot drift from it.

As mkosi does, the model is the one table of settings: each field of
:mod:`vmsilo.config.model` carries its default (the same value validation uses) and its
description, and each scalar type of :mod:`vmsilo.config.types` carries a :class:`Label`.
This module only walks the models and lays the rows out in the camelCase spelling users write,
with the prose that tables cannot hold around them. ``tests/test_config_reference.py`` fails when
the file and the model disagree; regenerate with::

    .venv/bin/python -m vmsilo.config.reference -o docs/CONFIG.md
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from annotated_types import Ge, Le
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vmsilo.config.model import GlobalConfig, Interface, KvModel, VmConfig
from vmsilo.config.types import Label
from vmsilo.defaults import CONFIG_FILE

REGENERATE = ".venv/bin/python -m vmsilo.config.reference -o docs/CONFIG.md"

Row = tuple[str, str, str, str]  # key, type, default, description

INTRO = f"""\
# vmsilo configuration reference

<!-- Generated from src/vmsilo/config/model.py by `{REGENERATE}`
     (or `make config-doc`): edit the model, not this file. -->

One TOML file: `{CONFIG_FILE}`, or `-c FILE`, or `$VMSILO_CONFIG` (every command).
Key names keep the original NixOS module's camelCase. Unknown keys are errors (with a "did you
mean"); `vmsilo check` lists every problem at once as `path: what is wrong (hint: …)` and exits 2.
A key written `a.b` is key `b` of table `a`; `<name>` stands for a name you choose.
"""

GLOBAL_HEAD = """\
## Global keys
"""

VM_HEAD = """\
## Per VM: `[vms.<name>]`

Names: `^[a-z][a-z0-9-]{0,62}$`, not `host`. Where a default depends on the hypervisor
(`gpu`, `sound`) the plan decides it; `vmsilo plan VM` shows what was chosen.
"""

INTERFACE_HEAD = """\
## Network interfaces: `[vms.<name>.network.interfaces.<ifname>]`

`<ifname>` is the name the guest sees (a Linux interface name, at most 15 characters). A VM
with `network.netvm` also gets an interface `upstream`, and a netvm one per client, each with
a /31 from `netvmRange`; at most 10 interfaces per VM in all.
"""

OUTRO = """\
Values that end up on a crosvm command line may not contain `, [ ] " ' =`; kernel parameters
must be printable ASCII words without quotes that do not start with `-`; the whole kernel
command line is at most 2048 bytes. `vmsilo plan [VM] [--json]` shows every derived value.
"""


def render() -> str:
    """The whole of ``docs/CONFIG.md``."""
    parts = [
        INTRO,
        GLOBAL_HEAD,
        _table(rows(GlobalConfig, skip={"vms"})),
        VM_HEAD,
        _table(rows(VmConfig)),
        INTERFACE_HEAD,
        _table(rows(Interface)),
        OUTRO,
    ]
    return "\n".join(parts)


def rows(
    model: type[BaseModel], prefix: str = "", skip: frozenset[str] | set[str] = frozenset()
) -> list[Row]:
    """One row per setting of ``model``; nested tables are flattened into dotted keys."""
    out: list[Row] = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        path = prefix + (field.alias or name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        ann = field.annotation
        nested = _plain_model(ann)
        if nested is not None:  # a sub-table with its own keys: only its keys are rows
            out += rows(nested, f"{path}.")
            continue
        out.append((path, _type(ann, field.metadata), _default(field), _description(field, ann)))
        value = _dict_value(ann)
        inner = _plain_model(value) if value is not None else _model_in_union(ann)
        if inner is Interface:
            continue  # its own section below
        if inner is not None:
            placeholder = str(extra.get("key", "")) if value is not None else ""
            out += rows(inner, f"{path}.{placeholder}." if placeholder else f"{path}.")
    return out


def _table(found: list[Row]) -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, kind, default, text in found:
        cells = (f"`{key}`", kind, default, text)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plain_model(tp: Any) -> type[BaseModel] | None:
    """``tp`` itself when it is a table whose keys are documented (not a crosvm key table)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel) and not issubclass(tp, KvModel):
        return tp
    return None


def _dict_value(tp: Any) -> Any:
    return typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None


def _model_in_union(tp: Any) -> type[BaseModel] | None:
    """The table alternative of ``bool | table``-style settings (``gpu``)."""
    for arg in _alternatives(tp):
        found = _plain_model(_strip(arg))
        if found is not None:
            return found
    return None


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _alternatives(tp: Any) -> Iterator[Any]:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            yield from _alternatives(arg)
    else:
        yield tp


def _type(tp: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """How a value of ``tp`` is described to a user, e.g. ``list of IPv4 network``."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *more = typing.get_args(tp)
        return _type(base, [*metadata, *more])
    # constraints written as Field(ge=…) inside an alias (PositiveInt) stay FieldInfo there
    metadata = [
        m for item in metadata for m in (item.metadata if isinstance(item, FieldInfo) else [item])
    ]
    for item in metadata:
        if isinstance(item, Label):
            return item.text
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = [_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(dict.fromkeys(kinds))
    if origin is typing.Literal:
        return " | ".join(f'`"{v}"`' for v in typing.get_args(tp))
    if origin is list:
        return "list of " + _type(typing.get_args(tp)[0])
    if origin is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "table"
    if tp is bool:
        return "bool"
    if tp is int:
        low = next((m.ge for m in metadata if isinstance(m, Ge)), None)
        high = next((m.le for m in metadata if isinstance(m, Le)), None)
        if low is not None and high is not None:
            return f"int {low}–{high}"
        return f"int ≥ {low}" if low is not None else "int"
    if tp is str:
        return "string"
    return str(getattr(tp, "__name__", tp))


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown_default" in extra:
        return str(extra["shown_default"])
    if field.is_required():
        return "required"
    return _toml(field.default)


def _toml(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list | tuple):
        return "`[]`" if not value else f"`{list(value)!r}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value!r}`"
    return f"`{value}`"


def _description(field: FieldInfo, tp: Any) -> str:
    text = field.description or ""
    kv = _kv_model(tp)
    if kv is not None:  # crosvm's own key=value table: list the keys it takes
        keys = ", ".join(f"`{f.alias or n}`" for n, f in kv.model_fields.items())
        text = f"{text}; keys: {keys}" if text else f"keys: {keys}"
    return text


def _kv_model(tp: Any) -> type[KvModel] | None:
    tp = _strip(tp)
    if typing.get_origin(tp) is list:
        return _kv_model(typing.get_args(tp)[0])
    for arg in _alternatives(tp):
        if isinstance(arg, type) and issubclass(arg, KvModel):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmsilo.config.reference",
        description="Write the configuration reference (docs/CONFIG.md) from the model.",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="default: standard output")
    args = parser.parse_args(argv)
    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
