"""A cache of the validated plan, so a cold ``vm-run`` can start the VMM sooner.

Validating the config means importing pydantic and building its models: ~0.15 s of a cold ``vm-run``
before the VMM can start. The plan is a pure function of the config text, the host user's ids
and vmsilo's own plan code, so once a root command that starts VMs (``vmsilo start``, ``vm-start``,
``vm-run``'s slow path) or installs them has planned a config, the plan is stored in the runtime
dir keyed by exactly those inputs, and the autostart path reuses it when the key matches. Read-only
verbs (``check``, ``plan``, ``status``, …) never write it. A key mismatch, a missing or unreadable
file, or anything unexpected in it just means "plan the slow way". The file lives in the root-owned
runtime dir, mode 0600, and holds plain JSON decoded into the plan's own dataclasses (no code is
ever loaded from it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import types
import typing
from pathlib import Path
from typing import Any

import vmsilo
from vmsilo.contracts.fs import atomic_write
from vmsilo.plan import model
from vmsilo.plan.model import Plan

CACHE_NAME = ".plan-cache.json"


def cache_key(config_text: str, user: str | None) -> str:
    """sha256 over everything the plan depends on."""
    h = hashlib.sha256()
    h.update(vmsilo.__version__.encode())
    for mod in ("model.py", "build.py", "derive.py", "links.py"):
        with contextlib.suppress(OSError):
            h.update((Path(model.__file__).parent / mod).read_bytes())
    h.update(config_text.encode())
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
            h.update(f"{pw.pw_name}:{pw.pw_uid}:{pw.pw_gid}:{pw.pw_dir}".encode())
        except KeyError:
            h.update(b"no such user")
    return h.hexdigest()


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, vars(model))
    return _HINTS[cls]


def _decode(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = _hints(tp)
        return tp(**{f.name: _decode(hints[f.name], data[f.name]) for f in dataclasses.fields(tp)})
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in data)
        return tuple(_decode(a, v) for a, v in zip(args, data, strict=True))
    if origin is dict:
        _, value_type = typing.get_args(tp)
        return {k: _decode(value_type, v) for k, v in data.items()}
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(data, dict):
                return _decode(arg, data)
            if typing.get_origin(arg) is None and isinstance(arg, type) and isinstance(data, arg):
                return data
        return data
    if origin is typing.Literal:
        if data not in typing.get_args(tp):
            raise ValueError(f"{data!r} not in {tp}")
        return data
    if tp in (str, int, bool) and not isinstance(data, tp):
        raise ValueError(f"expected {tp.__name__}, got {data!r}")
    return data


def save_plan(plan: Plan, config_text: str, user: str) -> None:
    """Store ``plan`` for this config text (root only; silently skipped otherwise)."""
    if os.geteuid() != 0 or not os.path.isdir(plan.runtime_dir):
        return
    path = Path(plan.runtime_dir) / CACHE_NAME
    with contextlib.suppress(OSError):
        text = json.dumps({"key": cache_key(config_text, user), "plan": _encode(plan)})
        atomic_write(path, text, 0o600)


def load_plan(runtime_dir: str, config_text: str, user: str | None) -> Plan | None:
    """The cached plan for this exact config text and user, or None."""
    path = Path(runtime_dir) / CACHE_NAME
    try:
        st = path.stat()
        if st.st_uid != 0 or st.st_mode & 0o077:
            return None  # only trust a file nobody but root could have written
        data = json.loads(path.read_text())
        if data.get("key") != cache_key(config_text, user):
            return None
        plan = _decode(Plan, data["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan if isinstance(plan, Plan) else None
