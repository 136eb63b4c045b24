"""Every deployment YAML in k8s/ and cluster/ is parsed and checked, offline and in seconds.

KubeRay documents (RayCluster, RayJob) are validated (Draft 7) against the JSON schemas of KubeRay
v1.7.0's CRDs (k8s/schemas/, copies of ../shared/k8s-schemas/). Those schemas accept unknown fields
(Kubernetes prunes them silently), so the tests also walk every document against the schema's
`properties`, port the operator's own admission checks, and hold the manifests to raycpt's
deployment policy: pinned images, secrets only by reference, a head that takes no work and is
not exposed, spot GPU workers that drain gracefully, RayJobs that retry on a fresh cluster.

Cluster-launcher YAMLs go through Ray's own `prepare_config` + `validate_config` (what `ray up`
runs before it talks to a cloud) and the same policy checks.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CLUSTER = REPO / "cluster"
REPO_SCHEMAS = K8S / "schemas"
SHARED_SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
SCHEMA_FILES = {"RayCluster": "rayclusters.v1.schema.json", "RayJob": "rayjobs.v1.schema.json"}

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------
# Loading


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.relative_to(REPO)}: no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path.relative_to(REPO)}: a document is not a mapping"
    return docs


K8S_FILES = _yaml_files(K8S)
CLUSTER_FILES = _yaml_files(CLUSTER)
K8S_DOCS = [(p, d) for p in K8S_FILES for d in _docs(p)]
KUBERAY_DOCS = [(p, d) for p, d in K8S_DOCS if d.get("kind") in SCHEMA_FILES]
RAYCLUSTERS = [(p, d) for p, d in KUBERAY_DOCS if d["kind"] == "RayCluster"]
RAYJOBS = [(p, d) for p, d in KUBERAY_DOCS if d["kind"] == "RayJob"]


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(REPO)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(_id(item), _cluster_spec(item[1])) for item in KUBERAY_DOCS
            if item[1]["kind"] == "RayCluster" or "rayClusterSpec" in item[1]["spec"]]


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for the head, every worker group, a RayJob's submitter, a Job."""
    if doc["kind"] == "Job":
        yield "template", doc["spec"]["template"]
        return
    if doc["kind"] not in SCHEMA_FILES:
        return
    if doc["kind"] == "RayJob":
        if "submitterPodTemplate" in doc["spec"]:
            yield "submitterPodTemplate", doc["spec"]["submitterPodTemplate"]
        if "rayClusterSpec" not in doc["spec"]:
            return
    spec = _cluster_spec(doc)
    yield "headGroupSpec", spec["headGroupSpec"]["template"]
    for g in spec.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{g['groupName']}]", g["template"]


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


POD_DOCS = [(p, d) for p, d in K8S_DOCS if any(True for _ in _pod_templates(d))]


def _gpu_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in spec.get("workerGroupSpecs", [])
            if any(GPU in (c.get("resources", {}).get("limits") or {}) for c in g["template"]["spec"]["containers"])]


def _schema(kind: str) -> dict[str, Any]:
    return json.loads((REPO_SCHEMAS / SCHEMA_FILES[kind]).read_text())


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every mapping entry of a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------
# Inventory and schemas


def test_manifests_are_present():
    names = {p.name for p in K8S_FILES}
    assert {"raycluster.yaml", "rayjob-cpt.yaml", "rayjob-sweep.yaml", "pdb.yaml"} <= names, names
    assert {"aws-spot.yaml", "local.yaml"} <= {p.name for p in CLUSTER_FILES}
    assert len(RAYCLUSTERS) >= 1 and len(RAYJOBS) >= 1


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_repo_schemas_are_the_shared_ones(kind):
    repo_copy = REPO_SCHEMAS / SCHEMA_FILES[kind]
    assert repo_copy.is_file(), f"{repo_copy} missing: copy it from ../shared/k8s-schemas/"
    schema = json.loads(repo_copy.read_text())
    assert schema["properties"]["kind"]["type"] == "string" and "spec" in schema["properties"]
    shared = SHARED_SCHEMAS / SCHEMA_FILES[kind]
    if not shared.is_file():
        pytest.skip("../shared/k8s-schemas/ is not beside this checkout")
    assert repo_copy.read_bytes() == shared.read_bytes(), f"{repo_copy} differs from {shared}; copy it again"


