"""Regenerate ``tests/data/crosvm-grammar.json`` from the shared crosvm grammar.

The test suite checks every crosvm command line vmsilo builds against upstream crosvm's
real command-line grammar (see ``tests/crosvm_grammar.py``). That grammar was extracted
from upstream crosvm into ``../shared/crosvm/crosvm-cli.json`` (relative to the repository
root). The tests must not read ``../shared`` at run time, so this script copies the subset
the validator needs into the repository:

* ``source`` (upstream repository and commit), ``argv_rules``, ``keyvalue_grammar``;
* ``global_options`` (the options that must come before the subcommand);
* the ``run`` command in full (all of its options, positionals and validation rules),
  and the control subcommands ``stop``, ``powerbtn``, ``suspend``, ``resume`` and
  ``snapshot`` (fastStart);
* every ``keyvalue_schemas`` / ``enum_schemas`` entry those commands reference, directly
  or through nested keys (for example ``GpuParameters`` -> ``GpuDisplayParameters``);
* ``other_commands``: the names of the remaining upstream subcommands, so the validator
  can tell "exists upstream but not vendored" apart from "does not exist";
* ``non_upstream_seen_in_seed``: the options and keys known to come only from vmsilo's
  patched crosvm (used for better error messages).

Nothing is rewritten: every vendored entry is byte-for-byte the upstream JSON value, and
dictionary order (which matters: a struct's first declared key is its positional key) is
preserved.

Usage, from the repository root::

    .venv/bin/python tests/data/vendor_crosvm_grammar.py [PATH/TO/crosvm-cli.json]

Re-run it whenever ``crosvm-cli.json`` is regenerated for a new upstream commit, then
review the diff of ``tests/data/crosvm-grammar.json`` and run the tests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "crosvm" / "crosvm-cli.json"
OUTPUT = Path(__file__).resolve().parent / "crosvm-grammar.json"

VENDORED_COMMANDS = ("run", "stop", "powerbtn", "suspend", "resume", "snapshot")
COPIED_TOP_LEVEL = (
    "schema_version",
    "source",
    "argv_rules",
    "keyvalue_grammar",
    "global_options",
)


def _schema_refs(spec: Any) -> tuple[set[str], set[str]]:
    """Return the (keyvalue, enum) schema names a value/key spec refers to, recursively."""
    kv: set[str] = set()
    enums: set[str] = set()
    if isinstance(spec, dict):
        schema = spec.get("schema")
        if isinstance(schema, str):
            if spec.get("type") == "enum_variant":
                enums.add(schema)
            else:
                kv.add(schema)
        for value in spec.values():
            sub_kv, sub_enums = _schema_refs(value)
            kv |= sub_kv
            enums |= sub_enums
    elif isinstance(spec, list):
        for value in spec:
            sub_kv, sub_enums = _schema_refs(value)
            kv |= sub_kv
            enums |= sub_enums
    return kv, enums


def vendor(cli: dict[str, Any], source_bytes: bytes, source_name: str) -> dict[str, Any]:
    """Build the vendored grammar document from the full upstream grammar."""
    out: dict[str, Any] = {
        "vendored_by": "tests/data/vendor_crosvm_grammar.py",
        "vendored_from": {
            "file": source_name,
            "sha256": hashlib.sha256(source_bytes).hexdigest(),
        },
    }
    for key in COPIED_TOP_LEVEL:
        out[key] = cli[key]
    out["commands"] = {name: cli["commands"][name] for name in VENDORED_COMMANDS}
    out["other_commands"] = sorted(set(cli["commands"]) - set(VENDORED_COMMANDS))

    # Transitive closure of the schemas the vendored commands use.
    kv_needed, enum_needed = _schema_refs(out["commands"])
    kv_done: set[str] = set()
    while kv_needed - kv_done:
        name = sorted(kv_needed - kv_done)[0]
        kv_done.add(name)
        sub_kv, sub_enums = _schema_refs(cli["keyvalue_schemas"][name])
        kv_needed |= sub_kv
        enum_needed |= sub_enums
    # Keep upstream order so diffs stay readable.
    out["keyvalue_schemas"] = {
        name: schema for name, schema in cli["keyvalue_schemas"].items() if name in kv_done
    }
    out["enum_schemas"] = {
        name: schema for name, schema in cli["enum_schemas"].items() if name in enum_needed
    }
    missing = (kv_done - set(out["keyvalue_schemas"])) | (enum_needed - set(out["enum_schemas"]))
    if missing:
        raise SystemExit(f"referenced schemas missing upstream: {sorted(missing)}")
    out["non_upstream_seen_in_seed"] = cli["non_upstream_seen_in_seed"]
    return out


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else DEFAULT_SOURCE
    raw = source.read_bytes()
    cli = json.loads(raw)
    vendored = vendor(cli, raw, "../shared/crosvm/crosvm-cli.json")
    OUTPUT.write_text(json.dumps(vendored, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    run_options = len(vendored["commands"]["run"]["options"])
    print(
        f"wrote {OUTPUT.relative_to(REPO_ROOT)}: run has {run_options} options, "
        f"{len(vendored['keyvalue_schemas'])} keyvalue schemas, "
        f"{len(vendored['enum_schemas'])} enum schemas"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
