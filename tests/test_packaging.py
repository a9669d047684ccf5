"""Packaging and cluster files: the facts a GPU cluster user relies on, checked by parsing the files.

No image can be built and no GPU is present here; what can be checked without one is: pinned versions,
one FAISS per install, the Docker build context, /dev/shm and credentials on every Ray pod, the console
script and the configs shipped as package data (a real wheel is built and listed).
"""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from raymine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "cluster" / "Dockerfile").read_text()
LAUNCHER_TEXT = (ROOT / "cluster" / "ray-cluster.yaml").read_text()
RAYJOB_TEXT = (ROOT / "cluster" / "rayjob.yaml").read_text()
LAUNCHER = yaml.safe_load(LAUNCHER_TEXT)
RAYJOB = yaml.safe_load(RAYJOB_TEXT)
RECIPE_7B = load_config(ROOT / "configs" / "nv_retriever_v1_mistral7b.yaml")
FAISS_DISTS = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"}
# literal secrets that must never be written in a cluster file
SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"hf_[A-Za-z0-9]{20,}", r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"]


def _lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{name}: {line!r} is not an exact pin"
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


CPU_LOCK, GPU_LOCK = _lock("cpu.lock"), _lock("gpu.lock")


def _reqs(group: str | None) -> list[Requirement]:
    project = PYPROJECT["project"]
    raw = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [Requirement(r) for r in raw]


# ------------------------------------------------------------------------------------------------
# pyproject: faiss is a choice; lower bounds are the tested versions
# ------------------------------------------------------------------------------------------------
def test_faiss_is_an_extra_not_a_core_dependency():
    core = {canonicalize_name(r.name) for r in _reqs(None)}
    assert not core & FAISS_DISTS, core & FAISS_DISTS
    assert [canonicalize_name(r.name) for r in _reqs("cpu")] == ["faiss-cpu"]
    assert [canonicalize_name(r.name) for r in _reqs("gpu")] == ["faiss-gpu-cu12"]


@pytest.mark.parametrize("group", [None, "cpu", "dev"])
def test_lower_bounds_are_the_versions_ci_tested(group):
    for r in _reqs(group):
        name = canonicalize_name(r.name)
        lows = [Version(s.version) for s in r.specifier if s.operator == ">="]
        assert lows, f"{r}: no lower bound"
        assert name in CPU_LOCK, f"{name} is a dependency but not in requirements/cpu.lock"
        assert CPU_LOCK[name] in r.specifier, f"{r} does not admit the locked {CPU_LOCK[name]}"
        assert lows[0] == Version(CPU_LOCK[name].base_version), f"{r}: lower bound is not the tested {CPU_LOCK[name]}"


