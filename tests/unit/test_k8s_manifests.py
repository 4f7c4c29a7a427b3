"""The Kubernetes manifests in deploy/k8s are valid, complete, and name only real settings."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from orders.tools.processes import script_command

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest version we support; newer ones keep these fields


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def containers() -> list[dict[str, Any]]:
    pod_specs = []
    for _, doc in documents():
        if doc["kind"] in {"Deployment", "Job"}:
            pod_specs.append(doc["spec"]["template"]["spec"])
    return [container for spec in pod_specs for container in spec["containers"]]


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_manifest_passes_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    """Strict validation against the Kubernetes OpenAPI schema: no unknown or misplaced fields."""
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_bites() -> None:
    """A misspelt field fails the strict check, so the test above can fail."""
    deployment = next(doc for _, doc in documents() if doc["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k deploy/k8s` applies every file in the folder."""
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")

    assert sorted(listed) == present


def settings_of(script: str) -> set[str]:
    """The ORDERS_* variables a console script reads, from its --help."""
    help_text = subprocess.run(
        script_command(script, "--help"), capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(re.findall(r"env\s+(ORDERS_[A-Z_]+)", help_text))


def test_every_variable_a_container_sets_is_a_setting_of_its_process() -> None:
    """A misspelt or stale ORDERS_* variable would be ignored silently; here it fails."""
    config_map = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")
    shared = set(config_map["data"])
    unknown = {}
    for container in containers():
        scripts = re.findall(r"orders-[a-z-]+", " ".join(container["command"]))
        known = set().union(*(settings_of(script) for script in scripts))
        own = {env["name"] for env in container.get("env", [])}
        if own - known:
            unknown[container["name"]] = sorted(own - known)
    all_known = set().union(
        *(settings_of(s) for s in ("orders-write-service", "orders-read-service", "orders-sync-worker"))
    )

    assert unknown == {}
    assert sorted(shared - all_known) == []
