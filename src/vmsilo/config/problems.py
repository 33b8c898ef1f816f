"""Configuration problems: collected, never raised one at a time.

SPEC §2 wants every problem reported at once as ``<path>: <what is wrong> (hint: …)``, so each
validation stage appends :class:`Problem` values and the caller raises one
:class:`ConfigErrors` at the end of a stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmsilo.errors import VmsiloError


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the configuration, located by its dotted path."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigErrors(VmsiloError):
    """All the problems of one configuration, in the order they were found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return self.message


def join_path(*parts: str | int) -> str:
    """Render a location as SPEC §2 spells it: ``vms.a.additionalDisks[0].path``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = part
    return out


def raise_if_any(problems: Iterable[Problem]) -> None:
    found = list(problems)
    if found:
        raise ConfigErrors(found)
