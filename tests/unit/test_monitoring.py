"""The dashboard and alert rules of deploy/k8s/monitoring: they name only series the services export
(orders.telemetry.metrics) or that docs/operations.md says come from elsewhere, the dashboard holds
the panels operators need, every alert has a runbook section and unit tests that show it firing and
quiet, kustomize ships both, and promtool accepts the rules and passes their tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from orders.telemetry import metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MONITORING = K8S / "monitoring"
RULES = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts-test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Series that other exporters provide: only whether a process answers at all, which it cannot say itself.
EXTERNAL_SERIES = {
    "up": "Prometheus itself: 1 while the target's /metrics answers",
}
# The series a metric of each type becomes in Prometheus (`*_created` is switched off).
SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
# What operators need on the dashboard: a panel whose title starts with the key, querying these series.
REQUIRED_PANELS = {
    "Command rate by method and code": {"orders_grpc_server_handled_total"},
    "Command latency by method": {"orders_grpc_server_handling_seconds_bucket"},
    "Query rate by method and code": {"orders_grpc_server_handled_total"},
    "Query latency by method": {"orders_grpc_server_handling_seconds_bucket"},
    "Projection lag (events)": {"orders_projection_lag_events"},
    "Projection lag (seconds)": {"orders_projection_lag_seconds"},
    "Partition owner age": {"orders_projection_owner_age_seconds"},
    "Partition lag (seconds)": {"orders_projection_lag_seconds"},
    "Horizon age": {"orders_projection_held_back_seconds"},
    "Batch sizes": {"orders_projection_batch_size_bucket", "orders_append_batch_size_bucket"},
    "Store errors": {"orders_store_errors_total"},
    "Health": {"orders_health_serving", "up"},
    "Read cache hit ratio": {"orders_read_cache_lookups_total"},
    "Answers flagged stale": {"orders_reads_behind_total"},
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
# Label lists, which name labels rather than series.
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A name not followed by "(" (a function or an aggregation) and not part of a number or a variable.
NAME = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()")
GRAFANA_WIDTH = 24


def exported_series() -> set[str]:
    """Every series name orders.telemetry.metrics defines, as Prometheus stores it."""
    names: set[str] = set()
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
    return names


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression selects."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals: label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, subqueries, $__rate_interval
    text = LABEL_LISTS.sub("", text)
    return {name for name in NAME.findall(text) if name.lower() not in PROMQL_WORDS}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel["targets"]]


def all_queries() -> list[tuple[str, str]]:
    return [(rule["alert"], rule["expr"]) for rule in alert_rules()] + dashboard_queries()


def heading_anchors(page: Path) -> set[str]:
    """GitHub's heading anchors, as tests/unit/test_docs.py computes them."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_the_series_finder_reads_promql() -> None:
    """Functions, aggregations, label lists and matchers, ranges, numbers and keywords are not
    series; so the check below sees exactly the names a query selects."""
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(a_bucket{grpc_method!~"Watch|x"}[$__rate_interval])))'
        " > 0.25 and on (projection) (max without (instance) (deriv(b[5m])) > 1e3) unless c offset 5m"
        " or vector(0) * inf"
    )

    assert series_in(expr) == {"a_bucket", "b", "c"}


def test_every_series_the_rules_and_dashboard_query_is_exported() -> None:
    """A renamed metric or a misspelt suffix would leave a panel empty and an alert silent; here it fails."""
    known = exported_series() | set(EXTERNAL_SERIES)
    unknown = {f"{where}: {name}" for where, expr in all_queries() for name in series_in(expr) - known}

    assert sorted(unknown) == []


def test_every_series_the_services_export_is_on_the_dashboard_or_in_an_alert() -> None:
    """The dashboard covers each metric family; a new metric is a decision to chart it, or not."""
    queried = {name for _, expr in all_queries() for name in series_in(expr)}
    families = {name for name in exported_series() if not name.endswith(("_count", "_sum"))}

    assert sorted(families - queried) == []


