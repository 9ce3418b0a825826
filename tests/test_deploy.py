"""Deployment files stay in step with the code: they parse, the dashboard's PromQL names
only metrics (and labels) that server/metrics.py defines, and every LORAMUX_* setting they
pass is a real server flag. Fast: no server, no Docker (none runs on the dev machines)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from server.cli import FLAGS
from server.metrics import Metrics

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loramux.json"

# Announced by the adapter-cache work before it lands in server/metrics.py: (type, labels).
# Once a name is defined in the code, the code's definition is the one checked.
PENDING_METRICS = {
    "loramux_adapter_cache_hits": ("counter", ()),
    "loramux_adapter_cache_misses": ("counter", ()),
    "loramux_adapter_loads": ("counter", ("result",)),
    "loramux_adapter_evictions": ("counter", ("tier",)),
    "loramux_adapter_load_seconds": ("histogram", ()),
    "loramux_adapters_resident": ("gauge", ("tier",)),
    "loramux_step_adapters": ("histogram", ()),
    "loramux_adapter_slot_writes": ("counter", ()),
}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Environment variables the server reads that are not flags.
NON_FLAG_ENV = {"LORAMUX_CACHE"}
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
    return {**PENDING_METRICS, **found}


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


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --- files parse ------------------------------------------------------------------------------


def test_every_deploy_file_parses():
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 6, files
    for path in files:
        assert yaml_docs(path), f"{path} is empty"
    json.loads(DASHBOARD.read_text())


# --- the dashboard against server/metrics.py ------------------------------------------------------


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


# --- Prometheus, compose, Kubernetes ---------------------------------------------------------


def test_prometheus_scrapes_loramux_every_5s():
    cfg = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "loramux")
    assert job.get("scrape_interval", cfg["global"]["scrape_interval"]) == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["loramux:8000"]


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of a compose service's bind mounts."""
    out = {}
    for spec in service.get("volumes", []):
        host, container, *mode = spec.split(":")
        out[container] = host + (":" + mode[0] if mode else "")
    return out


def test_compose_stack_is_wired_together():
    compose = yaml_docs(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert {"loramux", "prometheus", "grafana"} <= set(services)
    assert services["loramux"]["build"]["context"] == ".."
    assert (DEPLOY / ".." / services["loramux"]["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    lm = _mounts(services["loramux"])
    assert lm["/app/adapters_store"] == "../adapters_store:ro", "the adapter store is mounted read-only"
    for name in ("prometheus", "grafana"):
        for host in _mounts(services[name]).values():
            if host.startswith("."):
                assert (DEPLOY / host.split(":")[0]).exists(), f"{name}: {host} does not exist"
    gm = _mounts(services["grafana"])
    provider = yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "loramux.yml")[0]["providers"][0]
    assert gm[provider["options"]["path"]].startswith("./grafana/dashboards")
    assert gm["/etc/grafana/provisioning"].startswith("./grafana/provisioning")
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name
    ds = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    for svc in services.values():  # nothing listens beyond the host's loopback
        assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), svc.get("ports")


def test_k8s_manifests():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml_docs(f)]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Deployment", "Service", "ConfigMap"}
    dep, svc, cm = by_kind["Deployment"], by_kind["Service"], by_kind["ConfigMap"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"] == cm["data"]["LORAMUX_NUM_THREADS"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/app/adapters_store")
    assert mount["readOnly"] is True
    assert str(pod["spec"]["securityContext"]["runAsUser"]) in (ROOT / "Dockerfile").read_text()


# --- settings passed as LORAMUX_* are real flags -------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_loramux_setting_is_a_server_flag():
    flags = {f.env: f for f in FLAGS}
    settings: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            settings.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    settings.update(yaml_docs(DEPLOY / "docker-compose.yml")[0]["services"]["loramux"]["environment"])
    settings.update(next(d for d in yaml_docs(DEPLOY / "k8s" / "configmap.yaml"))["data"])
    for key, value in settings.items():
        if not key.startswith("LORAMUX_") or key in NON_FLAG_ENV:
            continue
        assert key in flags, f"{key} is not the env var of any `loramux serve` flag"
        if not flags[key].switch and flags[key].nargs is None:
            flags[key].convert(value)  # e.g. "1GiB" must parse


def test_dockerfile_invariants():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert ("EXPOSE", "8000") in ins
    assert any(w == "ARG" and r.startswith('TORCH_SPEC="torch==2.13.0"') for w, r in ins)
    user = [r for w, r in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")
    health = next(r for w, r in ins if w == "HEALTHCHECK")
    assert "/health" in health
    entry = json.loads(next(r for w, r in ins if w == "ENTRYPOINT"))
    assert entry[:2] == ["loramux", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
    fetch = [r for w, r in ins if w == "RUN" and "fetch-default-model" in r]
    assert fetch and words.index("USER") < words.index("RUN", words.index("USER")), "model fetched as the user"
    # Everything COPYed or bind-mounted exists and is let through the .dockerignore allowlist.
    allowed = {line[1:].strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = [src for w, r in ins if w == "COPY" for src in r.split()[:-1] if not src.startswith("--")]
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", " ".join(r for w, r in ins if w == "RUN"))
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src.rstrip("/") in allowed, f"{src} is excluded from the build context by .dockerignore"
