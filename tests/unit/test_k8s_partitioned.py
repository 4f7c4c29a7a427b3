"""The deployment of partitioned workers and of the Redis Cluster (deploy/k8s, deploy/k8s/redis-cluster):
the manifests pass the Kubernetes schema, the workers and the read services agree on the partition
count, each worker registers under its pod name, and the cluster is six nodes made three masters with
a replica each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CLUSTER = K8S / "redis-cluster"
KUBERNETES_VERSION = "1.30.0"


def docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def cluster_docs() -> list[dict[str, Any]]:
    return docs(CLUSTER / "redis-cluster.yaml")


def env_of(path: Path) -> dict[str, Any]:
    deployment = next(doc for doc in docs(path) if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {env["name"]: env.get("value", env.get("valueFrom")) for env in container["env"]}


@pytest.mark.parametrize("doc", cluster_docs(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_the_redis_cluster_manifests_pass_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_redis_cluster_kustomization_lists_its_manifests() -> None:
    listed = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())["resources"]

    assert sorted(listed) == sorted(p.name for p in CLUSTER.glob("*.yaml") if p.name != "kustomization.yaml")


def test_six_nodes_become_three_masters_with_a_replica_each() -> None:
    kinds = {doc["kind"]: doc for doc in cluster_docs()}
    script = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    config = kinds["ConfigMap"]["data"]["redis.conf"]

    assert kinds["StatefulSet"]["spec"]["replicas"] == 6
    assert "for i in 0 1 2 3 4 5" in script
    assert "--cluster-replicas 1" in script
    assert "cluster-enabled yes" in config


def test_workers_and_read_services_share_one_partition_count() -> None:
    worker, reader = env_of(K8S / "sync-worker.yaml"), env_of(K8S / "read-service.yaml")

    assert int(worker["ORDERS_PARTITIONS"]) > 1
    assert worker["ORDERS_PARTITIONS"] == reader["ORDERS_PARTITIONS"]


def test_each_worker_registers_under_its_pod_name() -> None:
    """Workers share the partitions by their ids: each must be unique, and the pod name is."""
    assert env_of(K8S / "sync-worker.yaml")["ORDERS_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