def test_the_dashboard_has_the_panels_operators_need() -> None:
    missing = {}
    for title, wanted in REQUIRED_PANELS.items():
        queried = {
            name
            for panel in panels()
            if panel["title"].startswith(title)
            for target in panel["targets"]
            for name in series_in(target["expr"])
        }
        if not wanted <= queried:
            missing[title] = sorted(wanted - queried)

    assert missing == {}


def test_the_dashboard_is_well_formed() -> None:
    """Grafana imports it: unique ids, a Prometheus datasource variable every query uses, every
    panel inside the 24-column grid, and no two panels on top of each other."""
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    ids = [panel["id"] for panel in board["panels"]]
    boxes = [(panel["title"], panel["gridPos"]) for panel in board["panels"]]

    assert board["uid"]
    assert len(ids) == len(set(ids))
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels():
        refs = [target["refId"] for target in panel["targets"]]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
    for title, box in boxes:
        assert box["x"] >= 0, title
        assert box["x"] + box["w"] <= GRAFANA_WIDTH, title
    overlaps = [(a, b) for i, (a, one) in enumerate(boxes) for b, other in boxes[i + 1 :] if _overlap(one, other)]
    assert overlaps == []


def _overlap(one: dict[str, int], other: dict[str, int]) -> bool:
    apart = (
        one["x"] + one["w"] <= other["x"]
        or other["x"] + other["w"] <= one["x"]
        or one["y"] + one["h"] <= other["y"]
        or other["y"] + other["h"] <= one["y"]
    )
    return not apart


def test_every_alert_has_a_severity_a_duration_and_a_runbook_section() -> None:
    """The `runbook` annotation names the alert's own section of docs/operations.md, which exists."""
    sections = heading_anchors(OPERATIONS)
    problems = []
    for rule in alert_rules():
        name, runbook = rule["alert"], rule["annotations"]["runbook"]
        if rule["labels"]["severity"] not in {"critical", "warning"} or not rule.get("for"):
            problems.append(f"{name}: severity or for")
        if runbook != f"docs/operations.md#{name.lower()}" or name.lower() not in sections:
            problems.append(f"{name}: runbook {runbook}")

    assert problems == []


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    """alerts-test.yaml evaluates each alert at a time it must fire and at one it must not."""
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    alerts = {rule["alert"] for rule in alert_rules()}

    assert sorted(alerts - fires) == []
    assert sorted(alerts - quiet) == []


def test_kustomize_ships_the_rules_and_the_dashboard() -> None:
    """`kubectl apply -k deploy/k8s` creates a ConfigMap of each (kustomize reads files only below
    its own folder, hence deploy/k8s/monitoring)."""
    generators = yaml.safe_load((K8S / "kustomization.yaml").read_text())["configMapGenerator"]
    shipped = {K8S / path for generator in generators for path in generator["files"]}

    assert {RULES, DASHBOARD} <= shipped


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH: kustomize build not tried")
def test_the_kustomize_build_holds_the_files_as_they_are() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    data = {}
    for doc in yaml.safe_load_all(built):
        if doc and doc["kind"] == "ConfigMap":
            data.update(doc["data"])

    assert data[RULES.name] == RULES.read_text()
    assert data[DASHBOARD.name] == DASHBOARD.read_text()


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian: apt-get install prometheus); .ci/run installs it and runs these checks",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool's answer; the tests assert on its exit status and show its output when it fails."""
    return subprocess.run(["promtool", *args], check=False, capture_output=True, text=True, timeout=120, cwd=MONITORING)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", RULES.name)

    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_promtool_passes_the_rules_unit_tests() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)

    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule, with Grafana's variables given values."""
    values = {"$__rate_interval": "5m", "$namespace": "orders"}
    rules = []
    for number, (_, query) in enumerate(dashboard_queries()):
        expr = query
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))

    assert checked.returncode == 0, checked.stdout + checked.stderr
