"""Read the TOML file into a validated :class:`~vmsilo.config.model.Config`.

Validation happens in stages, each collecting every problem it finds before failing: TOML
syntax, then the global keys, then each VM on its own (so one VM's type error does not hide
another's), then the semantic rules of :mod:`vmsilo.config.rules`. Pydantic's errors are
rewritten into SPEC §2's ``path: message (hint: …)`` form, with a "did you mean" for unknown keys.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from vmsilo.config.location import VM_NAME_RE
from vmsilo.config.model import Config, GlobalConfig, VmConfig
from vmsilo.config.problems import ConfigErrors, Problem, join_path
from vmsilo.config.rules import check_config
from vmsilo.config.users import UserLookup, system_users


def load_config(path: Path, users: UserLookup = system_users) -> Config:
    """Parse and validate a config file; raise :class:`ConfigErrors` with every problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigErrors(
            [Problem(str(path), "no such file", "write one (see examples/), or pass -c FILE")]
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigErrors([Problem(str(path), f"cannot read: {e}", "check the file")]) from None
    return parse_config(text, users, source=str(path))


def parse_config(text: str, users: UserLookup = system_users, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigErrors([_toml_problem(source, e, text)]) from None
    return validate_config(data, users)


def validate_config(data: Mapping[str, Any], users: UserLookup = system_users) -> Config:
    """Validate already-parsed TOML data (stages 2–4 above)."""
    problems: list[Problem] = []
    global_part: GlobalConfig | None = None
    try:
        global_part = GlobalConfig.model_validate(data)
    except ValidationError as e:
        problems += pydantic_problems(e, GlobalConfig)

    raw_vms = data.get("vms", {})
    vms: dict[str, VmConfig] = {}
    if isinstance(raw_vms, dict):
        for name, raw in raw_vms.items():
            bad_name = not VM_NAME_RE.match(name) or name == "host"
            if bad_name:
                hint = (
                    "'host' is reserved for network.netvm"
                    if name == "host"
                    else "use lower-case letters, digits and '-', starting with a letter,"
                    " at most 63 characters"
                )
                problems.append(Problem(join_path("vms", name), f"invalid VM name {name!r}", hint))
            try:
                vm = VmConfig.model_validate(raw)
            except ValidationError as e:
                # a bad name does not hide the VM's other problems: all are reported at once
                problems += pydantic_problems(e, VmConfig, prefix=("vms", name))
                continue
            if not bad_name:
                vms[name] = vm
    if global_part is None:
        raise ConfigErrors(problems)

    config = Config.model_construct(
        **{k: getattr(global_part, k) for k in GlobalConfig.model_fields if k != "vms"},
        vms=vms,
    )
    problems += check_config(config, users, skip_vms=set(raw_vms) - set(vms))
    if problems:
        raise ConfigErrors(problems)
    return config


def _toml_problem(source: str, e: tomllib.TOMLDecodeError, text: str) -> Problem:
    # Python 3.11's TOMLDecodeError has no lineno/colno attributes; its message ends with
    # "(at line N, column M)" which we turn into SPEC §2's "line N, column M: message".
    msg = str(e)
    lineno = getattr(e, "lineno", None)
    colno = getattr(e, "colno", None)
    if lineno is None and "(at line " in msg:
        head, _, tail = msg.rpartition(" (at line ")
        parts = tail.rstrip(")").split(", column ")
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            lineno, colno, msg = int(parts[0]), int(parts[1]), head
    elif " (at end of document)" in msg:
        msg = msg.replace(" (at end of document)", "")
        lineno = text.count("\n") + 1
        colno = len(text.rsplit("\n", 1)[-1]) + 1
    if lineno is not None:
        return Problem(f"{source}: line {lineno}, column {colno}", msg, "fix the TOML syntax")
    return Problem(source, msg, "fix the TOML syntax")


def _got(value: Any) -> str:
    """What the user wrote, named as TOML names it."""
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "true/false"),
        (int, "a whole number"),
        (float, "a number with a fraction"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a table"),
    )
    for kind, name in kinds:
        if isinstance(value, kind):
            return name
    return "a date or time"


#: Pydantic's own wording ("Input should be a valid dictionary or instance of AutoShutdown")
#: names Python types and model classes; these say it in the config's terms instead.
_MESSAGES = {
    "int_type": "expected a whole number, got {got}",
    "int_parsing": "expected a whole number, got {got}",
    "int_from_float": "expected a whole number, got {input}",
    "string_type": "expected a string, got {got}",
    "bool_type": "expected true or false, got {got}",
    "bool_parsing": "expected true or false, got {got}",
    "list_type": "expected a list, got {got}",
    "dict_type": "expected a table, got {got}",
    "model_type": "expected a table, got {got}",
    "model_attributes_type": "expected a table, got {got}",
    "greater_than_equal": "{input} is too small: at least {ge}",
    "less_than_equal": "{input} is too large: at most {le}",
    "greater_than": "{input} is too small: more than {gt}",
    "less_than": "{input} is too large: less than {lt}",
    "literal_error": "{input!r} is not one of {expected}",
}


def _message(err: ErrorDetails) -> str:
    template = _MESSAGES.get(err["type"])
    value = err.get("input")
    if template is None:
        return err["msg"].replace("Input should be", "expected")
    return template.format(got=_got(value), input=value, **(err.get("ctx") or {}))


_HINTS = {
    "int_type": "write a whole number without quotes",
    "int_parsing": "write a whole number without quotes",
    "string_type": "write a quoted string",
    "bool_type": "write true or false (without quotes)",
    "list_type": "write a list, e.g. [ ... ]",
    "dict_type": "write a table",
    "model_type": "write a table",
    "model_attributes_type": "write a table",
    "missing": "add this key",
    "greater_than_equal": "raise the value",
    "less_than_equal": "lower the value",
    "literal_error": "use one of the listed values",
    "vmsilo_gpu": "write gpu = true, or gpu = { wayland = true }",
    "vmsilo_home": "write sharedHome = false, or a path like '/shared/work'",
}


def pydantic_problems(
    error: ValidationError, model: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> list[Problem]:
    problems = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("<")))
        # dict keys that fail validation show up as "[key]" entries; drop pydantic's marker
        loc = tuple(p for p in loc if p != "[key]")
        path = join_path(*prefix, *loc) if (prefix or loc) else "<config>"
        problems.append(_problem_for(err, path, model, loc))
    return problems


