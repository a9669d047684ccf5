"""The cluster files against the tools that read them, and the fixes a first deployment needs (issue 25).

- cluster/ray-cluster.yaml is validated against the schema Ray's own launcher validates it with
  (``ray/autoscaler/ray-schema.json`` of the installed Ray, via ``jsonschema``).
- cluster/rayjob.yaml uses only field names of KubeRay's ``ray.io/v1`` CRDs: the lists below are quoted from
  ray-project/kuberay ``ray-operator/apis/ray/v1/rayjob_types.go`` (RayJobSpec) and ``raycluster_types.go``
  (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions) — the json tags — plus ``authOptions``
  (``AuthOptions{mode}``, added in KubeRay v1.5.1; docs.ray.io "KubeRay CRD API reference"). Pod and
  container keys are Kubernetes core/v1 ``PodSpec`` / ``Container`` fields.
- Each fix is asserted by a check that the file before issue 25 fails: registry login, sync excludes,
  /dev/shm per node type and above the object store, in-tree autoscaling with min/max replicas, a head with no
  CPUs for tasks, token authentication, no unauthenticated Jobs API on 0.0.0.0, Ray's upper bound, ports.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_TEXT = (ROOT / "cluster" / "ray-cluster.yaml").read_text()
RAYJOB_TEXT = (ROOT / "cluster" / "rayjob.yaml").read_text()
LAUNCHER = yaml.safe_load(LAUNCHER_TEXT)
RAYJOB = yaml.safe_load(RAYJOB_TEXT)
DOCS = (ROOT / "docs" / "cluster.md").read_text()

# KubeRay ray.io/v1 field names (json tags), see the module docstring for where they are from
RAYJOB_TOP = {"apiVersion", "kind", "metadata", "spec"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "env", "envFrom", "volumeMounts"}
AUTH_OPTIONS = {"mode"}
POD_SPEC = {"containers", "initContainers", "volumes", "serviceAccountName", "imagePullSecrets", "tolerations",
            "nodeSelector", "affinity", "securityContext", "priorityClassName", "restartPolicy",
            "terminationGracePeriodSeconds", "schedulerName"}
CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "resources", "volumeMounts",
             "ports", "lifecycle", "securityContext", "workingDir", "readinessProbe", "livenessProbe"}
# host RAM of the launcher's instance types (AWS: m6i.4xlarge 64 GiB, p4d.24xlarge 1152 GiB)
INSTANCE_GIB = {"m6i.4xlarge": 64, "p4d.24xlarge": 1152}


def _gib(q: str | int) -> float:
    """'16Gi' / '256g' / bytes → GiB."""
    if isinstance(q, int) or str(q).isdigit():
        return int(q) / 2**30
    m = re.fullmatch(r"(\d+)(Gi|Ti|Mi|g|G)", str(q))
    assert m, q
    return int(m.group(1)) * {"Gi": 1, "g": 1, "G": 1, "Ti": 1024, "Mi": 1 / 1024}[m.group(2)]


def _flag(commands: list[str], name: str) -> str | None:
    m = re.search(rf"--{name}[= ](\S+)", " ".join(commands))
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------------------
# Validated by the tools' own definitions
# ------------------------------------------------------------------------------------------------
def test_launcher_yaml_validates_against_rays_bundled_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(LAUNCHER, schema)
    broken = {**LAUNCHER, "rsync_excludes": ["x"]}  # the schema is strict: a misspelt key fails
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _groups() -> list[tuple[str, dict]]:
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"])] + [(w["groupName"], w) for w in cluster["workerGroupSpecs"]]


def test_rayjob_uses_only_kuberay_field_names():
    assert set(RAYJOB) <= RAYJOB_TOP and RAYJOB["apiVersion"] == "ray.io/v1" and RAYJOB["kind"] == "RayJob"
    spec = RAYJOB["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    assert set(cluster.get("authOptions", {})) <= AUTH_OPTIONS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_SPEC
    for w in cluster["workerGroupSpecs"]:
        assert set(w) <= WORKER_GROUP_SPEC, set(w) - WORKER_GROUP_SPEC
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(w)
    for _, group in _groups():
        assert "rayStartParams" in group and set(group["template"]) <= {"metadata", "spec"}
        pod = group["template"]["spec"]
        assert set(pod) <= POD_SPEC, set(pod) - POD_SPEC
        for c in pod["containers"]:
            assert set(c) <= CONTAINER, set(c) - CONTAINER
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string


# ------------------------------------------------------------------------------------------------
# Launcher fixes
# ------------------------------------------------------------------------------------------------
def test_launcher_logs_in_to_the_private_registry_before_pulling():
    image = LAUNCHER["docker"]["image"]
    registry = image.split("/", 1)[0]
    logins = [c for c in LAUNCHER["initialization_commands"] if "docker login" in c]
    assert logins and registry in logins[0] and "--password-stdin" in logins[0]
    assert "ecr get-login-password" in logins[0]  # the instance profile's credentials, no password in the file
    assert LAUNCHER["docker"]["pull_before_run"] is True


def test_launcher_sync_leaves_venv_runs_and_caches_behind():
    excludes = LAUNCHER["rsync_exclude"]
    for must in ("**/.venv", "runs/", ".git", "**/__pycache__"):
        assert must in excludes, must
    assert LAUNCHER["rsync_filter"] == [".gitignore"]
    assert LAUNCHER["file_mounts"] == {"/home/ray/raymine": "."}


def test_launcher_shm_sized_per_node_type_and_above_the_object_store():
    docker = LAUNCHER["docker"]
    assert not any("--shm-size" in o for o in docker["run_options"])  # not one size for every node
    head_shm = _gib(_flag(docker["head_run_options"], "shm-size"))
    worker_shm = _gib(_flag(docker["worker_run_options"], "shm-size"))
    nodes = LAUNCHER["available_node_types"]
    head_ram = INSTANCE_GIB[nodes[LAUNCHER["head_node_type"]]["node_config"]["InstanceType"]]
    worker_ram = min(INSTANCE_GIB[n["node_config"]["InstanceType"]] for k, n in nodes.items()
                     if k != LAUNCHER["head_node_type"])
    assert head_shm <= head_ram / 2 and worker_shm <= worker_ram / 2 and head_shm < worker_shm
    assert _gib(int(_flag(LAUNCHER["head_start_ray_commands"], "object-store-memory"))) < head_shm
    assert _gib(int(_flag(LAUNCHER["worker_start_ray_commands"], "object-store-memory"))) < worker_shm


def test_launcher_head_runs_no_tasks_and_keeps_its_jobs_api_on_loopback():
    assert _flag(LAUNCHER["head_start_ray_commands"], "num-cpus") == "0"
    assert LAUNCHER["available_node_types"][LAUNCHER["head_node_type"]]["resources"]["CPU"] == 0
    assert _flag(LAUNCHER["head_start_ray_commands"], "dashboard-host") == "127.0.0.1"
    assert "0.0.0.0" not in " ".join(LAUNCHER["head_start_ray_commands"])


def test_launcher_token_auth_from_a_secret():
    options = " ".join(LAUNCHER["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    folder = token_path.rsplit("/", 1)[0]
    assert re.search(rf"--volume {folder}:{folder}:ro", options)  # the host's secret folder, read-only
    fetch = [c for c in LAUNCHER["initialization_commands"] if "secretsmanager" in c and token_path in c]
    assert fetch and "<RAY_TOKEN_SECRET_ID>" in fetch[0]
    assert "RAY_AUTH_TOKEN=" in LAUNCHER_TEXT and "ray job submit" in LAUNCHER_TEXT  # how to submit, in a comment


# ------------------------------------------------------------------------------------------------
# KubeRay fixes
# ------------------------------------------------------------------------------------------------
def test_kuberay_autoscaler_on_where_replicas_have_bounds():
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    bounded = [w for w in cluster["workerGroupSpecs"] if w["minReplicas"] != w["maxReplicas"]]
    assert bounded and cluster["enableInTreeAutoscaling"] is True
    for w in cluster["workerGroupSpecs"]:
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]


def test_kuberay_head_has_no_cpus_for_tasks():
    assert RAYJOB["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("group", [g for g, _ in _groups()])
def test_kuberay_dev_shm_holds_the_object_store(group):
    spec = dict(_groups())[group]
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (c,) = pod["containers"]
    shm = volumes[{m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    store = spec["rayStartParams"].get("object-store-memory")
    # Ray's default store is 30% of the container's memory; an explicit one must fit too
    need = _gib(int(store)) if store else 0.3 * _gib(c["resources"]["limits"]["memory"])
    assert need <= _gib(shm["sizeLimit"]), (group, need, shm["sizeLimit"])


def test_kuberay_token_auth_and_no_open_jobs_api():
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert Version(cluster["rayVersion"]) >= Version("2.52.0")  # token auth exists from Ray 2.52
    head = cluster["headGroupSpec"]
    # 0.0.0.0 is the pod's own interface (the Service needs it): only with the token, behind a ClusterIP
    if head["rayStartParams"].get("dashboard-host") == "0.0.0.0":
        assert cluster["authOptions"]["mode"] == "token" and head["serviceType"] == "ClusterIP"
    assert "RAY_AUTH_TOKEN=" in RAYJOB_TEXT and "port-forward" in RAYJOB_TEXT  # how to submit, in a comment


def test_kuberay_pulls_the_private_image_with_a_documented_secret():
    for _, group in _groups():
        pod = group["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "raymine-registry"}]
    assert "kubectl create secret docker-registry raymine-registry" in RAYJOB_TEXT


# ------------------------------------------------------------------------------------------------
# Ray's version bound, ports and submitting documented
# ------------------------------------------------------------------------------------------------
def test_ray_has_an_upper_bound_that_admits_the_lock_and_the_image():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert "2.60.0" in req.specifier and ray.__version__ in req.specifier
    assert "2.61.0" not in req.specifier and "3.0.0" not in req.specifier
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert 'assert ray.__version__ == "2.60.0"' in docker and "FROM rayproject/ray:2.60.0-" in docker
    assert RAYJOB["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_ports_and_token_submission_documented():
    for port in ("22/tcp", "6379", "8265", "10001", "10002–19999"):
        assert port in DOCS, port
    assert "Ports" in LAUNCHER_TEXT and "Ports" in RAYJOB_TEXT
    for text in ("export RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=", "ray job submit --address http://127.0.0.1:8265",
                 "ray dashboard cluster/ray-cluster.yaml", "kubectl port-forward"):
        assert text in DOCS, text
