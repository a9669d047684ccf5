"""`pip install` + `raymine run` outside the checkout: the built wheel runs the default on its shipped data.

A real wheel (test_packaging's fixture, built from a copy of the sources) is installed ``--no-deps`` into a
fresh virtualenv made with ``--system-site-packages``; the dependencies come from the project's .venv, added
behind the virtualenv's own site-packages by a ``.pth`` line (the base interpreter has none of them). Then
``raymine run --stages embed teachers=bm25`` runs from an empty temporary folder with no PYTHONPATH, on a
private local Ray (``RAY_TMPDIR`` of its own: it cannot attach to a head someone else started here).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from test_packaging import wheel  # noqa: F401 - the module-scoped fixture: one wheel build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:  # noqa: F811 - the imported fixture
    """A virtualenv holding only the wheel (``--no-deps``); its deps are the project .venv's packages."""
    env_dir = tmp_path_factory.mktemp("venv")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended: the wheel wins
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return env_dir


@pytest.mark.slow  # 35-85 s on the shared 2-core machine (Ray start-up, ingest of SciFact)
def test_wheel_runs_the_default_outside_the_checkout(venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rmw", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               RAY_DATA_DISABLE_PROGRESS_BARS="1")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import raymine.cli as c; print(c.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    try:
        p = subprocess.run(["raymine", "run", "--stages", "embed", "teachers=bm25"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "raymine"
    assert Path(where.stdout.strip()) == installed / "cli.py", where.stdout + where.stderr
    assert not where.stdout.strip().startswith(str(ROOT))
    assert shutil.which("raymine", path=env["PATH"]) == str(venv / "bin" / "raymine")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Ray: started a local instance" in p.stderr
    # the default config's data/scifact, not in this folder, was read from the wheel's raymine/data
    manifest = json.loads((work / "runs" / "scifact_minilm" / "ingest" / "_manifest.json").read_text())
    assert manifest["data"] == str(installed / "data" / "scifact")
    assert manifest["counts"]["docs"] == 5183 and manifest["counts"]["train_queries"] == 809  # BEIR SciFact
    assert "| ingest |" in p.stdout  # the report printed at the end
