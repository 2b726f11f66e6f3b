"""Sign a registered version as promotion does, over a stand-in passing gate report, for tests whose subject
is not the gate (serving, evaluate): only attested versions are served or evaluated as an alias."""

from __future__ import annotations

import json

from pipelines.core.settings import Settings
from pipelines.io.layout import GATE_REPORT_JSON
from pipelines.io.registry import Registry
from pipelines.trust.attestation import attest


def attest_version(settings: Settings, registry: Registry, task: str, version: str, run_id: str, why: str) -> None:
    report = {"passed": True, "dataset_version": "test", "thresholds": {}}
    registry.log_text(run_id, json.dumps(report), GATE_REPORT_JSON)
    attest(registry, settings, task, version, "promote", why, "tests")
