"""The GPU variant of the deployment: the Dockerfile's `gpu` target and deploy/k8s/gpu/ keep every
rule of the CPU manifests (tests/test_deploy.py) and ask for one GPU. No Docker, no cluster."""

from __future__ import annotations

import shlex
from pathlib import Path

from deploy_files import (DEPLOY, NON_FLAG_ENV, dockerfile_instructions, is_under, k8s_objects, pod_templates,
                          restricted_violations, server_container, shutdown_timeout, yaml_docs)
from server.cli import FLAGS
from server.config import LoraConfig


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
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == str(int(cm["data"]["LORAMUX_NUM_THREADS"]) + 1)
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
    assert shutdown_timeout(gpu["ConfigMap"]["data"]) == shutdown_timeout(cpu["ConfigMap"]["data"])


def test_gpu_writable_paths_are_volumes():
    env = stage_env("gpu")
    store = str(Path("/app") / LoraConfig().adapters_dir)
    needed = {"/tmp", env["HOME"], env["XDG_CACHE_HOME"], env["TRITON_CACHE_DIR"], store}
    c = server_container(gpu_objects()["Deployment"])
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert all(is_under(p, writable) for p in needed), (needed, writable)


def test_gpu_settings_are_server_flags():
    flags = {f.env: f for f in FLAGS}
    settings = {**{k: v for k, v in stage_env("gpu").items() if k.startswith("LORAMUX_")},
                **gpu_objects()["ConfigMap"]["data"]}
    for key, value in settings.items():
        assert key in flags or key in NON_FLAG_ENV, f"{key} is not the env var of any `loramux serve` flag"
        if key in flags and not flags[key].switch and flags[key].nargs is None:
            flags[key].convert(value)
