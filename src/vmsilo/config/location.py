"""Where the config file is, for every entry point, and what a VM name looks like.

Kept import-light (stdlib only): vm-run's fast path reads the raw TOML and uses these (and
:mod:`vmsilo.defaults`) instead of loading the typed config model, which uses them too.
"""

from __future__ import annotations

import os
import re

from vmsilo.defaults import CONFIG_FILE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see vmsilo.cli.vm_run)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

DEFAULT_CONFIG = CONFIG_FILE
VM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def config_file(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``-c FILE``, else ``$VMSILO_CONFIG``, else the system file — for every entry point."""
    environ = os.environ if env is None else env
    return explicit or environ.get("VMSILO_CONFIG") or DEFAULT_CONFIG


def config_path(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """:func:`config_file` as a Path."""
    from pathlib import Path  # not at import: vm-run's warm path needs no pathlib

    return Path(config_file(explicit, env))
