"""Where a sync worker's id comes from: a stable one wherever one exists, so that a worker restarted
after a crash takes its own lease back at once (tests/faults/test_worker_restart.py shows that)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis

from orders.tools import local
from sync_worker import main as worker_main
from sync_worker.worker import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


def _worker_id_the_runner_gives(monkeypatch: pytest.MonkeyPatch) -> str:
    """The id the sync worker started by orders-local parses from the environment it is given."""
    settings = local.parse_settings(["--postgres-url", "postgresql://pg/orders", "--redis-url", "redis://r/0"])
    env = local._service_env(settings)
    for name in [n for n in env if n.startswith("ORDERS_")]:
        monkeypatch.setenv(name, env[name])
    return worker_main.parse_settings([]).worker_id


def test_local_runner_gives_the_worker_the_same_id_on_every_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """orders-local pins ORDERS_WORKER_ID, so a worker it restarts is the holder of its own lease."""
    monkeypatch.delenv("ORDERS_WORKER_ID", raising=False)

    first = _worker_id_the_runner_gives(monkeypatch)
    monkeypatch.delenv("ORDERS_WORKER_ID")
    second = _worker_id_the_runner_gives(monkeypatch)

    assert (first, second) == (local.LOCAL_WORKER_ID, local.LOCAL_WORKER_ID)


@pytest.mark.parametrize("own", ["", "my-worker"])
def test_local_runner_keeps_a_worker_id_set_for_it(monkeypatch: pytest.MonkeyPatch, own: str) -> None:
    """An ORDERS_WORKER_ID given to the runner passes on as the other settings do; an empty one counts as unset."""
    monkeypatch.setenv("ORDERS_WORKER_ID", own)

    assert _worker_id_the_runner_gives(monkeypatch) == (own or local.LOCAL_WORKER_ID)


def test_worker_without_a_pinned_id_gets_a_new_one_on_every_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left unset, each start's id is new (a stranger to its predecessor's lease); a process's loops share one."""
    monkeypatch.delenv("ORDERS_WORKER_ID", raising=False)
    settings = worker_main.parse_settings(["--postgres-url", "postgresql://pg/orders", "--redis-url", "redis://r/0"])

    def started() -> set[str]:
        workers = worker_main.build_workers(
            WorkerSettings("postgresql://pg/orders"), Redis(), "orders:", settings.projections, settings.worker_id
        )
        return {worker.worker_id for worker in workers}

    first, second = started(), started()
    assert settings.worker_id == ""
    assert (len(first), len(second)) == (1, 1)
    assert first != second


def test_kubernetes_worker_id_is_the_pod_name() -> None:
    """The manifest sets ORDERS_WORKER_ID from the pod's name (downward API): it survives a container
    restart in the same pod, which is the crash-restart case."""
    manifest = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "sync-worker.yaml").read_text())
    worker = next(doc for doc in manifest if doc and doc["metadata"]["name"] == "orders-sync-worker")
    env = {e["name"]: e for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert env["ORDERS_WORKER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
