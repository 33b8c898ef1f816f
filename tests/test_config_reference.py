"""docs/CONFIG.md is generated from the configuration model and must agree with it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from vmsilo.config import model
from vmsilo.config.reference import REGENERATE, render, rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_config_md_is_what_the_model_generates() -> None:
    assert DOC.read_text() == render(), (
        f"docs/CONFIG.md disagrees with src/vmsilo/config/model.py; regenerate it: `{REGENERATE}`"
    )


def test_every_setting_users_write_has_a_description() -> None:
    undocumented = [
        f"{cls.__name__}.{name}"
        for cls in vars(model).values()
        if isinstance(cls, type) and issubclass(cls, model.Model) and cls is not model.Model
        for name, field in cls.model_fields.items()
        if not field.description and not _is_table(field.annotation) and name != "vms"
    ]
    assert undocumented == []


def _is_table(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def test_rows_use_the_camel_case_spelling_and_the_models_defaults() -> None:
    found = {key: (kind, default) for key, kind, default, _ in rows(model.VmConfig)}
    assert found["memory"] == ("int ≥ 64", "`2048`")
    assert found["cpus"] == ("int 1–256", "`2`")
    assert found["rootOverlay.size"] == ("size", '`"10G"`')
    assert found["sharedDirectories.<tag>.mountPoint"][1] == "required"
    assert found["network.isNetvm"] == ("bool", "`false`")
    glob = {key: default for key, _, default, _ in rows(model.GlobalConfig, skip={"vms"})}
    assert glob["runtimeDir"] == '`"/run/vmsilo"`' and glob["user"] == "required"
    assert "vms" not in glob
