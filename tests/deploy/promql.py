"""PromQL of the dashboard and the alert rules: collect every expression, parse it, list the metrics and labels it uses."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import promql_parser
import yaml

from tests.deploy.conftest import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "distillgate.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Grafana replaces these before a query reaches Prometheus; any valid value keeps the syntax.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "6h", "$task": ".*"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Series Prometheus makes itself rather than scraping them from distillgate.
PROMETHEUS_SERIES = {"up"}


@dataclass
class Usage:
    """What one expression needs from the metrics it reads."""

    metrics: set[str] = field(default_factory=set)
    # metric name → label names its selectors match on
    matchers: dict[str, set[str]] = field(default_factory=dict)
    # (labels an aggregation groups by, metric names inside the aggregation)
    groupings: list[tuple[set[str], set[str]]] = field(default_factory=list)


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation query, variables substituted."""
    data = dashboard()
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            yield (
                f"panel {panel['id']} {panel['title']!r} {target['refId']}",
                grafana_to_promql(target["expr"]),
            )
    for annotation in data["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", grafana_to_promql(annotation["expr"])


def dashboard_variable_metrics() -> Iterator[tuple[str, str]]:
    """(metric, label) of every `label_values(metric, label)` template variable."""
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]
            yield match.group(1), match.group(2)


def alert_expressions() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def analyse(expr: str) -> Usage:
    """Parse ``expr`` (raises on a syntax error) and list what it reads."""
    usage = Usage()
    tree = promql_parser.parse(expr)

    def metrics_in(node: Any) -> set[str]:
        found: set[str] = set()

        def visit(n: Any) -> None:
            if isinstance(n, promql_parser.VectorSelector):
                found.add(selector_name(n))

        promql_parser.walk(node, visit)
        return found

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = selector_name(node)
            usage.metrics.add(name)
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            usage.matchers.setdefault(name, set()).update(labels)
        elif (
            isinstance(node, promql_parser.AggregateExpr)
            and node.modifier is not None
            and node.modifier.type == promql_parser.AggModifierType.By
        ):
            usage.groupings.append((set(node.modifier.labels), metrics_in(node.expr)))

    promql_parser.walk(tree, visit)
    return usage


def selector_name(node: Any) -> str:
    if node.name:
        return str(node.name)
    names = [m.value for m in node.matchers.matchers if m.name == "__name__"]
    assert len(names) == 1, f"selector without a metric name: {node}"
    return str(names[0])


def exposition_names(family: str, kind: str) -> set[str]:
    """Series names a metric family of this type exposes (OpenMetrics-style family names in)."""
    if kind == "counter":
        return {f"{family}_total"}
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


def series_labels(series: str, labelnames: set[str]) -> set[str]:
    """The labels a series carries: its metric's labels, ``le`` on histogram buckets, the target's."""
    extra = {"le"} if series.endswith("_bucket") else set()
    return labelnames | extra | TARGET_LABELS
