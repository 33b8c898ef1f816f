"""The human tables of ``vmsilo status`` and ``vmsilo image list`` (``--json`` stays raw).

Sizes in MiB/GiB, dates and ages instead of epoch seconds, words instead of ``True``; a
running VM's values are those it runs with, a changed config value shown beside them.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from vmsilo.image.store import ImageInfo


def human_size(n: int) -> str:
    """Bytes as MiB below a GiB, else GiB (one decimal)."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def human_duration(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3 h 12 min``, ``2 d 4 h``."""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def human_time(epoch: float, now: float | None = None) -> str:
    """A local date and time, with how long ago."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))
    ago = (now if now is not None else time.time()) - epoch
    return f"{when} ({human_duration(ago)} ago)" if ago >= 0 else when


def _console(out: TextIO) -> Console:
    from rich.console import Console

    isatty = getattr(out, "isatty", lambda: False)
    return Console(file=out, highlight=False, width=None if isatty() else 160)


def _colour(name: str | None) -> Text:
    from rich.color import Color, ColorParseError
    from rich.text import Text

    if not name:
        return Text("")
    try:
        Color.parse(name)
    except ColorParseError:
        return Text(name)
    return Text.assemble(("■ ", name), name)


def _with_config(value: str, row: dict[str, Any], field: str, unit: str = "") -> str:
    """The running value; a changed config value beside it: ``2048 MiB (config: 4096)``."""
    changed = row.get("config_values") or {}
    if field in changed:
        return f"{value} (config: {changed[field]}{unit})"
    return value


def last_exit_text(last: dict[str, Any] | None, now: float | None = None) -> str:
    if not last:
        return ""
    text = str(last.get("reason", ""))
    code = last.get("code")
    if code not in (None, 0) and str(code) not in text:
        text += f" (exit {code})"
    at = last.get("at")
    if isinstance(at, int | float):
        ago = (now if now is not None else time.time()) - at
        if ago >= 0:
            text += f", {human_duration(ago)} ago"
    return text


def print_status(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    """The status table; below it, for each VM whose config changed, what changed."""
    from rich.table import Table

    table = Table(title="vmsilo status")
    columns = (
        "VM",
        "state",
        "id",
        "hypervisor",
        "memory",
        "cpus",
        "pid",
        "uptime",
        "netvm",
        "colour",
        "last exit",
    )
    for col in columns:
        table.add_column(col)
    changed: list[str] = []
    notes: list[str] = []  # said below the table: sound that will not be heard
    for r in rows:
        state = str(r["state"])
        if r.get("restored"):
            state += " (restored)"
        if r.get("config_changed"):
            state += " *"
            what = ", ".join(r.get("config_changes") or []) or "the plan"
            changed.append(f"* {r['name']}: config changed since it started ({what})")
        sound = str(r.get("sound") or "")
        if sound.startswith("unavailable"):
            notes.append(f"! {r['name']}: sound {sound}")
        if r.get("fast_start_note"):
            notes.append(f"! {r['name']}: fastStart: {r['fast_start_note']}")
        uptime = r.get("uptime_s")
        table.add_row(
            str(r["name"]),
            state,
            _with_config(str(r["id"]), r, "id"),
            _with_config(str(r["hypervisor"]), r, "hypervisor"),
            _with_config(f"{r['memory']} MiB", r, "memory", " MiB"),
            _with_config(str(r["cpus"]), r, "cpus"),
            str(r.get("pid") or ""),
            human_duration(uptime) if uptime is not None else "",
            _with_config(str(r.get("netvm") or ""), r, "netvm"),
            _colour(r.get("color")),
            last_exit_text(r.get("last_exit")),
        )
    console = _console(out)
    console.print(table)
    for line in changed:
        console.print(line)
    if changed:
        console.print("  (a VM keeps the plan it started with: stop and start it to apply)")
    for line in notes:
        console.print(line, markup=False, highlight=False)


def print_images(images: Iterable[ImageInfo], out: TextIO, in_use: Collection[Path] = ()) -> None:
    """The image table: name, version, size, build date, current / in use."""
    from rich.table import Table

    used = {Path(p) for p in in_use}
    table = Table(title="vmsilo images")
    for col, justify in (
        ("image", "left"),
        ("version", "left"),
        ("size", "right"),
        ("built", "left"),
        ("status", "left"),
        ("path", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for i in images:
        words = []
        if i.is_current:
            words.append("current")
        if i.path in used or i.path.resolve() in used:
            words.append("in use")
        table.add_row(
            i.name,
            i.version,
            human_size(i.size),
            human_time(i.built),
            ", ".join(words),
            str(i.path),
        )
    _console(out).print(table)
