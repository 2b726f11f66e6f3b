"""Where the embedded PostgreSQL cluster lives: beside the state dir, or (root, state dir out of the server
user's reach) in a fresh public dir that the state dir records."""

from __future__ import annotations

from pathlib import Path

from pipelines.core.settings import Settings
from pipelines.devstack import postgres
from pipelines.devstack.postgres import CLUSTER_POINTER, Postgres


def test_the_cluster_lives_beside_the_state_dir_by_default(tmp_path: Path):
    server = Postgres(Settings(profile="dev"), tmp_path / "state")
    assert server.data_dir == tmp_path / "state" / "postgres" / "data"
    assert server.socket_dir == tmp_path / "state" / "postgres" / "run"


def test_an_unreachable_state_dir_gets_a_fresh_public_cluster_dir_that_later_instances_find(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(postgres, "PUBLIC_CACHE", tmp_path / "public")
    (tmp_path / "public").mkdir()
    home = tmp_path / "state" / "postgres"
    home.mkdir(parents=True)
    first = postgres._new_public_cluster_dir(home)
    assert first.parent == tmp_path / "public" / "leukops-postgres-clusters" and first.is_dir()
    assert (home / CLUSTER_POINTER).read_text().strip() == str(first)
    reopened = Postgres(Settings(profile="dev"), tmp_path / "state")
    assert (reopened.data_dir, reopened.socket_dir) == (first / "data", first / "run")
    # a re-created state dir (pointer gone) gets a new cluster, never the old one's databases
    (home / CLUSTER_POINTER).unlink()
    assert postgres._new_public_cluster_dir(home) != first