@pytest.mark.parametrize("item", K8S_DOCS, ids=_id)
def test_k8s_document_header(item):
    path, doc = item
    assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), _id(item)
    name = doc.get("metadata", {}).get("name", "")
    # DNS-1035 label (what KubeRay requires for RayCluster / RayJob names)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{_id(item)}: bad metadata.name {name!r}"
    assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "raycpt", _id(item)
    if doc["kind"] in SCHEMA_FILES:
        assert doc["apiVersion"] == "ray.io/v1", f"{_id(item)}: use apiVersion ray.io/v1"
    # Secret values never live in this repository: docs/deploying.md creates them with kubectl.
    assert doc["kind"] != "Secret", f"{path.relative_to(REPO)}: no Secret manifests in the repo"


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=_id)
def test_kuberay_document_matches_crd_schema(item):
    _, doc = item
    validator = jsonschema.Draft7Validator(_schema(doc["kind"]))
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors


def _unknown_fields(node: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    if isinstance(node, dict):
        props = schema.get("properties")
        if props is not None:
            for k, v in node.items():
                if k not in props:
                    yield f"{path}.{k}" if path else k
                else:
                    yield from _unknown_fields(v, props[k], f"{path}.{k}" if path else k)
        elif isinstance(schema.get("additionalProperties"), dict):
            for k, v in node.items():
                yield from _unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(node):
            yield from _unknown_fields(v, schema["items"], f"{path}[{i}]")


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=_id)
def test_kuberay_document_has_no_unknown_fields(item):
    _, doc = item
    unknown = list(_unknown_fields(doc, _schema(doc["kind"]), ""))
    assert not unknown, f"fields the CRD does not know (Kubernetes would drop them silently): {unknown}"


def test_unknown_field_walk_catches_a_typo():
    doc = copy.deepcopy(RAYCLUSTERS[0][1])
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerationz"] = []
    doc["spec"]["headGroupSpec"]["rayStartParams"]["block"] = "true"  # a free-form map: not flagged
    unknown = list(_unknown_fields(doc, _schema("RayCluster"), ""))
    assert unknown == ["spec.workerGroupSpecs[0].template.spec.tolerationz"]


# ---------------------------------------------------------------------------------------------
# The operator's admission rules (ray-operator/controllers/ray/utils/validation.go at v1.7.0)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=_id)
def test_kuberay_admission_rules(item):
    _, doc = item
    max_name = 53 if doc["kind"] == "RayCluster" else 47
    assert len(doc["metadata"]["name"]) <= max_name, f"{_id(item)}: name longer than {max_name}"
    if doc["kind"] == "RayJob":
        s = doc["spec"]
        assert s.get("submissionMode") != "InteractiveMode" or not s.get("backoffLimit")
        assert not (s.get("clusterSelector") and s.get("backoffLimit")), "backoffLimit needs rayClusterSpec"
        if s.get("submissionMode") == "SidecarMode":
            assert "submitterPodTemplate" not in s and "submitterConfig" not in s
        if "submitterPodTemplate" in s:
            assert s["submitterPodTemplate"]["spec"].get("restartPolicy") in ("Never", "OnFailure")
        yaml.safe_load(s.get("runtimeEnvYAML", "") or "{}")
        assert s.get("activeDeadlineSeconds", 1) > 0, "activeDeadlineSeconds must be a positive integer"
        if not s.get("shutdownAfterJobFinishes"):
            assert not s.get("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
        strategy = s.get("deletionStrategy")
        if strategy is not None:
            rules = strategy.get("deletionRules") or []
            legacy = "onSuccess" in strategy or "onFailure" in strategy
            assert bool(rules) != legacy, "deletionStrategy: deletionRules, or both onSuccess and onFailure"
            if rules:
                assert not s.get("shutdownAfterJobFinishes"), \
                    "shutdownAfterJobFinishes and deletionRules exclude each other"
                autoscaling = s.get("rayClusterSpec", {}).get("enableInTreeAutoscaling", False)
                seen = set()
                for r in rules:
                    c = r["condition"]
                    assert ("jobStatus" in c) != ("jobDeploymentStatus" in c), f"{r}: jobStatus or jobDeploymentStatus"
                    assert not (autoscaling and r["policy"] == "DeleteWorkers"), "DeleteWorkers needs autoscaling off"
                    key = (c.get("jobStatus"), r["policy"])
                    assert key not in seen, f"duplicate deletion rule {key}"
                    seen.add(key)
                order = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # TTLs may not decrease along it
                for status in {c.get("jobStatus") for c in (r["condition"] for r in rules)}:
                    ttls = [next(r["condition"].get("ttlSeconds", 0) for r in rules
                                 if r["condition"].get("jobStatus") == status and r["policy"] == p)
                            for p in order if any(r["condition"].get("jobStatus") == status and r["policy"] == p
                                                  for r in rules)]
                    assert ttls == sorted(ttls), f"jobStatus {status}: TTLs must follow Workers <= Cluster <= Self"
            else:
                assert "onSuccess" in strategy and "onFailure" in strategy
        if "rayClusterSpec" not in s:
            return
    spec = _cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, g in groups:
        assert g["template"]["spec"]["containers"], f"{name}: no container"
        rsp = g.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in rsp.values()), f"{name}: rayStartParams values must be strings"
        assert "labels" not in rsp, f"{name}: use the group's labels field"
        if any(k in rsp for k in ("num-cpus", "num-gpus", "memory", "resources")):
            assert not g.get("resources"), f"{name}: resources in both rayStartParams and resources"
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = spec.get("autoscalerOptions", {}).get("version") == "v2"
    for g in spec.get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        assert lo is not None and hi is not None and 0 <= lo <= hi, f"{g['groupName']}: need 0 <= min <= max"
        assert lo <= g.get("replicas", lo) <= hi, f"{g['groupName']}: replicas outside [min, max]"
        if "idleTimeoutSeconds" in g:
            assert autoscaling and v2, f"{g['groupName']}: idleTimeoutSeconds needs autoscaler v2"
        if v2:
            assert g["template"]["spec"].get("restartPolicy", "Never") == "Never"
    if spec.get("authOptions", {}).get("mode") == "token":
        assert _version(spec.get("rayVersion", "0")) >= (2, 52, 0), "token auth needs rayVersion >= 2.52.0"


