"""The Grafana dashboard stays in step with server/metrics.py: its PromQL names only metrics
(and labels) the server defines, and every metric has a panel. Fast: no server."""

from __future__ import annotations

import json
import re

from prometheus_client.metrics import MetricWrapperBase

from deploy_files import DASHBOARD, DEPLOY, yaml_docs
from server.metrics import CountedHistogram, Metrics

# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}


SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created")}


def defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Metric family name -> (type, label names), from the code, plus the pending ones."""
    found = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            # _labelnames/_type are private but stable; the families from collect() carry
            # no label names for labelled metrics without children.
            found[value._name] = (value._type, tuple(value._labelnames))
        elif isinstance(value, CountedHistogram):
            found[value.name] = ("histogram", ())
    return found


def series_names() -> dict[str, tuple[str, set[str]]]:
    """Exposed sample name -> (family name, labels a selector on it may use)."""
    out = {}
    for family, (kind, labels) in defined_metrics().items():
        for suffix in SUFFIXES[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            out[family + suffix] = (family, set(labels) | TARGET_LABELS | extra)
    return out


def all_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])  # collapsed rows nest their panels


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every panel target and query variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r}", t["expr"], t.get("legendFormat", "")))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']!r}", q, ""))
    return out


METRIC_RE = re.compile(r"\bloramux_[A-Za-z0-9_]+")


SELECTOR_RE = re.compile(r"\b(loramux_[A-Za-z0-9_]+)\s*\{([^}]*)\}")


MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


LEGEND_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def test_dashboard_names_only_defined_metrics():
    known = series_names()
    queries = dashboard_queries()
    assert len(queries) > 20
    unknown = {(where, name) for where, expr, _ in queries for name in METRIC_RE.findall(expr) if name not in known}
    assert not unknown, (f"the dashboard uses metrics that server/metrics.py does not define: {sorted(unknown)}; "
                         "counters are exposed as <name>_total, histograms as <name>_bucket/_sum/_count")


def test_dashboard_uses_only_labels_the_metrics_have():
    known = series_names()
    problems = []
    for where, expr, legend in dashboard_queries():
        metrics = set(METRIC_RE.findall(expr))
        if not metrics <= set(known):
            continue  # reported by test_dashboard_names_only_defined_metrics
        allowed = set().union(*(known[m][1] for m in metrics))
        for name, matchers in SELECTOR_RE.findall(expr):
            for label in MATCHER_RE.findall(matchers):
                if label not in known[name][1]:
                    problems.append(f"{where}: {name} has no label {label!r}")
        grouped = [x.strip() for g in GROUPING_RE.findall(expr) for x in g.split(",") if x.strip()]
        problems += [f"{where}: grouping by unknown label {g!r}" for g in grouped if g not in allowed]
        # A legend can only show labels that survive the aggregation.
        visible = set(grouped) if grouped else allowed
        problems += [f"{where}: legend {{{{{x}}}}} is not a label of the result" for x in LEGEND_RE.findall(legend)
                     if x not in visible]
        m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]\w*)\)", expr.strip())
        if m and m.group(2) not in allowed:
            problems.append(f"{where}: label_values of unknown label {m.group(2)!r}")
    assert not problems, "\n".join(problems)


def test_every_server_metric_is_on_the_dashboard():
    """So a new metric is a deliberate dashboard decision, not an oversight."""
    known = series_names()
    used = {known[n][0] for _, expr, _ in dashboard_queries() for n in METRIC_RE.findall(expr) if n in known}
    missing = sorted(set(defined_metrics()) - used)
    assert not missing, f"metrics with no dashboard panel: {missing}; add a panel to {DASHBOARD}"


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    var_names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "adapter"} <= var_names
    for v in dash["templating"]["list"]:
        if v["type"] == "query":  # `definition` is what the editor shows; `query` is what runs
            assert v["definition"] == v["query"]["query"], v["name"]
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
        for t in p.get("targets", []):
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
            # Rates over a fixed window break when the scrape interval changes.
            assert "rate(" not in t["expr"] or "[$__rate_interval]" in t["expr"], t["expr"]
    # The provisioned datasource is what ${datasource} defaults to.
    ds = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"][0]
    default = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert default["current"]["value"] == ds["uid"] and ds["type"] == default["query"] == "prometheus"


RATE_RE = re.compile(r"\b(?:rate|irate|increase)\(\s*(loramux_[A-Za-z0-9_]+)")


def test_rates_are_taken_of_counters_only():
    """rate() of a gauge reads its rises as resets; of a histogram it must be of _bucket/_sum/_count."""
    known, defined = series_names(), defined_metrics()
    problems = []
    for where, expr, _ in dashboard_queries():
        for name in RATE_RE.findall(expr):
            if name not in known:
                continue  # reported by test_dashboard_names_only_defined_metrics
            family = known[name][0]
            kind = defined[family][0]
            if not (kind == "counter" and name.endswith("_total")
                    or kind == "histogram" and name.endswith(("_bucket", "_sum", "_count"))):
                problems.append(f"{where}: rate over {name} ({kind})")
    assert not problems, "\n".join(problems)
    assert any(RATE_RE.findall(expr) for _, expr, _ in dashboard_queries())
