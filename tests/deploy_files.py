"""What the deployment tests read: the shipped files, parsed, and the rules they are checked
against (Pod Security "restricted"). No server, no Docker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.cli import FLAGS
from server.config import ServerConfig

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loramux.json"


# Environment variables the server reads that are not flags.
NON_FLAG_ENV = {"LORAMUX_CACHE"}


# The restricted profile's rules (kubernetes.io/docs/concepts/security/pod-security-standards).
PSS_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                    "projected", "secret"}


PSS_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                    "net.ipv4.tcp_keepalive_probes"}


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict]:
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml_docs(f)]


def k8s_objects() -> dict[str, dict]:
    by_kind = {d["kind"]: d for d in k8s_docs()}
    assert set(by_kind) == {"Namespace", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"}
    return by_kind


def server_container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


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


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def shutdown_timeout(settings: dict) -> float:
    flag = next(f for f in FLAGS if f.name == "shutdown-timeout")
    return flag.convert(settings[flag.env]) if flag.env in settings else ServerConfig().shutdown_timeout


def compose_seconds(text: str) -> float:
    """A compose duration: '75s', '1m30s', '90'."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?|(\d+)", str(text))
    assert parts, text
    minutes, seconds, bare = parts.groups()
    return float(bare) if bare else 60 * int(minutes or 0) + int(seconds or 0)


def is_under(path: str, roots: set[str]) -> bool:
    return any(Path(path) == Path(r) or Path(r) in Path(path).parents for r in roots)


def service_link_env(service: dict) -> dict[str, str]:
    """The variables the kubelet puts into every container of a pod in `service`'s namespace when
    the pod's enableServiceLinks is not false (docker-links style, kubernetes.io/docs/concepts/
    services-networking/service/#environment-variables), with a made-up cluster IP."""
    name, ip = service["metadata"]["name"].upper().replace("-", "_"), "10.96.0.10"
    ports = service["spec"]["ports"]
    env = {f"{name}_SERVICE_HOST": ip, f"{name}_SERVICE_PORT": str(ports[0]["port"]),
           f"{name}_PORT": f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"}
    for p in ports:
        proto, port = p.get("protocol", "TCP"), p["port"]
        base = f"{name}_PORT_{port}_{proto}"
        env.update({base: f"{proto.lower()}://{ip}:{port}", base + "_PROTO": proto.lower(), base + "_PORT": str(port),
                    base + "_ADDR": ip})
        if p.get("name"):
            env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(port)
    return env
