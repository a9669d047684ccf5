"""The end-to-end job: `ray job submit` on a local head node, kill during training, resume; cluster files."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from raymine import columns as C
from raymine.config import load_config
from raymine.pipeline import STAGES, render_report
from raymine.storage import MANIFEST, read_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = "tests/data/tiny_e2e.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Head:
    """A Ray head node started with `ray start --head --block` in its own temp dir, so neither a bare
    `ray.init()` elsewhere in the test session nor `ray stop` can mix the two clusters up; stopping it
    ends only its own processes."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="rm_e2e_", dir="/tmp")
        self.dash = _free_port()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", f"--port={_free_port()}",
             "--include-dashboard=true", f"--dashboard-port={self.dash}", f"--temp-dir={self.temp}",
             # the job agent's fixed default port (52365) is taken when another local Ray runs (the test
             # session's own): give it a free one, or jobs are refused with "No available agent"
             f"--dashboard-agent-listen-port={_free_port()}",
             "--disable-usage-stats"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.job("list").returncode == 0:
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError("ray head did not come up in 120 s")

    def job(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        sub, *rest = args
        return subprocess.run([str(BIN / "ray"), "job", sub, "--address", self.address, *rest], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def submit(self, *args: str) -> str:
        """Submit a job (retrying while the head's job agent is still starting); returns the job id."""
        for _ in range(30):
            r = self.job("submit", *args)
            if r.returncode == 0:
                return re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)
            if "No available agent" not in r.stderr:
                break
            time.sleep(3)
        raise AssertionError(f"ray job submit failed: {r.stderr[-3000:]}")

    def status(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        os.environ["RAY_AUTH_MODE"] = "disabled"
        return str(JobSubmissionClient(self.address).get_job_status(job_id).value)

    def wait(self, job_id: str, until: set[str], timeout: float, check=None) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.status(job_id)
            if s in until or (check and check()):
                return s
            if s in ("FAILED", "STOPPED") and s not in until:
                break
            time.sleep(2)
        logs = self.job("logs", job_id).stdout[-6000:]
        raise AssertionError(f"job {job_id} is {s}, wanted {until}; log tail:\n{logs}")

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        # whatever this head started and is still alive (raylet, GCS, workers) runs with --temp-dir in its
        # command line or session path: end exactly those, never another cluster's processes
        subprocess.run(["pkill", "-9", "-f", self.temp], check=False)
        shutil.rmtree(self.temp, ignore_errors=True)


def test_job_submit_kill_during_training_and_resume(tmp_path):
    """Submit the tiny job, stop it once training has checkpointed, submit it again: it finishes from the
    checkpoint without redoing mining, and the output has the documented layout."""
    out = tmp_path / "run"
    cmd = ["--working-dir", ".", "--no-wait", "--", "python", "jobs/mine_and_train.py", "--config", TINY,
           "--output", str(out), "train.max_steps=6", "train.checkpoint_every=2"]
    head = _Head()
    try:
        job1 = head.submit(*cmd)

        def checkpointed() -> bool:  # a checkpoint Ray Train has committed (what a restart resumes from)
            return bool(glob.glob(str(out / "train_checkpoints" / "*" / "checkpoint_manager_snapshot.json")))

        head.wait(job1, {"SUCCEEDED"}, timeout=900, check=checkpointed)
        mined_at = read_json(str(out / "mine" / MANIFEST))["finished_at"]
        stopped = head.job("stop", job1)
        assert stopped.returncode == 0, stopped.stderr
        head.wait(job1, {"STOPPED", "SUCCEEDED"}, timeout=120)
        assert not (out / "model" / MANIFEST).exists() or head.status(job1) == "SUCCEEDED"

        job2 = head.submit(*cmd)
        head.wait(job2, {"SUCCEEDED"}, timeout=900)
        logs = head.job("logs", job2).stdout
    finally:
        head.stop()

    # mining was not redone; training resumed from its checkpoint (or was already complete)
    assert read_json(str(out / "mine" / MANIFEST))["finished_at"] == mined_at
    assert "mine: already done" in logs
    report = json.loads((out / "report.json").read_text())
    train = report["stages"]["train"]["counts"]
    assert train["steps"] == 6
    assert train["start_step"] >= 2 or "train: done" not in logs
    # the documented layout
    for rel in ("ingest/corpus", "ingest/train_queries", "mined", "mine/dropped", "exports/st_ntuple",
                "exports/flagembedding", "exports/nemo", "model/config.json", "model/modules.json",
                "model/loss_curve.png", "evaluate/evaluation.json", "report.json", "report.md"):
        assert (out / rel).exists(), rel
    mined = pq.read_table(str(out / "mined"))
    for col in (C.QUERY_ID, C.POSITIVE_IDS, C.NEGATIVE_IDS, C.NEGATIVE_SCORES):
        assert col in mined.column_names
    dropped = pq.read_table(str(out / "mine" / "dropped"))
    assert mined.num_rows + dropped.num_rows == 40
    # the validation slice: held out of mining and training by id, scored at step 0, every 2 steps and the end
    val_ids = set(pq.read_table(str(out / "validation" / "queries.parquet")).column(C.QUERY_ID).to_pylist())
    held = {q for q, r in zip(dropped.column(C.QUERY_ID).to_pylist(), dropped.column(C.REASON).to_pylist(),
                               strict=True) if r == "held_out_for_validation"}
    assert val_ids and val_ids == held and not val_ids & set(mined.column(C.QUERY_ID).to_pylist())
    rows = pq.read_table(glob.glob(str(out / "train_checkpoints" / "train_rows" / "*"))[0])
    assert not val_ids & set(rows.column(C.QUERY_ID).to_pylist())
    assert report["stages"]["validation"]["counts"]["queries"] == len(val_ids)
    val = report["stages"]["train"]["validation"]
    assert val["steps"][0] == 0 and val["steps"][-1] == 6 and val["kept_score"] == max(val["scores"])
    assert "## Validation" in (out / "report.md").read_text()
    ev = report["evaluate"]
    assert 0 < ev["before"]["ndcg_at_10"] <= 1 and 0 < ev["after"]["ndcg_at_10"] <= 1
    assert "nDCG@10" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------------
def test_render_report_lists_before_first():
    report = {"config_hash": "x", "wall_s": 1, "stages": {"mine": {"stage": "mine", "wall_s": 2, "counts": {"mined": 3}}},
              "evaluate": {"after": {"tasks": {"t": {"ndcg_at_10": 0.7, "recall_at_100": 0.9, "mrr_at_10": 0.6}}},
                           "before": {"tasks": {"t": {"ndcg_at_10": 0.5, "recall_at_100": 0.8, "mrr_at_10": 0.4}}}}}
    md = render_report(report)
    assert md.index("| before | t | 0.5000") < md.index("| after | t | 0.7000")
    assert "| mine | 2 | mined=3 |" in md


def test_cluster_files_agree_with_the_code():
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    gpu_nodes = [n for n in launcher["available_node_types"].values() if n["resources"].get("GPU", 0) > 0]
    assert gpu_nodes and all(n["max_workers"] >= 1 for n in gpu_nodes)
    assert any("pip install -e" in c and "[gpu]" in c for c in launcher["setup_commands"])

    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/home/ray/raymine/jobs/mine_and_train.py"]
    assert (ROOT / "jobs" / "mine_and_train.py").exists()
    config = entry[entry.index("--config") + 1].replace("/home/ray/raymine/", "")
    cfg = load_config(ROOT / config)
    assert cfg.train.use_gpu
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = [int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for w in workers]
    assert all(g >= 1 for g in gpus)
    # the image installs the project where the entrypoint expects it
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/raymine" in docker and 'pip install --no-cache-dir -e ".[gpu]"' in docker


def test_job_cli_rejects_unknown_stage_and_key():
    job = [sys.executable, str(ROOT / "jobs" / "mine_and_train.py")]
    r = subprocess.run([*job, "mine.nosuch=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown config key 'mine.nosuch'" in r.stderr
    assert set(STAGES) == {"embed", "search", "mine", "train", "evaluate"}


def test_every_query_dropped_reports_and_stops_before_training(tmp_path):
    """Degenerate mining (issue 14): every candidate over the ceiling → mining writes its report and dropped
    table, the exports are empty, and the requested train stage stops with exit 2 naming the reasons."""
    job = [sys.executable, str(ROOT / "jobs" / "mine_and_train.py"), "--config", str(ROOT / TINY),
           "--output", str(tmp_path / "out"), "--address", "local", "--stages", "train", "teachers=bm25", "mine.method=abs",
           "mine.abs_threshold=-5"]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(job, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    last = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    dropped = pq.read_table(tmp_path / "out" / "mine" / "dropped")
    reasons = dropped.column(C.REASON).to_pylist()
    n = reasons.count("no_negatives")
    assert dropped.num_rows == 40 and set(reasons) == {"no_negatives", "held_out_for_validation"}
    assert last and "train: no training rows" in last[-1] and f"no_negatives: {n}" in last[-1], r.stderr[-2000:]
    assert pq.read_table(tmp_path / "out" / "mined").num_rows == 0
    export = read_json(str(tmp_path / "out" / "exports" / MANIFEST))
    assert export["counts"]["mined_rows"] == 0 and export["counts"]["exported_rows"] == 0
    assert not (tmp_path / "out" / "model" / "config.json").exists()


def test_relative_paths_work_when_workers_run_elsewhere(ray_local, tmp_path, monkeypatch):
    """A job attached to a running cluster: its workers do not share the driver's working dir (here the local
    Ray started in the repo root, then the driver moves to another dir). Relative ``--output`` and data paths
    are taken against the driver's dir, so the workers' parts land in the driver's output folder."""
    from raymine.pipeline import run_pipeline

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "tests" / "data" / "scifact_mini", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(repo / "tests" / "data" / "tiny_e2e.yaml", overrides=[
        "output=out", "ingest.data=data", "teachers=bm25", "validation.split=none"])
    report = run_pipeline(cfg, ["mine"])
    mined = report["stages"]["mine"]["counts"]["mined"]
    assert mined > 0 and not (repo / "out").exists()
    assert pq.read_table(tmp_path / "out" / "mined").num_rows == mined