def _problem_for(
    err: ErrorDetails, path: str, model: type[BaseModel], loc: tuple[str | int, ...]
) -> Problem:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "vmsilo":
        return Problem(path, str(ctx.get("message", err["msg"])), str(ctx.get("hint", "")))
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        known = known_keys(model, loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif known:
            hint = "known keys here: " + ", ".join(sorted(known))
        else:
            hint = "remove it"
        return Problem(path, f"unknown key {key!r}", hint)
    if kind == "missing":
        return Problem(path, "required key is missing", "add this key")
    return Problem(path, _message(err), _HINTS.get(kind, "check the value's type and format"))


def known_keys(model: type[BaseModel], loc: Iterable[str | int]) -> list[str]:
    """The keys allowed at ``loc`` inside ``model`` (aliases, as the user writes them)."""
    current: Any = model
    for part in loc:
        current = _descend(current, part)
        if current is None:
            return []
    current = _unwrap_model(current)
    if current is None:
        return []
    return [f.alias or name for name, f in current.model_fields.items()]


def _unwrap_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _descend(tp: Any, part: str | int) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _descend(typing.get_args(tp)[0], part)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _descend(arg, part)
            if found is not None:
                return found
        return None
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict and isinstance(part, str):
        return typing.get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
        for name, field in tp.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
    return None
