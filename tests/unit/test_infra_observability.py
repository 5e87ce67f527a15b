"""infra/ and the code agree: every metric a dashboard panel or an alert rule queries is one
the services export, with the labels they export it with; and the exported set follows one
naming scheme (DESIGN.md §6).

The exported families are read from ``stratamesh.obs.metrics.REGISTRY`` after importing every
installed service's app (each registers its families at import).  promtool is not installed
here, so PromQL is read by a small parser: string literals, range selectors and grouping
clauses are taken out, what is left that is not a function, keyword or number is a metric.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from stratamesh.embedded.registry import discover_services
from stratamesh.obs.metrics import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "infra" / "grafana").glob("*.json"))

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_ALERT_LABEL = re.compile(r"\$labels\.(\w+)")
# Labels Prometheus itself attaches to every scraped series.
_TARGET_LABELS = {"instance", "job"}


@dataclass
class Query:
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def parse(expr: str) -> Query:
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    q = Query()
    for labels in _GROUPING.findall(text):
        q.grouping |= {x.strip() for x in labels.split(",") if x.strip()}
    text = _GROUPING.sub(" ", text)
    for name, matchers in _SELECTOR.findall(text):
        if name.lower() in _KEYWORDS:
            continue
        q.selectors.append((name, set(_MATCHER.findall(matchers or ""))))
    return q


def exported() -> dict[str, set[str]]:
    """Sample name → label names, for every family on the registry (suffixes expanded)."""
    for name in discover_services():
        importlib.import_module(f"stratamesh.services.{name}.app")
    out: dict[str, set[str]] = {}
    for metric in REGISTRY.collect():
        labels = set(getattr(metric, "_labelnames", ()))
        for s in metric.samples:
            labels |= set(s.labels) - {"le"}
        if metric.type == "counter":
            out[metric.name + "_total"] = labels
        elif metric.type == "histogram":
            for suffix in ("_sum", "_count"):
                out[metric.name + suffix] = labels
            out[metric.name + "_bucket"] = labels | {"le"}
        else:
            out[metric.name] = labels
    return out


def problems(expr: str, known: dict[str, set[str]], legend: str = "") -> list[str]:
    """What in ``expr`` (and its legend / alert annotations) the code does not export."""
    q = parse(expr)
    found: list[str] = []
    if not q.selectors:
        found.append(f"no metric in {expr!r}")
    available: set[str] = set(_TARGET_LABELS)
    for name, matchers in q.selectors:
        if name not in known:
            found.append(f"{name} is not exported")
            continue
        available |= known[name]
        if missing := matchers - known[name] - _TARGET_LABELS:
            found.append(f"{name} has no label {sorted(missing)}")
    if missing := q.grouping - available:
        found.append(f"grouping by {sorted(missing)}, which no metric of {expr!r} has")
    used = set(_LEGEND.findall(legend)) | set(_ALERT_LABEL.findall(legend))
    if missing := used - available:
        found.append(f"legend/annotation uses {sorted(missing)}, not a label of {expr!r}")
    return found


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    return exported()


def test_the_parser_finds_metrics_and_labels_and_ignores_functions_strings_and_numbers() -> None:
    q = parse(
        "histogram_quantile(0.95, sum by (le, stage) (rate(strata_stage_seconds_bucket"
        '{stage=~"a|b", job!="x"}[5m]))) > 1e-3 and on (stage) strata_results_total offset 5m'
    )
    assert q.selectors == [
        ("strata_stage_seconds_bucket", {"stage", "job"}),
        ("strata_results_total", set()),
    ]
    assert q.grouping == {"le", "stage"}


def test_the_check_catches_an_unknown_metric_a_wrong_label_and_a_wrong_grouping(
    known: dict[str, set[str]],
) -> None:
    assert problems("rate(strata_nope_total[5m])", known) == ["strata_nope_total is not exported"]
    assert problems('strata_results_total{colour="red"}', known) == [
        "strata_results_total has no label ['colour']"
    ]
    assert problems("sum by (colour) (strata_results_total)", known) != []
    assert problems("sum by (status) (strata_results_total)", known, "{{tenant}}") != []
    assert problems("sum by (status) (strata_results_total)", known, "{{status}}") == []


def test_every_alert_rule_queries_exported_metrics_and_the_required_alerts_exist(
    known: dict[str, set[str]],
) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert all(g["name"] and g["rules"] for g in doc["groups"])
    found: list[str] = []
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        notes = rule["annotations"]["summary"] + rule["annotations"]["description"]
        found += [f"{rule['alert']}: {p}" for p in problems(rule["expr"], known, notes)]
    assert found == []
    by_metric = {
        "strata_infer_ttft_seconds_bucket": "TTFT p95",
        "strata_results_total": "error rate",
        "strata_judge_score_sum": "quality",
        "strata_request_cost_usd_sum": "cost per request",
        "strata_dlq_depth": "DLQ depth",
        "strata_index_lag_seconds_bucket": "index lag",
        "strata_circuit_breaker_state": "breaker open",
        "strata_consumer_lag": "consumer lag growing",
    }
    queried = {name for r in rules for name, _ in parse(r["expr"]).selectors}
    assert set(by_metric) <= queried, set(by_metric) - queried
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in rules}
    assert exprs["StrataDLQDepth"].endswith("> 10")
    assert exprs["StrataIndexLagHigh"].endswith("> 120")
    assert exprs["StrataCircuitBreakerOpen"].endswith("== 2")  # breaker.State.OPEN


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_panel_queries_exported_metrics(
    path: Path, known: dict[str, set[str]]
) -> None:
    board: dict[str, Any] = json.loads(path.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    panels = board["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    found: list[str] = []
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]
            found += [
                f"{path.name} / {panel['title']}: {p}"
                for p in problems(target["expr"], known, target.get("legendFormat", ""))
            ]
    assert found == []


def test_the_dashboards_cover_the_request_plane_the_knowledge_plane_and_the_bus() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"request-plane", "knowledge-plane", "bus"}
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


# -- one naming scheme ---------------------------------------------------------------------

# Labels whose values would be unbounded or carry text a metric must never hold.
_FORBIDDEN_LABELS = {
    "prompt",
    "answer",
    "text",
    "query",
    "email",
    "user",
    "request_id",
    "event_id",
    "trace_id",
    "doc_id",
}


def test_every_exported_family_follows_the_naming_scheme(known: dict[str, set[str]]) -> None:
    bad: list[str] = []
    for metric in REGISTRY.collect():
        name, labels = metric.name, set(getattr(metric, "_labelnames", ()))
        if not name.startswith("strata_"):
            bad.append(f"{name}: no strata_ prefix")
        if metric.type not in {"counter", "gauge", "histogram"}:
            bad.append(f"{name}: {metric.type}")
        if metric.type == "counter" and any(s.name.endswith("_created") for s in metric.samples):
            bad.append(f"{name}: a prometheus_client Counter (mutex per update, _created series)")
        if "cost" in name and not name.endswith("_usd"):
            bad.append(f"{name}: a cost not in _usd")
        if any(w in name for w in ("_ms", "millis", "latency")):
            bad.append(f"{name}: time not in seconds")
        if bad_labels := labels & _FORBIDDEN_LABELS:
            bad.append(f"{name}: labels {sorted(bad_labels)}")
    assert bad == []
    # The time histograms the dashboards read are in seconds.
    for name in (
        "strata_handler_seconds_bucket",
        "strata_stage_seconds_bucket",
        "strata_infer_ttft_seconds_bucket",
        "strata_index_lag_seconds_bucket",
    ):
        assert name in known