# ---------------------------------------------------------------------------------------------
# raycpt's deployment policy


def _image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.split(":", 1)[1] not in ("", "latest", "nightly")


def test_image_pin_rule():
    assert _image_is_pinned("rayproject/ray:2.60.0-py311-gpu")
    assert _image_is_pinned("registry.example:5000/raycpt@sha256:" + "a" * 64)
    assert not _image_is_pinned("rayproject/ray")
    assert not _image_is_pinned("rayproject/ray:latest")
    assert not _image_is_pinned("registry.example:5000/raycpt")


@pytest.mark.parametrize("path", K8S_FILES + CLUSTER_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_image_is_pinned(path):
    images = [(where, k, v) for d in _docs(path) for where, k, v in _walk(d)
              if k in ("image", "head_image", "worker_image")]
    for where, k, v in images:
        assert isinstance(v, str) and _image_is_pinned(v), f"{where}.{k}: {v!r} is not pinned to a tag or digest"
    if path.parent == K8S and any(d.get("kind") in SCHEMA_FILES for d in _docs(path)):
        assert images, "a KubeRay manifest with no image?"


def test_ray_images_are_the_release_pyproject_pins():
    """Client, cluster and launcher must run one Ray release (pyproject.toml pins it)."""
    ray_req = _pyproject_dependencies()["ray"]
    tags = {v.split(":", 1)[1] for p in K8S_FILES + CLUSTER_FILES for d in _docs(p) for _, k, v in _walk(d)
            if k in ("image", "head_image", "worker_image") and str(v).startswith("rayproject/ray:")}
    assert tags
    for tag in tags:
        version = tag.split("-", 1)[0]
        assert ray_req.specifier.contains(version), f"image tag {tag}: Ray {version} is outside pyproject's {ray_req}"


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=_id)
def test_ray_version_matches_images(item):
    _, doc = item
    if doc["kind"] == "RayJob" and "rayClusterSpec" not in doc["spec"]:
        return
    version = _cluster_spec(doc)["rayVersion"]
    for where, template in _pod_templates(doc):
        for c in _containers(template):
            if c["image"].startswith("rayproject/ray:"):
                assert c["image"].split(":", 1)[1].startswith(version + "-"), f"{where}: {c['image']} vs {version}"


@pytest.mark.parametrize("item", POD_DOCS, ids=_id)
def test_every_container_has_requests_and_limits(item):
    _, doc = item
    found = 0
    for where, template in _pod_templates(doc):
        for c in _containers(template):
            found += 1
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part) or {}), f"{where}/{c['name']}: resources.{part}"
            assert res["limits"]["memory"] == res["requests"]["memory"], f"{where}/{c['name']}: memory request != limit"
    assert found
    if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc.get("spec", {}):
        auto = _cluster_spec(doc).get("autoscalerOptions", {})
        assert {"requests", "limits"} <= set(auto.get("resources", {})), "autoscalerOptions.resources"


