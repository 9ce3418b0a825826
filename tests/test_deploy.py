"""Deployment files stay in step with the code: they parse, every shipped pod passes Pod Security
"restricted", keys come only from a Secret, shutdown and probes match the server, and every
LORAMUX_* setting they pass is a real server flag. Fast: no server, no Docker (none runs on the
dev machines). The dashboard: tests/test_dashboard.py; the GPU variant: tests/test_deploy_gpu.py."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

from deploy_files import (DASHBOARD, DEPLOY, NON_FLAG_ENV, ROOT, compose_seconds, dockerfile_instructions, is_under,
                          k8s_docs, k8s_objects, pod_templates, restricted_violations, server_container,
                          service_link_env, shutdown_timeout, yaml_docs)
from server.api.shutdown import FLUSH_S, UNGATED_PATHS
from server.cli import FLAGS
from server.config import LoraConfig


def test_every_deploy_file_parses():
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 6, files
    for path in files:
        assert yaml_docs(path), f"{path} is empty"
    json.loads(DASHBOARD.read_text())


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
    # the engine core's torch threads, plus one core for the HTTP server process
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"] \
        == str(int(cm["data"]["LORAMUX_NUM_THREADS"]) + 1)
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


def test_grace_period_covers_the_drain():
    """Kubernetes kills the pod terminationGracePeriodSeconds after it starts stopping it: that must
    cover the preStop sleep, --shutdown-timeout, then the abort's flush and uvicorn's close."""
    by_kind = k8s_objects()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    c = server_container(by_kind["Deployment"])
    timeout = shutdown_timeout(by_kind["ConfigMap"]["data"])
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
    assert compose_seconds(svc["stop_grace_period"]) >= shutdown_timeout(svc["environment"]) + 2 * FLUSH_S


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
    assert all(is_under(p, writable) for p in needed), (needed, writable)
    svc = yaml_docs(DEPLOY / "docker-compose.yml")[0]["services"]["loramux"]
    assert svc["read_only"] is True and "ALL" in svc["cap_drop"]
    compose_writable = set(svc["tmpfs"]) | {spec.split(":")[1] for spec in svc["volumes"] if not spec.endswith(":ro")}
    assert all(is_under(p, compose_writable) for p in needed - {store}), (needed, compose_writable)


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


def test_no_service_link_variable_sets_a_flag():
    """The kubelet gives each container LORAMUX_PORT=tcp://<cluster IP>:8000 and friends for the
    Service `loramux` unless the pod sets enableServiceLinks: false. LORAMUX_PORT is --port's
    variable: the server would refuse to start (or, were the value a number, bind elsewhere)."""
    flags = {f.env for f in FLAGS}
    svc = k8s_objects()["Service"]
    docs = [d for f in sorted(DEPLOY.rglob("*.y*ml")) for d in yaml_docs(f) if isinstance(d, dict) and "kind" in d]
    for name, pod in pod_templates(docs):
        if pod.get("enableServiceLinks") is False:
            continue
        clash = sorted(set(service_link_env(svc)) & flags)
        assert not clash, f"{name}: the kubelet would set {clash} from the Service {svc['metadata']['name']!r}; " \
                          "set enableServiceLinks: false in the pod"
