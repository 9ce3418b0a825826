"""Deployment files stay in step with the code: they parse, the dashboard's PromQL names
only metrics (and labels) that server/metrics.py defines, and every LORAMUX_* setting they
pass is a real server flag. Fast: no server, no Docker (none runs on the dev machines)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from server.api.shutdown import FLUSH_S, UNGATED_PATHS
from server.cli import FLAGS
from server.config import LoraConfig, ServerConfig
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


def k8s_docs() -> list[dict]:
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml_docs(f)]


def k8s_objects() -> dict[str, dict]:
    by_kind = {d["kind"]: d for d in k8s_docs()}
    assert set(by_kind) == {"Namespace", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"}
    return by_kind


def server_container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_k8s_manifests():
    by_kind = k8s_objects()
    dep, svc, cm, pvc = by_kind["Deployment"], by_kind["Service"], by_kind["ConfigMap"], by_kind["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    c = server_container(dep)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"] == cm["data"]["LORAMUX_NUM_THREADS"]
    assert str(pod["spec"]["securityContext"]["runAsUser"]) in (ROOT / "Dockerfile").read_text()
    # Everything lives in the namespace that enforces the restricted profile, created first.
    ns = by_kind["Namespace"]["metadata"]["name"]
    assert all(d["metadata"]["namespace"] == ns for d in k8s_docs() if d["kind"] != "Namespace")
    assert sorted((DEPLOY / "k8s").glob("*.yaml"))[0].name.startswith("00-namespace")
    # The adapter store (tenants upload into it) is a writable persistent volume.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/app/adapters_store")
    assert not mount.get("readOnly")
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# --- Pod Security "restricted", secrets, shutdown, probes ------------------------------------

# The restricted profile's rules (kubernetes.io/docs/concepts/security/pod-security-standards).
PSS_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                    "projected", "secret"}
PSS_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                    "net.ipv4.tcp_keepalive_probes"}


def pod_templates(docs: list[dict]):
    """(name, pod spec) of every workload in `docs`."""
    for d in docs:
        kind = d["kind"]
        if kind == "Pod":
            yield d["metadata"]["name"], d["spec"]
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def restricted_violations(pod: dict) -> list[str]:
    """What keeps `pod` (a pod spec) from the Pod Security "restricted" profile, plus our own rule
    that every container's root filesystem is read-only."""
    problems = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{key} is set")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= PSS_VOLUME_TYPES:
            problems.append(f"volume {v['name']}: type {sorted(kinds - PSS_VOLUME_TYPES)} not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in PSS_SAFE_SYSCTLS:
            problems.append(f"unsafe sysctl {sysctl['name']}")
    if psc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    containers = [(f"container {c['name']}", c) for c in pod.get("containers") or []]
    containers += [(f"initContainer {c['name']}", c) for c in pod.get("initContainers") or []]
    assert containers, "a pod without containers"
    for where, c in containers:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost, not {seccomp}")
        if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
            problems.append("pod seccompProfile Unconfined")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problems.append(f"{where}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem must be true")
    return problems


def test_every_shipped_pod_passes_pod_security_restricted():
    docs = [d for f in sorted(DEPLOY.rglob("*.y*ml")) for d in yaml_docs(f) if isinstance(d, dict) and "kind" in d]
    pods = list(pod_templates(docs))
    assert pods, "no workload found"
    for name, pod in pods:
        assert not restricted_violations(pod), (name, restricted_violations(pod))
    ns = k8s_objects()["Namespace"]["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("break_it, expected", [
    (lambda p: p["securityContext"].pop("seccompProfile") and
     [c["securityContext"].pop("seccompProfile") for c in p["containers"]], "seccompProfile"),
    (lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda p: p["initContainers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
    (lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    (lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    (lambda p: p["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
])
def test_the_restricted_check_catches_each_violation(break_it, expected):
    """The check above is not vacuous: each rule, broken on a copy of the shipped pod, is reported."""
    pod = copy.deepcopy(k8s_objects()["Deployment"]["spec"]["template"]["spec"])
    break_it(pod)
    assert any(expected in p for p in restricted_violations(pod)), restricted_violations(pod)


def test_keys_come_only_from_a_secret():
    by_kind = k8s_objects()
    dep, cm = by_kind["Deployment"], by_kind["ConfigMap"]
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    env = {e["name"]: e for e in c.get("env", [])}
    # The admin key: from the Secret, never a literal; the admin API is then closed to anyone without it.
    assert set(env["LORAMUX_ADMIN_KEY"]) == {"name", "valueFrom"}
    secret_name = env["LORAMUX_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    # API keys: the tenants file (key hashes) is a file from that Secret, mounted read-only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    tenants = Path(env["LORAMUX_TENANTS"]["value"])
    mount = next(m for m in c["volumeMounts"] if tenants.parent == Path(m["mountPath"]))
    assert mount["readOnly"] is True and "subPath" not in mount, "subPath mounts never see Secret updates"
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == secret_name
    assert any(item["path"] == tenants.name for item in secret["items"])
    # No key material anywhere else: not in the ConfigMap, no Secret object with values in git.
    secret_flags = {"LORAMUX_ADMIN_KEY", "LORAMUX_API_KEYS", "LORAMUX_TENANTS"}
    assert not secret_flags & set(cm["data"])
    assert "Secret" not in {d["kind"] for d in k8s_docs()}
    assert not secret_flags & {kv.split("=", 1)[0] for w, r in dockerfile_instructions() if w == "ENV"
                               for kv in shlex.split(r)}
    # compose: the admin key must be supplied (no default), so its admin API is never open either.
    compose_env = yaml_docs(DEPLOY / "docker-compose.yml")[0]["services"]["loramux"]["environment"]
    assert re.fullmatch(r"\$\{LORAMUX_ADMIN_KEY:\?[^}]+\}", compose_env["LORAMUX_ADMIN_KEY"])
    assert "LORAMUX_API_KEYS" not in compose_env


def _shutdown_timeout(settings: dict) -> float:
    flag = next(f for f in FLAGS if f.name == "shutdown-timeout")
    return flag.convert(settings[flag.env]) if flag.env in settings else ServerConfig().shutdown_timeout


def _seconds(text: str) -> float:
    """A compose duration: '75s', '1m30s', '90'."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?|(\d+)", str(text))
    assert parts, text
    minutes, seconds, bare = parts.groups()
    return float(bare) if bare else 60 * int(minutes or 0) + int(seconds or 0)


def test_grace_period_covers_the_drain():
    """Kubernetes kills the pod terminationGracePeriodSeconds after it starts stopping it: that must
    cover the preStop sleep, --shutdown-timeout, then the abort's flush and uvicorn's close."""
    by_kind = k8s_objects()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    c = server_container(by_kind["Deployment"])
    timeout = _shutdown_timeout(by_kind["ConfigMap"]["data"])
    assert timeout > 0, "a zero timeout aborts every stream at once"
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pause = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
        pause = float(command[1])
    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] >= pause + timeout + 2 * FLUSH_S
    svc = yaml_docs(DEPLOY / "docker-compose.yml")[0]["services"]["loramux"]
    assert _seconds(svc["stop_grace_period"]) >= _shutdown_timeout(svc["environment"]) + 2 * FLUSH_S


def test_probes_point_at_the_health_routes():
    """Readiness on /ready (false while draining or full), liveness and startup on /health (true
    while draining); both answered while draining. tests/test_shutdown.py calls the same paths
    on a real server."""
    c = server_container(k8s_objects()["Deployment"])
    paths = {probe: c[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    assert all(c[probe]["httpGet"]["port"] == "http" for probe in paths)
    assert set(paths.values()) <= UNGATED_PATHS
    health = next(r for w, r in dockerfile_instructions() if w == "HEALTHCHECK")
    assert "/health" in health


def _under(path: str, roots: set[str]) -> bool:
    return any(Path(path) == Path(r) or Path(r) in Path(path).parents for r in roots)


def test_writable_paths_are_volumes():
    """Under a read-only root filesystem, everything the server writes must be on a volume: /tmp
    (temp files, HOME, caches), the kernel build directory and the adapter store."""
    env = {}
    workdir = "/"
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif word == "WORKDIR":
            workdir = rest
    store = str(Path(workdir) / LoraConfig().adapters_dir)
    needed = {"/tmp", env["HOME"], env["XDG_CACHE_HOME"], env["TORCH_EXTENSIONS_DIR"], store}
    c = server_container(k8s_objects()["Deployment"])
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert all(_under(p, writable) for p in needed), (needed, writable)
    svc = yaml_docs(DEPLOY / "docker-compose.yml")[0]["services"]["loramux"]
    assert svc["read_only"] is True and "ALL" in svc["cap_drop"]
    compose_writable = set(svc["tmpfs"]) | {spec.split(":")[1] for spec in svc["volumes"] if not spec.endswith(":ro")}
    assert all(_under(p, compose_writable) for p in needed - {store}), (needed, compose_writable)


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
    for e in server_container(k8s_objects()["Deployment"]).get("env", []):
        settings[e["name"]] = e.get("value", "x")  # from a Secret: any string
    for key, value in settings.items():
        if not key.startswith("LORAMUX_") or key in NON_FLAG_ENV:
            continue
        assert key in flags, f"{key} is not the env var of any `loramux serve` flag"
        if not flags[key].switch and flags[key].nargs is None:
            flags[key].convert(value)  # e.g. "1GiB" must parse


def test_dockerfile_invariants():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    stages = [r.split() for w, r in ins if w == "FROM"]
    assert stages[0] == ["python:3.11-slim", "AS", "base"]
    # `docker build .` (and compose) build the last stage: the CPU image, never the GPU target.
    assert stages[-1][0] == "base" and stages[-1][-1] != "gpu"
    assert ("EXPOSE", "8000") in ins
    assert any(w == "ARG" and r.startswith('TORCH_SPEC="torch==2.13.0"') for w, r in ins)
    user = [r for w, r in ins if w == "USER"]
    # Numeric uid:gid, not root: the kubelet can only check runAsNonRoot against a number.
    assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1]) and words.index("USER") < words.index("ENTRYPOINT")
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


# --- the GPU variant: Dockerfile target `gpu`, deploy/k8s/gpu/ ------------------------------------

GPU_K8S = DEPLOY / "k8s" / "gpu"


def gpu_objects() -> dict[str, dict]:
    by_kind = {d["kind"]: d for f in sorted(GPU_K8S.glob("*.yaml")) for d in yaml_docs(f)}
    assert set(by_kind) == {"Deployment", "ConfigMap", "PersistentVolumeClaim"}
    return by_kind


def stage_instructions(name: str) -> list[tuple[str, str]]:
    """The instructions of Dockerfile stage `name` (FROM line first)."""
    out, inside = [], False
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            inside = rest.split()[-1] == name
        if inside:
            out.append((word, rest))
    return out


def stage_env(name: str) -> dict[str, str]:
    """ENV in effect in stage `name`: its parents' (by FROM chain) then its own."""
    ins = stage_instructions(name)
    parent = ins[0][1].split()[0]
    env = stage_env(parent) if any(r.split()[-1] == parent for w, r in dockerfile_instructions() if w == "FROM") \
        else {}
    for word, rest in ins:
        if word == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    return env


def test_gpu_image_target_checks_for_cuda_torch_and_triton():
    ins = stage_instructions("gpu")
    assert ins and ins[0] == ("FROM", "base AS gpu")
    check = " ".join(r for w, r in ins if w == "RUN")
    assert "torch.version.cuda" in check and "import torch, triton" in check
    env = stage_env("gpu")
    assert env["LORAMUX_DEVICE"] == "cuda"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]
    # The image the GPU manifests run is that target's, named so.
    assert server_container(gpu_objects()["Deployment"])["image"].endswith("-gpu")


def test_gpu_deployment_requests_one_gpu():
    objs = gpu_objects()
    dep, cm = objs["Deployment"], objs["ConfigMap"]
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    res = c["resources"]
    # An extended resource: the limit is what the scheduler reads; a request must equal it.
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"].get("nvidia.com/gpu", 1) == 1
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == cm["data"]["LORAMUX_NUM_THREADS"]
    assert cm["data"]["LORAMUX_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # two RWO volumes and one GPU change hands


def test_gpu_model_comes_from_a_read_only_volume():
    objs = gpu_objects()
    dep, cm, pvc = objs["Deployment"], objs["ConfigMap"], objs["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]["spec"]
    c = server_container(dep)
    model = Path(cm["data"]["LORAMUX_MODEL"])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) in model.parents)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # The loader pod (not applied with the directory) mounts that claim writable, at the same path.
    (loader,) = [d for f in sorted((GPU_K8S / "loader").glob("*.yaml")) for d in yaml_docs(f)]
    lpod = dict(pod_templates([loader]))[loader["metadata"]["name"]]
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in lpod["volumes"] if "persistentVolumeClaim" in v}
    lmount = next(m for m in lpod["containers"][0]["volumeMounts"] if claim.get(m["name"]) == pvc["metadata"]["name"])
    assert lmount["mountPath"] == mount["mountPath"] and not lmount.get("readOnly")
    assert loader["metadata"]["labels"]["app.kubernetes.io/name"] != "loramux", "the Service must not select it"
    assert not restricted_violations(lpod)


def test_gpu_variant_keeps_the_cpu_security_probes_keys_and_shutdown():
    cpu, gpu = k8s_objects(), gpu_objects()
    cpu_dep, gpu_dep = cpu["Deployment"], gpu["Deployment"]
    assert not restricted_violations(gpu_dep["spec"]["template"]["spec"])
    for key in ("name", "namespace", "labels"):
        assert gpu_dep["metadata"][key] == cpu_dep["metadata"][key], key  # replaces the CPU one
    assert gpu["ConfigMap"]["metadata"] == cpu["ConfigMap"]["metadata"]
    assert all(d["metadata"]["namespace"] == cpu["Namespace"]["metadata"]["name"] for d in gpu.values())
    assert cpu["Service"]["spec"]["selector"].items() <= gpu_dep["spec"]["template"]["metadata"]["labels"].items()
    cpu_pod, gpu_pod = cpu_dep["spec"]["template"]["spec"], gpu_dep["spec"]["template"]["spec"]
    assert gpu_pod["securityContext"] == cpu_pod["securityContext"]
    assert gpu_pod["automountServiceAccountToken"] is False
    assert gpu_pod["terminationGracePeriodSeconds"] == cpu_pod["terminationGracePeriodSeconds"]
    c_cpu, c_gpu = server_container(cpu_dep), server_container(gpu_dep)
    for key in ("securityContext", "readinessProbe", "livenessProbe", "lifecycle", "env", "envFrom", "ports"):
        assert c_gpu[key] == c_cpu[key], key
    # The startup probe asks the same route; it may wait longer (16 GB of weights).
    assert c_gpu["startupProbe"]["httpGet"] == c_cpu["startupProbe"]["httpGet"]
    assert c_gpu["startupProbe"]["failureThreshold"] >= c_cpu["startupProbe"]["failureThreshold"]
    # The same Secret and adapter store.
    volumes = lambda pod: {v["name"]: v for v in pod["volumes"]}  # noqa: E731
    for name in ("keys", "adapters"):
        assert volumes(gpu_pod)[name] == volumes(cpu_pod)[name], name
    assert _shutdown_timeout(gpu["ConfigMap"]["data"]) == _shutdown_timeout(cpu["ConfigMap"]["data"])


def test_gpu_writable_paths_are_volumes():
    env = stage_env("gpu")
    store = str(Path("/app") / LoraConfig().adapters_dir)
    needed = {"/tmp", env["HOME"], env["XDG_CACHE_HOME"], env["TRITON_CACHE_DIR"], store}
    c = server_container(gpu_objects()["Deployment"])
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert all(_under(p, writable) for p in needed), (needed, writable)


def test_gpu_settings_are_server_flags():
    flags = {f.env: f for f in FLAGS}
    settings = {**{k: v for k, v in stage_env("gpu").items() if k.startswith("LORAMUX_")},
                **gpu_objects()["ConfigMap"]["data"]}
    for key, value in settings.items():
        assert key in flags or key in NON_FLAG_ENV, f"{key} is not the env var of any `loramux serve` flag"
        if key in flags and not flags[key].switch and flags[key].nargs is None:
            flags[key].convert(value)
