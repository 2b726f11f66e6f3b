"""`train_prepared` trains while it holds the lease of its run key, and gives it back afterwards."""

from __future__ import annotations

from types import SimpleNamespace

from pipelines.io import layout
from pipelines.io.storage import ObjectStore
from pipelines.model import candidate
from pipelines.model.checkpoint import run_key
from tests.unit.io.memory_bucket import MemoryBucket


def test_training_runs_inside_the_lease_of_its_run_key(monkeypatch) -> None:
    bucket = MemoryBucket()
    monkeypatch.setattr(ObjectStore, "from_settings", classmethod(lambda cls, settings, name=None: bucket))
    config = {"task": "wbc", "backbone": "resnet18", "epochs": 1}
    name = layout.training_lease_name(run_key(config))
    seen: dict = {}

    def train(settings, run, key):
        seen["key"], seen["held"] = key, bucket.list(layout.lease_dir(name))
        return "summary"

    monkeypatch.setattr(candidate, "_train_leased", train)
    assert candidate.train_prepared(SimpleNamespace(), SimpleNamespace(resolved_config=lambda: config)) == "summary"
    assert seen == {"key": run_key(config), "held": [layout.lease_ticket_key(name, 1)]}
    assert bucket.exists(layout.lease_release_key(name, 1))  # released once training returned
