"""docs/operating.md keeps up with the code: every setting (its flag and its
environment variable) and every metric is described there."""

from __future__ import annotations

import dataclasses
import pathlib

from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

OPERATING = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "operating.md").read_text()


def test_every_setting_is_documented():
    missing = []
    for spec in dataclasses.fields(Settings):
        names = [f"`{ENV_PREFIX}{spec.name.upper()}`"]
        if not spec.metadata.get("env_only"):
            names.append(f"`--{spec.name.replace('_', '-')}`")
        missing += [name for name in names if name not in OPERATING]
    assert not missing, f"docs/operating.md does not describe {missing}"


def test_every_metric_is_documented():
    names = {family.name + ("_total" if family.type == "counter" else "") for family in Metrics().registry.collect()}
    missing = sorted(name for name in names if f"`{name}`" not in OPERATING)
    assert not missing, f"docs/operating.md's Metrics section does not describe {missing}"
