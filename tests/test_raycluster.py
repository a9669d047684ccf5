"""Which Ray a run uses (raymine/raycluster.py): ``ray.init()``'s order, and a real head found on this machine.

The order: ``--address`` > ``RAY_ADDRESS`` > the head recorded by ``ray start`` (only while a raylet runs
against it) > a new local instance. The end-to-end test starts ``ray start --head --num-cpus=4`` in a private
``RAY_TMPDIR`` (so no other test or user on this machine can find it, and it cannot find theirs), runs the job
script without ``RAY_ADDRESS``, and asks that head's Jobs API whether the job ran there. It stops only the
processes it started, by pid (never ``ray stop``).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raymine import raycluster
from raymine.storage import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------
# The order of resolve_address (no Ray started)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_head(monkeypatch, tmp_path):
    """An environment where no head is recorded: a private Ray temp dir, no RAY_ADDRESS."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def test_explicit_address_beats_ray_address(no_head, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert raycluster.resolve_address("10.0.0.1:6379") == ("10.0.0.1:6379", "--address")
    assert raycluster.resolve_address("local") == (None, "address='local'")
    assert raycluster.resolve_address(None) == ("10.0.0.9:6379", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert raycluster.resolve_address(None)[0] is None


def test_no_address_and_no_head_starts_local(no_head):
    target, why = raycluster.resolve_address(None)
    assert target is None and "no running head" in why


def test_stale_head_file_is_ignored(no_head, caplog):
    """A ray_current_cluster left by a head that died: bare ray.init() would try to connect; we start local."""
    (no_head / "ray").mkdir()
    (no_head / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    with caplog.at_level("INFO", logger="raymine.raycluster"):
        assert raycluster.running_local_head() is None
        assert raycluster.resolve_address(None)[0] is None
    assert any("no raylet on this machine runs against it" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# A real head started with `ray start --head`, found without RAY_ADDRESS
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PrivateHead:
    """``ray start --head --block --num-cpus=4`` with ``RAY_TMPDIR`` private to this test and token auth on.

    Its address file is ``<tmp>/ray/ray_current_cluster``: found by a driver given the same ``RAY_TMPDIR``
    only. Stopped by ending the ``ray start`` process and every process it started (pids), nothing else.
    """

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rmh", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_TMPDIR=self.tmp, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", f"--port={_free_port()}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
             f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.address_file = Path(self.tmp, "ray", "ray_current_cluster")
        deadline = time.time() + 120
        while time.time() < deadline and not (self.address_file.is_file() and self.jobs() is not None):
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        if self.jobs() is None:
            self.stop()
            raise RuntimeError("ray start --head did not come up in 120 s")

    def jobs(self) -> list[dict] | None:
        """The head's jobs from its Jobs API (a fresh process: Ray reads the auth settings at import)."""
        code = ("import json; from ray.job_submission import JobSubmissionClient as C\n"
                f"print(json.dumps([j.dict() for j in C({self.dashboard!r}).list_jobs()], default=str))")
        p = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None

    def stop(self) -> None:
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        subprocess.run(["rm", "-rf", self.tmp], check=False)


@pytest.mark.slow  # 60-110 s on the shared 2-core machine (a head with its dashboard, then the job)
def test_job_without_ray_address_runs_on_the_local_head(tmp_path):
    """`ray start --head --num-cpus=4`, then the job script with no RAY_ADDRESS and no --address: it attaches
    to that head (one log line says so) and the head's Jobs API lists it as a finished driver job."""
    head = _PrivateHead()
    try:
        recorded = head.address_file.read_text().strip()
        out = tmp_path / "run"
        cmd = [sys.executable, str(ROOT / "jobs" / "mine_and_train.py"), "--config", str(ROOT / "tests/data/tiny_e2e.yaml"),
               "--data", str(ROOT / "tests/data/scifact_mini"), "--output", str(out), "--stages", "embed", "teachers=bm25"]
        p = subprocess.run(cmd, env=head.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [x for x in p.stderr.splitlines() if "Ray: " in x]
        assert len(lines) == 1 and f"Ray: attached to the cluster at {recorded} (from the head started with" in lines[0], lines
        assert "1 node(s), 4 CPU" in lines[0]
        drivers = [j for j in head.jobs() if j["type"] == "DRIVER" and "mine_and_train.py" in j["entrypoint"]]
        assert len(drivers) == 1, head.jobs()
        assert drivers[0]["status"] == "SUCCEEDED", drivers
        manifest = json.loads((out / "ingest" / MANIFEST).read_text())
        assert manifest["counts"]["docs"] == 400
    finally:
        head.stop()
    assert head.proc.poll() is not None
