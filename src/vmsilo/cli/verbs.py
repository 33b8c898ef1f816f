"""Registry of the verbs that live in their own modules (image, start, stop, status, …).

Each registers its sub-parser and sets ``handler(args, out=, err=, users=) -> int``.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    assert isinstance(sub, argparse._SubParsersAction)
