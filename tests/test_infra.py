"""The deployment files: Dockerfiles lint clean, KubeRay manifests (base and rendered overlays) hold
valid Kubernetes pod templates and the KubeRay fields we use, every job command they or
``infra/cluster.yaml`` run exists with every flag it passes, and the cluster-launcher config
validates against the schema Ray ships."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
K8S_VERSION = "1.30.0"
SECRET = "vfmtok-s3"

# The fields of KubeRay's ray.io/v1 CRDs these manifests use, with what the API reference
# (https://ray-project.github.io/kuberay/reference/api/) marks required; types as the CRDs declare.
_GROUP = {"type": "object", "required": ["template"], "properties": {
    "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
    "template": {"type": "object", "required": ["spec"]},
}}
_WORKERS = {"type": "array", "items": {"type": "object", "required": ["groupName", "template"], "properties": {
    **_GROUP["properties"], "groupName": {"type": "string"},
    "replicas": {"type": "integer", "minimum": 0}, "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
}}}
_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "headGroupSpec": _GROUP, "workerGroupSpecs": _WORKERS,
}, "additionalProperties": False}
KUBERAY_SCHEMAS = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "spec": _CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "spec": {"type": "object", "required": ["entrypoint"], "additionalProperties": False, "properties": {
            "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": {"type": "integer"}, "backoffLimit": {"type": "integer"},
            "submitterPodTemplate": {"type": "object", "required": ["spec"]}, "rayClusterSpec": _CLUSTER_SPEC,
        }}}},
}


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (its built-in kustomize) renders the overlays"
    out = subprocess.run([kubectl, "kustomize", str(KUBERAY / "overlays" / overlay)], capture_output=True, text=True, check=True)
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _all_objects() -> list[tuple[str, dict]]:
    objects = [(p.name, d) for p in sorted((KUBERAY / "base").glob("ray*.yaml")) for d in _load(p)]
    return objects + [(f"overlay {o}", d) for o in ("small", "large") for d in _rendered(o)]


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"]
    cluster = spec if obj["kind"] == "RayCluster" else spec["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return templates + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])


def test_every_deployment_file_parses():
    files = [*(ROOT / "infra").rglob("*.yaml")]
    assert len(files) >= 7
    for path in files:
        assert _load(path), path


@pytest.mark.parametrize("name, obj", _all_objects(), ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_objects_use_documented_fields_and_valid_pods(name, obj):
    jsonschema.validate(obj, KUBERAY_SCHEMAS[obj["kind"]])
    cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (name, group["groupName"])
    for template in _pod_templates(obj):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    for template in _pod_templates(obj)[:-1] if obj["kind"] == "RayJob" else _pod_templates(obj):
        for container in template["spec"]["containers"]:
            # S3 credentials come from the Secret, never from values in the manifest.
            assert {"secretRef": {"name": SECRET}} in container.get("envFrom", []), (name, container["name"])
            assert not any(e.get("name", "").startswith("AWS_") and "value" in e for e in container.get("env", []))
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"][0]["template"]["spec"]
    resources = gpu["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    shm = [v for v in gpu["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_overlays_size_the_clusters():
    def workers(overlay: str) -> dict[str, int]:
        return {d["metadata"]["name"]: (d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"])
                ["workerGroupSpecs"][0]["maxReplicas"] for d in _rendered(overlay)}

    assert set(workers("small").values()) == {1} and set(workers("large").values()) == {8}


def _commands() -> list[str]:
    """Every job command the deployment files run: RayJob entrypoints and cluster.yaml's examples."""
    commands = [obj["spec"]["entrypoint"] for _, obj in _all_objects() if obj["kind"] == "RayJob"]
    for line in (ROOT / "infra" / "cluster.yaml").read_text().splitlines():
        if "python -m jobs." in line:
            commands.append(line.split(" -- ", 1)[1])
    return commands


@cache
def _help(module: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_every_job_command_exists_with_every_flag_it_passes():
    commands = _commands()
    assert len(commands) >= 6
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), command
        known = set(re.findall(r"(--[a-z0-9-]+)", _help(words[2])))
        flags = [w.split("=")[0] for w in words[3:] if w.startswith("--")]
        assert flags and set(flags) <= known, (command, set(flags) - known)


def test_cluster_yaml_validates_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(ROOT / "infra" / "cluster.yaml")[0]
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws" and config["docker"]["image"].endswith("vfmtok:cuda")


def test_dockerfiles_lint_clean_and_pin_what_the_manifests_use():
    import ray

    hadolint = Path(sys.executable).parent / "hadolint"
    dockerfiles = sorted((ROOT / "infra" / "docker").glob("Dockerfile*"))
    done = subprocess.run([str(hadolint), "--no-color", *map(str, dockerfiles)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    versions = {obj["spec"].get("rayVersion") or obj["spec"]["rayClusterSpec"]["rayVersion"] for _, obj in _all_objects()}
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        assert f"ARG RAY_VERSION={ray.__version__}" in text and versions == {ray.__version__}
        assert re.search(r"^USER 1000", text, re.M)  # not root
    cuda = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "ARG TORCH_VERSION=2.14.1" in cuda and "ARG TRITON_VERSION=3.8.0" in cuda  # the pair CUDA torch 2.14.1 requires