def _inline_secrets(doc: dict[str, Any]) -> list[str]:
    """Places where a secret-looking value is written into the manifest instead of referenced."""
    found = []
    for where, key, value in _walk(doc):
        if key == "env" and isinstance(value, list):
            for e in value:
                if SECRET_NAME.search(e["name"]) and ("value" in e or "secretKeyRef" not in e.get("valueFrom", {})):
                    found.append(f"{where}.env[{e['name']}]")
        if key == "envFrom" and isinstance(value, list):
            found += [f"{where}.envFrom[{i}]" for i, e in enumerate(value)
                      if not {"secretRef", "configMapRef"} & set(e)]
    if doc.get("kind") == "RayJob":
        env_vars = (yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
        found += [f"runtimeEnvYAML.env_vars.{k}" for k in env_vars if SECRET_NAME.search(k)]
    return found


@pytest.mark.parametrize("item", K8S_DOCS, ids=_id)
def test_secrets_only_by_reference(item):
    _, doc = item
    inline = _inline_secrets(doc)
    assert not inline, f"secret-looking values must come from a Secret (valueFrom / envFrom): {inline}"


def test_secret_rule_catches_an_inline_key():
    doc = copy.deepcopy(RAYJOBS[0][1])
    c = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    c["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}, {"name": "RAY_AUTH_MODE", "value": "token"}]
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    env["env_vars"]["HF_TOKEN"] = "hf_x"
    doc["spec"]["runtimeEnvYAML"] = yaml.safe_dump(env)
    assert _inline_secrets(doc) == [
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env[AWS_SECRET_ACCESS_KEY]",
        "runtimeEnvYAML.env_vars.HF_TOKEN",
    ]


@pytest.mark.parametrize("item", POD_DOCS, ids=_id)
def test_pods_run_as_non_root(item):
    _, doc = item
    for where, template in _pod_templates(doc):
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser") == 1000, f"{where}: pod securityContext"
        for c in _containers(template):
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, f"{where}/{c['name']}: runAsNonRoot"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation"
            assert sc.get("privileged") is not True
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}/{c['name']}: drop ALL capabilities"
    if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc.get("spec", {}):
        sc = _cluster_spec(doc).get("autoscalerOptions", {}).get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False


def _node_selection(template: dict[str, Any]) -> dict[str, set[str]]:
    """label -> allowed values, from nodeSelector and required node affinity."""
    spec = template["spec"]
    out = {k: {v} for k, v in spec.get("nodeSelector", {}).items()}
    required = spec.get("affinity", {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {})
    for term in required.get("nodeSelectorTerms", []):
        for expr in term.get("matchExpressions", []):
            if expr["operator"] == "In":
                out.setdefault(expr["key"], set()).update(expr["values"])
    return out


# Capacity-type labels of Karpenter, EKS managed node groups, GKE and AKS.
SPOT_LABELS = {
    "karpenter.sh/capacity-type": "spot",
    "eks.amazonaws.com/capacityType": "SPOT",
    "cloud.google.com/gke-spot": "true",
    "kubernetes.azure.com/scalesetpriority": "spot",
}
ON_DEMAND_LABELS = {
    "karpenter.sh/capacity-type": "on-demand",
    "eks.amazonaws.com/capacityType": "ON_DEMAND",
    "cloud.google.com/gke-provisioning": "standard",
    "kubernetes.azure.com/scalesetpriority": "regular",
}


def _pinned_to(template: dict[str, Any], labels: dict[str, str]) -> bool:
    sel = _node_selection(template)
    return any(sel.get(k) == {v} for k, v in labels.items())


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=[w for w, _ in _cluster_specs()])
def test_head_takes_no_work_and_is_not_exposed(where, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "head: rayStartParams num-cpus must be \"0\""
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "head service must be ClusterIP"
    assert not head.get("enableIngress"), "head: no Ingress for the dashboard / job API"
    svc_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
    assert svc_type == "ClusterIP"
    assert spec.get("authOptions", {}).get("mode") == "token", "Ray token authentication must be on"
    assert spec["authOptions"].get("secretName"), "authOptions.secretName: the token Secret created with kubectl"
    assert _pinned_to(head["template"], ON_DEMAND_LABELS), "head must be pinned to on-demand nodes"
    assert spec.get("enableInTreeAutoscaling") is True, "autoscaling must be on"


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=[w for w, _ in _cluster_specs()])
def test_workers_are_on_spot(where, spec):
    """Every worker group is on spot, except on-demand fallbacks the autoscaler ranks below the
    spot groups of their kind (a lower `priority`), for when spot capacity is gone."""
    groups = spec.get("workerGroupSpecs", [])
    assert _gpu_groups(spec), "no GPU worker group"
    spot = [g for g in groups if _pinned_to(g["template"], SPOT_LABELS)]
    for g in groups:
        t = g["template"]
        if g not in spot and _pinned_to(t, ON_DEMAND_LABELS):
            gpu = g in _gpu_groups(spec)  # priorities rank the groups that can take the same work
            peers = [s for s in spot if (s in _gpu_groups(spec)) == gpu]
            assert peers, f"{g['groupName']}: an on-demand group is a fallback for a spot group of its kind"
            assert g.get("priority", 0) < min(s.get("priority", 0) for s in peers), \
                f"{g['groupName']}: an on-demand group needs a lower priority than the spot groups of its kind"
            assert g["minReplicas"] == 0, f"{g['groupName']}: minReplicas 0 (on-demand only while needed)"
            continue
        assert _pinned_to(t, SPOT_LABELS), f"{g['groupName']}: select spot nodes (nodeSelector / required affinity)"
        keys = {tol.get("key") for tol in t["spec"].get("tolerations", [])}
        assert keys & {"spot", "karpenter.sh/capacity-type", "cloud.google.com/gke-spot",
                       "kubernetes.azure.com/scalesetpriority"}, f"{g['groupName']}: tolerate the spot taint"
        assert g["minReplicas"] == 0, f"{g['groupName']}: minReplicas 0 (no idle spot nodes)"
        assert g["maxReplicas"] >= 1
    for g in _gpu_groups(spec):
        keys = {tol.get("key") for tol in g["template"]["spec"].get("tolerations", [])}
        assert GPU in keys, f"{g['groupName']}: tolerate the {GPU} taint"
        for c in g["template"]["spec"]["containers"]:
            lim, req = c["resources"]["limits"], c["resources"].get("requests", {})
            if GPU in lim:
                assert int(lim[GPU]) >= 1, f"{g['groupName']}: no GPU in the GPU group"
                assert req.get(GPU, lim[GPU]) == lim[GPU], f"{g['groupName']}: GPU request != limit"


def _prestop_script(container: dict[str, Any]) -> str:
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    assert cmd[:2] == ["/bin/bash", "-c"] and len(cmd) == 3, f"{container['name']}: preStop must be bash -c <script>"
    return cmd[2]


def _drain_flags(script: str) -> dict[str, str]:
    lines = [ln for ln in script.splitlines() if "ray drain-node" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, "exactly one `ray drain-node` call"
    tokens = shlex.split(lines[0])
    tokens = tokens[tokens.index("drain-node") + 1:]
    flags: dict[str, str] = {}
    while tokens and tokens[0].startswith("--"):
        opt = tokens.pop(0)
        if "=" in opt:
            opt, val = opt.split("=", 1)
        else:
            val = tokens.pop(0)
        flags[opt] = val
    return flags


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=[w for w, _ in _cluster_specs()])
def test_gpu_workers_drain_before_they_stop(where, spec):
    for g in _gpu_groups(spec):
        pod = g["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        assert grace >= 60, f"{g['groupName']}: terminationGracePeriodSeconds too short to checkpoint"
        script = _prestop_script(pod["containers"][0])
        flags = _drain_flags(script)
        assert flags["--reason"] == "DRAIN_NODE_REASON_PREEMPTION"
        # Without --node-id the CLI drains the node its own driver attached to, which need not
        # be this pod's raylet; name it explicitly.
        assert "--node-id" in flags, "pass this pod's Ray node id to ray drain-node"
        assert 0 < int(flags["--deadline-remaining-seconds"]) < grace
        bound = re.search(r"stop_by=\$\(\(SECONDS \+ (\d+)\)\)", script)
        assert bound and int(bound.group(1)) < grace, "the hook must end before the grace period does"
        assert "RayTrainWorker" in script, "the hook waits for the training workers to checkpoint"


def _all_prestop_scripts() -> list[tuple[str, str]]:
    out = []
    for item in KUBERAY_DOCS:
        for where, template in _pod_templates(item[1]):
            for c in template["spec"]["containers"]:
                if "lifecycle" in c:
                    out.append((f"{_id(item)} {where}/{c['name']}", _prestop_script(c)))
    return out


def test_prestop_hooks_match_the_installed_ray_cli():
    from ray.scripts.scripts import drain_node

    options = {opt: p for p in drain_node.params for opt in p.opts}
    scripts = _all_prestop_scripts()
    assert scripts
    for where, script in scripts:
        for flag, value in _drain_flags(script).items():
            assert flag in options, f"{where}: `ray drain-node` has no {flag}"
            choices = getattr(options[flag].type, "choices", None)
            if choices:
                assert value in choices, f"{where}: {flag} {value} not in {choices}"
        required = {p.opts[0] for p in drain_node.params if p.required}
        assert required <= set(_drain_flags(script)), f"{where}: missing {required}"


def _bash_scripts() -> list[tuple[str, str]]:
    """Every `bash -c <script>` command (preStop hooks, Jobs) in k8s/."""
    return [(f"{_id(item)} {where}.{key}", value[2]) for item in K8S_DOCS for where, key, value in _walk(item[1])
            if key == "command" and isinstance(value, list) and value[:2] == ["/bin/bash", "-c"] and len(value) == 3]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_shell_scripts_in_manifests_are_valid_bash():
    scripts = _bash_scripts()
    assert len(scripts) >= len(_all_prestop_scripts()) >= 1
    for where, script in scripts:
        r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, f"{where}: {r.stderr}"


def test_rayjob_clusters_match_the_raycluster():
    """The RayJobs embed k8s/raycluster.yaml's spec; only worker-group sizes may differ."""

    def normalised(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        for g in spec.get("workerGroupSpecs", []):
            for k in ("minReplicas", "maxReplicas", "replicas"):
                g.pop(k, None)
        return spec

    (_, reference), = [(p, d) for p, d in RAYCLUSTERS if p.name == "raycluster.yaml"]
    for item in RAYJOBS:
        assert normalised(item[1]["spec"]["rayClusterSpec"]) == normalised(reference["spec"]), \
            f"{_id(item)}: rayClusterSpec drifted from k8s/raycluster.yaml"


def _pyproject_dependencies() -> dict[str, Any]:
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_retries_on_a_fresh_cluster_and_cleans_up(item):
    _, doc = item
    s = doc["spec"]
    assert s.get("backoffLimit", 0) >= 1, "backoffLimit >= 1: a failed attempt restarts on a fresh cluster"
    assert isinstance(s.get("activeDeadlineSeconds"), int) and s["activeDeadlineSeconds"] >= 24 * 3600, \
        "activeDeadlineSeconds: a cap on the job's wall-clock time (days for a CPT run)"
    # The cluster is deleted however the job ends: by deletion rules for every outcome (KubeRay
    # forbids shutdownAfterJobFinishes beside them), or by the legacy shutdown flag.
    rules = s.get("deletionStrategy", {}).get("deletionRules")
    if rules:
        covered = {r["condition"].get("jobStatus") or f"deployment:{r['condition'].get('jobDeploymentStatus')}"
                   for r in rules if r["policy"] in ("DeleteCluster", "DeleteSelf")}
        assert {"SUCCEEDED", "FAILED", "deployment:Failed"} <= covered, f"deletion rules leave a cluster: {covered}"
    else:
        assert s.get("shutdownAfterJobFinishes") is True
        assert isinstance(s.get("ttlSecondsAfterFinished"), int) and s["ttlSecondsAfterFinished"] >= 0
    assert s.get("submissionMode") == "K8sJobMode"
    assert "rayClusterSpec" in s and "clusterSelector" not in s
    assert not s.get("suspend")


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_runs_a_raycpt_command_on_a_job_yaml(item):
    _, doc = item
    m = re.fullmatch(r"(?:raycpt|python -m raycpt\.cli) (train|tune) (jobs/[\w.-]+\.ya?ml)(?: \S+=\S+)*",
                     doc["spec"]["entrypoint"].strip())
    assert m, f"entrypoint {doc['spec']['entrypoint']!r} is not `raycpt train|tune jobs/<job>.yaml`"
    assert (REPO / m.group(2)).is_file(), f"{m.group(2)} (the RayJob's job YAML) does not exist"


def test_a_rayjob_runs_each_command_on_a_yaml_it_can_load():
    """One RayJob trains, one sweeps; the sweep's YAML has a tune section `raycpt tune` accepts."""
    from raycpt.tune.config import load_sweep

    commands = {}
    for _, doc in RAYJOBS:
        cmd, job = doc["spec"]["entrypoint"].split()[-2:] if "=" not in doc["spec"]["entrypoint"] else (None, None)
        commands.setdefault(cmd, []).append(job)
    assert {"train", "tune"} <= set(commands), commands
    for job in commands["tune"]:
        _, tune = load_sweep(REPO / job)
        assert tune.space and tune.max_concurrent_trials, f"{job}: a cluster sweep names its concurrency"


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_runtime_env_installs_raycpt_dependencies(item):
    from packaging.requirements import Requirement

    _, doc = item
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert re.match(r"(s3|gs|https)://\S+\.zip$", env["working_dir"]), "working_dir: a remote zip URI"
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    pinned = {}
    for line in pip:
        r = Requirement(line)
        spec = list(r.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"pip: {line!r} must be pinned with =="
        pinned[r.name.lower().replace("_", "-")] = spec[0].version
    deps = _pyproject_dependencies()
    missing = sorted(set(deps) - set(pinned) - {"ray"})
    assert not missing, f"runtimeEnvYAML pip lacks raycpt dependencies from pyproject.toml: {missing}"
    assert "ray" not in pinned, "Ray comes with the image; installing it again breaks the cluster"
    for name, version in pinned.items():
        if name in deps:
            assert deps[name].specifier.contains(version, prereleases=True), \
                f"pip pin {name}=={version} violates pyproject.toml's {deps[name]}"


def test_pdb_protects_every_head():
    pdbs = [d for _, d in K8S_DOCS if d["kind"] == "PodDisruptionBudget"]
    assert pdbs, "k8s/: no PodDisruptionBudget for the head"
    for pdb in pdbs:
        assert pdb["apiVersion"] == "policy/v1"
        s = pdb["spec"]
        assert s.get("maxUnavailable") == 0 or (s.get("minAvailable") == 1 and "maxUnavailable" not in s)
    for where, spec in _cluster_specs():
        head_labels = dict(spec["headGroupSpec"]["template"]["metadata"]["labels"], **{"ray.io/node-type": "head"})
        covering = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= head_labels.items()
                    and p["spec"]["selector"]["matchLabels"].get("ray.io/node-type") == "head"]
        assert covering, f"{where}: no PDB selects this head"
        for g in spec.get("workerGroupSpecs", []):
            worker_labels = dict(g["template"]["metadata"].get("labels", {}), **{"ray.io/node-type": "worker"})
            assert not any(p["spec"]["selector"]["matchLabels"].items() <= worker_labels.items() for p in pdbs), \
                f"{where}: a PDB would also block draining worker group {g['groupName']}"


def test_service_accounts_and_volume_claims_exist():
    accounts = {d["metadata"]["name"] for _, d in K8S_DOCS if d["kind"] == "ServiceAccount"}
    claims = {d["metadata"]["name"] for _, d in K8S_DOCS if d["kind"] == "PersistentVolumeClaim"}
    for item in POD_DOCS:
        for where, template in _pod_templates(item[1]):
            sa = template["spec"].get("serviceAccountName")
            assert sa is None or sa in accounts, f"{_id(item)} {where}: service account {sa} is not in k8s/"
            for v in template["spec"].get("volumes", []):
                claim = v.get("persistentVolumeClaim", {}).get("claimName")
                assert claim is None or claim in claims, f"{_id(item)} {where}: volume claim {claim} is not in k8s/"
            mounted = {m["name"] for c in _containers(template) for m in c.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in template["spec"].get("volumes", [])}, f"{_id(item)} {where}"


# ---------------------------------------------------------------------------------------------
# Ray cluster-launcher YAMLs


CLUSTER_CONFIGS = [(p, _docs(p)) for p in CLUSTER_FILES]


@pytest.mark.parametrize("path,docs", CLUSTER_CONFIGS, ids=[p.name for p, _ in CLUSTER_CONFIGS])
def test_launcher_config_passes_rays_own_validation(path, docs):
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert len(docs) == 1
    cfg = docs[0]
    assert {"cluster_name", "provider"} <= set(cfg) and "type" in cfg["provider"]
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert isinstance(prepared["max_workers"], int)


def _cloud_configs():
    return [(p, d[0]) for p, d in CLUSTER_CONFIGS if d[0]["provider"]["type"] != "local"]


@pytest.mark.parametrize("path,cfg", _cloud_configs(), ids=[p.name for p, _ in _cloud_configs()])
def test_cloud_launcher_puts_gpus_on_spot_and_the_head_on_demand(path, cfg):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "idle_timeout_minutes", "setup_commands"):
        assert key in cfg, f"{path.name}: missing {key}"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "head must be on-demand"
    assert head.get("resources", {}).get("CPU") == 0, "head: resources {CPU: 0} so it takes no work"
    gpu_types = [k for k, t in types.items()
                 if k != cfg["head_node_type"] and re.match(r"(p|g)\d", t["node_config"].get("InstanceType", ""))]
    assert gpu_types, "no GPU worker type"
    for k in gpu_types:
        t = types[k]
        assert t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", f"{k}: not spot"
        assert t.get("min_workers", 0) == 0 and t.get("max_workers", 0) >= 1, f"{k}: min 0, max >= 1"
    for k, t in types.items():
        assert t["node_config"].get("ImageId"), f"{k}: set ImageId (Ray's default AMI predates CUDA 12)"
    assert cfg["provider"].get("cache_stopped_nodes") is False, "spot nodes cannot be stopped; terminate"
    assert any("raycpt" in c for c in cfg["setup_commands"]), "setup_commands must install raycpt"
    assert any("spot_watch.py" in c for c in cfg["worker_start_ray_commands"]), "start the spot watcher"
    assert (CLUSTER / "spot_watch.py").is_file()


@pytest.mark.parametrize("path,docs", CLUSTER_CONFIGS, ids=[p.name for p, _ in CLUSTER_CONFIGS])
def test_launcher_turns_token_auth_on_and_keeps_the_dashboard_private(path, docs):
    cfg = docs[0]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for c in starts:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, f"{path.name}: {c!r} starts Ray without token auth"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, f"{path.name}: dashboard only on the head's loopback"
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_local_launcher_names_its_machines():
    (cfg,), = [d for p, d in CLUSTER_CONFIGS if p.name == "local.yaml"]
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and isinstance(cfg["provider"]["worker_ips"], list)
    # Ray derives the node type of an on-prem cluster itself and refuses these keys.
    assert "available_node_types" not in cfg and "head_node_type" not in cfg


def _spot_watch():
    spec = importlib.util.spec_from_file_location("spot_watch", CLUSTER / "spot_watch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spot_watch_drains_with_the_installed_ray_cli():
    from ray.scripts.scripts import drain_node

    cmd = _spot_watch().drain_command("ab" * 28, 100, "EC2 spot interruption")
    assert cmd[:2] == ["ray", "drain-node"]
    options = {opt: p for p in drain_node.params for opt in p.opts}
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert set(flags) <= set(options) and "--node-id" in flags
    assert flags["--reason"] in options["--reason"].type.choices and flags["--reason"].endswith("PREEMPTION")
    assert flags["--deadline-remaining-seconds"] == "100"


def test_spot_watch_deadline():
    sw = _spot_watch()
    now = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    notice = {"action": "terminate", "time": "2025-01-01T12:02:00Z"}
    assert sw.seconds_until(notice, now) == 120
    assert sw.drain_deadline_s(notice, now, margin_s=20) == 100
    assert sw.drain_deadline_s(notice, now + dt.timedelta(minutes=5), margin_s=20) == 0


# ---------------------------------------------------------------------------------------------
# The docs show the same commands as the manifests


def _runtime_envs_in(path: Path) -> list[dict[str, Any]]:
    """Every JSON runtime env given to `--runtime-env-json` (inline or through RUNTIME_ENV=)."""
    text = path.read_text()
    found = re.findall(r"--runtime-env-json '(\{.*?\})'", text) + re.findall(r"RUNTIME_ENV='(\{.*?\})'", text)
    return [json.loads(j) for j in found]


@pytest.mark.parametrize("doc", ["docs/deploying.md", "jobs/README.md"])
def test_documented_runtime_env_matches_the_rayjobs(doc):
    envs = _runtime_envs_in(REPO / doc)
    assert envs, f"{doc}: no --runtime-env-json example"
    for item in RAYJOBS:
        pip = yaml.safe_load(item[1]["spec"]["runtimeEnvYAML"])["pip"]
        packages = pip["packages"] if isinstance(pip, dict) else pip
        for env in envs:
            assert env["pip"] == packages, f"{doc}: pip list differs from {_id(item)}'s runtimeEnvYAML"


def test_documented_operator_version_matches_the_schemas():
    text = (REPO / "docs/deploying.md").read_text()
    versions = set(re.findall(r"kuberay/kuberay-operator --version (\S+)", text))
    assert versions == {"1.7.0"}, f"docs/deploying.md installs KubeRay {versions}; schemas are v1.7.0"
    assert "v1.7.0" in (REPO_SCHEMAS / "README.md").read_text()


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_shows_the_kueue_labels_to_opt_in(item):
    """Kueue is optional: its labels stand commented on every RayJob (an active queue-name would
    keep the job suspended where no such LocalQueue exists); the text names them exactly."""
    path, doc = item
    text = path.read_text()
    assert "# kueue.x-k8s.io/queue-name: " in text, f"{path.name}: show the Kueue queue-name label (commented)"
    assert "kueue.x-k8s.io/queue-name" not in doc["metadata"].get("labels", {}), \
        f"{path.name}: the Kueue label is opt-in; leave it commented in the shipped manifest"
    uncommented = yaml.safe_load(text.replace("# kueue.x-k8s.io/", "kueue.x-k8s.io/"))
    labels = uncommented["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?",
                                                               labels["kueue.x-k8s.io/queue-name"])
