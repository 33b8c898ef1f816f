"""What a ``vmsilo doctor`` check reports (a stdlib-only leaf: the backends' checks return
these too, without importing the doctor and what it imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    hint: str = ""
