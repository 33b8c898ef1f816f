"""Where the config file and the runtime directory are, for every entry point.

Kept import-light (stdlib only): vm-run's fast path reads the raw TOML and takes these
spellings from here instead of loading the typed config model, which uses them too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

DEFAULT_CONFIG = "/etc/vmsilo/vmsilo.toml"
#: ``runtimeDir``'s default (the config model's default, and vm-run's when the key is absent).
DEFAULT_RUNTIME_DIR = "/run/vmsilo"
VM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def config_path(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``-c FILE``, else ``$VMSILO_CONFIG``, else the system file — for every entry point."""
    environ = os.environ if env is None else env
    return Path(explicit or environ.get("VMSILO_CONFIG") or DEFAULT_CONFIG)


def command_socket(runtime_dir: str, vm: str) -> str:
    """``R/<vm>-command.socket``: where vm-run connects (the plan and the socket unit use it)."""
    return f"{runtime_dir}/{vm}-command.socket"
