"""``vmsilo image gc``: remove image versions that are not ``current`` and that no running VM uses,
and fastStart's saved states that no current key uses (SPEC §10).

Which versions running VMs use is the lifecycle app's to say
(:meth:`vmsilo.lifecycle.base.App.images_in_use`; the rules are in
:mod:`vmsilo.lifecycle.images`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vmsilo.cli.common import load
from vmsilo.config.users import UserLookup

if TYPE_CHECKING:
    from vmsilo.lifecycle.base import App


def register(isub: Any) -> None:
    """Add ``gc`` to the ``vmsilo image`` sub-parsers."""
    p = isub.add_parser("gc", help="remove image versions no running VM uses (keeps current)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_image_gc)


def _tree_size(path: Path) -> int:
    """Bytes allocated under ``path`` (sparse files count what they hold)."""
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.lstat().st_blocks * 512
    return total


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_image_gc(
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    users: UserLookup | None,
    app: App | None,
) -> int:
    from vmsilo.image.store import gc_images
    from vmsilo.lifecycle.app import open_app
    from vmsilo.lifecycle.images import stale_saved_states

    loaded = load(args.config, users)
    plan = loaded.plan
    in_use, notes = (app or open_app(loaded.path, state_dir=loaded.plan.state_dir)).images_in_use(
        plan
    )
    removed = gc_images(Path(plan.state_dir), in_use, dry_run=args.dry_run)
    freed = sum(i.size for i in removed)
    states = stale_saved_states(plan)
    states_size = sum(_tree_size(p) for p in states)
    if not args.dry_run:
        for path in states:
            shutil.rmtree(path, ignore_errors=True)
    if args.json:
        json.dump(
            {
                "removed": [
                    {"name": i.name, "version": i.version, "path": str(i.path), "size": i.size}
                    for i in removed
                ],
                "freed": freed,
                "savedStates": [str(p) for p in states],
                "savedStatesFreed": states_size,
                "dryRun": bool(args.dry_run),
                "notes": notes,
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    for note in notes:
        print(note, file=err)
    verb = "would remove" if args.dry_run else "removed"
    for i in removed:
        print(f"{verb} {i.name} {i.version} ({_size(i.size)})", file=out)
    for path in states:
        print(f"{verb} saved state {path} ({_size(_tree_size(path))})", file=out)
    if not removed and not states:
        print("nothing to remove", file=out)
    elif not removed:
        what = "would free" if args.dry_run else "freed"
        print(f"{what} {_size(states_size)} of saved states", file=out)
    else:
        what = "would free" if args.dry_run else "freed"
        print(f"{what} {_size(freed)} in {len(removed)} version(s)", file=out)
    return 0