def test_locks_hold_one_faiss_each_and_not_raymine():
    for pins, want in ((CPU_LOCK, "faiss-cpu"), (GPU_LOCK, "faiss-gpu-cu12")):
        assert sorted(set(pins) & FAISS_DISTS) == [want]
        assert "raymine" not in pins
    assert GPU_LOCK["faiss-gpu-cu12"] in _reqs("gpu")[0].specifier
    # the GPU lock is the tested CPU lock with the faiss build swapped, and says it is not tested here
    assert {k: v for k, v in GPU_LOCK.items() if k != "faiss-gpu-cu12"} == {
        k: v for k, v in CPU_LOCK.items() if k != "faiss-cpu"}
    assert "NOT TESTED HERE" in (ROOT / "requirements" / "gpu.lock").read_text()
    assert CPU_LOCK["torch"] == Version("2.13.0")  # the constraints.txt pin (no local +cpu label)
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_setup_installs_torch_then_the_lock_then_raymine_without_deps():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    order = [text.index('"torch==2.13.0"'), text.index('-r "$LOCK"'), text.index("--no-deps -e ."),
             text.index('"${pip[@]}" check')]
    assert order == sorted(order)
    assert "LOCK=requirements/cpu.lock" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_and_package_data_declared():
    assert PYPROJECT["project"]["scripts"] == {"raymine": "raymine.cli:main"}
    st = PYPROJECT["tool"]["setuptools"]
    assert st["package-dir"]["raymine.configs"] == "configs"
    assert "*.yaml" in st["package-data"]["raymine.configs"]
    subpackages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "raymine").rglob("__init__.py")}
    data_dirs = {".".join(("raymine", *p.relative_to(ROOT).parts)) for p in (ROOT / "data").rglob("*") if p.is_dir()}
    assert st["package-dir"]["raymine.data"] == "data"
    assert subpackages | {"raymine.configs", "raymine.data"} | data_dirs == set(st["packages"]), \
        "list every raymine package (and every shipped data folder) in pyproject"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A real wheel, built from a copy of the sources (nothing is written into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "raymine", src / "raymine", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", src / "configs")
    shutil.copytree(ROOT / "data", src / "data")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("raymine-*.whl")
    return whl


def test_wheel_ships_cli_configs_and_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for yaml_file in (ROOT / "configs").glob("*.yaml"):
        assert f"raymine/configs/{yaml_file.name}" in names
    for f in (ROOT / "data" / "scifact").rglob("*"):  # the default's data, every file of it
        if f.is_file():
            assert f"raymine/{f.relative_to(ROOT).as_posix()}" in names, f
    assert {"raymine/cli.py", "raymine/errors.py", "raymine/_deps.py"} <= names
    assert "raymine = raymine.cli:main" in entry
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not any(canonicalize_name(Requirement(r).name) in FAISS_DISTS for r in unconditional)
    assert any(r.startswith("faiss-cpu") and 'extra == "cpu"' in r for r in requires)
    assert any(r.startswith("faiss-gpu-cu12") and 'extra == "gpu"' in r for r in requires)


# ------------------------------------------------------------------------------------------------
# Docker image: pinned, one faiss, a clean build context, an import check in the build
# ------------------------------------------------------------------------------------------------
def _run_lines(dockerfile: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [line.strip()[4:] for line in joined.splitlines() if line.strip().startswith("RUN ")]


def test_dockerfile_installs_pinned_from_its_lock():
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-gpu", base), base  # = ray pin, Python 3.11 as CI
    assert CPU_LOCK["ray"] == Version("2.60.0")
    installs = [cmd for line in _run_lines(DOCKERFILE) for cmd in line.split("&&") if "pip install" in cmd]
    assert any("-r requirements/gpu.lock" in c for c in installs)
    for c in installs:  # every install is the lock, the project under the lock, or an exact pin
        assert ("-r requirements/gpu.lock" in c or "PIP_CONSTRAINT=requirements/gpu.lock" in c
                or re.search(r'"[\w\-]+==[\w.]+"', c)), f"unpinned install: {c}"
        assert "faiss-cpu" not in c and "[cpu]" not in c
    assert '"torch==2.13.0"' in DOCKERFILE and "TORCH_INDEX_URL" in DOCKERFILE
    # the lock layer comes before the source layer, the project goes in after it
    assert DOCKERFILE.index("COPY --chown=ray:users requirements/gpu.lock") < DOCKERFILE.index("COPY --chown=ray:users . .")


def test_dockerfile_checks_faiss_gpu_at_build_time():
    check = DOCKERFILE[DOCKERFILE.index("RUN python - <<'PY'"):]
    assert '["faiss-gpu-cu12"]' in check and "StandardGpuResources" in check and "import_faiss" in check
    assert "torch.version.cuda" in check


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the patterns used here: a match on the path or on any of its parent folders."""
    parts = path.split("/")
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            hit = fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:]))
            if hit:
                excluded = not neg
                break
    return excluded


def test_dockerignore_keeps_venv_runs_and_git_out():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "runs/default/report.md", "raymine/__pycache__/cli.pyc",
                 "raymine.egg-info/PKG-INFO", "tests/.venv/x", "output/x"):
        assert _dockerignored(path, patterns), path
    for path in ("raymine/cli.py", "requirements/gpu.lock", "configs/scifact_minilm.yaml", "jobs/mine_and_train.py",
                 "pyproject.toml", "README.md", "data/scifact/corpus.jsonl.gz"):
        assert not _dockerignored(path, patterns), path
    # and the real checkout: whatever is at the top level, .venv/.git/runs are not sent
    for top in ROOT.iterdir():
        if top.name in (".venv", ".git", "runs", "output"):
            assert _dockerignored(top.name + "/x", patterns)


# ------------------------------------------------------------------------------------------------
# Cluster files: /dev/shm, credentials templated, shared storage, HF token + cache, GPU resources
# ------------------------------------------------------------------------------------------------
def _pods() -> list[dict]:
    spec = RAYJOB["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [w["template"]["spec"] for w in spec["workerGroupSpecs"]]


def _mem_gib(q: str) -> float:
    units = {"Gi": 1, "Ti": 1024, "Mi": 1 / 1024}
    m = re.fullmatch(r"(\d+)(Gi|Ti|Mi)", q)
    return int(m.group(1)) * units[m.group(2)]


def test_every_ray_pod_has_dev_shm_and_shared_storage():
    for pod in _pods():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert "persistentVolumeClaim" in volumes[mounts["/mnt/shared"]]
            env = {e["name"]: e for e in c["env"]}
            assert env["HF_HOME"]["value"].startswith("/mnt/shared/")  # one model cache for every node
    options = " ".join(LAUNCHER["docker"]["run_options"])
    for per_type in ("head_run_options", "worker_run_options"):  # sized per node type (tests/test_cluster_files.py)
        assert re.search(r"--shm-size=\d+g", " ".join(LAUNCHER["docker"][per_type])), per_type
    assert "/mnt/shared:/mnt/shared" in options
    assert "HF_HOME=/mnt/shared/" in options


def test_credentials_are_templated_never_written():
    for text in (LAUNCHER_TEXT, RAYJOB_TEXT, DOCKERFILE):
        for pat in SECRET_PATTERNS:
            assert not re.search(pat, text), pat
    for pod in _pods():  # KubeRay: a service account (IRSA / workload identity) + optional secrets
        assert pod["serviceAccountName"] == "raymine"
        for c in pod["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "raymine-hf-token"
            assert any("secretRef" in s for s in c["envFrom"])
            assert not any(e["name"].startswith("AWS_") and "value" in e for e in c["env"])
    for node in LAUNCHER["available_node_types"].values():  # launcher: an instance profile on every node
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("<")
    assert any("secretsmanager" in c and "HF_TOKEN" in c for c in LAUNCHER["initialization_commands"])


def test_gpu_workers_fit_the_7b_recipe():
    t = RECIPE_7B.train
    assert t.use_gpu and t.strategy == "fsdp"
    host_gib_per_rank = 28  # fp32 7B weights on each rank's host before FSDP shards them (config comment)
    for w in RAYJOB["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = w["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus * w["maxReplicas"] >= t.num_workers
        assert int(limits["cpu"]) >= min(gpus, t.num_workers) * t.cpus_per_worker
        assert _mem_gib(limits["memory"]) >= min(gpus, t.num_workers) * host_gib_per_rank
        shm = next(v for v in w["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        assert _mem_gib(shm) + min(gpus, t.num_workers) * host_gib_per_rank <= _mem_gib(limits["memory"])
    gpu_nodes = [n for n in LAUNCHER["available_node_types"].values() if n["resources"].get("GPU", 0) > 0]
    for n in gpu_nodes:
        assert n["resources"]["GPU"] * n["max_workers"] >= t.num_workers
        assert n["resources"]["CPU"] >= n["resources"]["GPU"] * t.cpus_per_worker


def test_one_image_for_both_launchers():
    image = LAUNCHER["docker"]["image"]
    assert all(c["image"] == image for pod in _pods() for c in pod["containers"])


def test_installed_wheel_finds_its_default_config(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = "import raymine.cli as c; p = c.default_config(); print(p); assert p.is_file()"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(target / "raymine" / "configs" / "scifact_minilm.yaml")
    assert (target / "bin" / "raymine").is_file()
