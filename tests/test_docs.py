"""docs/operating.md keeps up with the code: its settings table is what
scripts/settings_table.py makes of service.settings.Settings (`make docs`
rewrites it), and every setting and every metric is described there."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPERATING = ROOT / "docs" / "operating.md"


def _settings_table_script():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_table_is_generated_from_the_settings():
    committed = OPERATING.read_text(encoding="utf-8")
    wanted = _settings_table_script().rewrite(committed)
    assert committed == wanted, (
        "docs/operating.md's settings table differs from what service/settings.py says: run `make docs`"
    )


def test_every_setting_is_documented():
    operating = OPERATING.read_text(encoding="utf-8")
    missing = []
    for spec in dataclasses.fields(Settings):
        names = [f"`{ENV_PREFIX}{spec.name.upper()}`"]
        if not spec.metadata.get("env_only"):
            names.append(f"`--{spec.name.replace('_', '-')}`")
        missing += [name for name in names if name not in operating]
    assert not missing, f"docs/operating.md does not describe {missing}: run `make docs`"


def test_every_metric_is_documented():
    operating = OPERATING.read_text(encoding="utf-8")
    names = {family.name + ("_total" if family.type == "counter" else "") for family in Metrics().registry.collect()}
    missing = sorted(name for name in names if f"`{name}`" not in operating)
    assert not missing, f"docs/operating.md's Metrics section does not describe {missing}"
