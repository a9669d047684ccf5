"""The one skip / clear / resume rule (storage.begin), part integrity in manifests, and the run lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine import storage


def _part(folder, name, rows):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows))}), folder / name)


def test_begin_skips_clears_and_resumes(tmp_path):
    d = tmp_path / "stage"
    done, run = storage.begin(str(d), "s", "k1", resume=True)
    assert done is None and json.loads((d / storage.STARTED).read_text())["key"] == "k1"
    _part(d, "part-00000.parquet", 5)
    _part(d, "part-00001.parquet", 7)
    # the run dies here (no manifest): the same key resumes, keeping its parts
    done, run = storage.begin(str(d), "s", "k1", resume=True)
    assert done is None and (d / "part-00000.parquet").exists()
    assert storage.valid_part(str(d / "part-00000.parquet"), 5)
    assert not storage.valid_part(str(d / "part-00000.parquet"), 6)  # wrong row count: deleted, redo
    assert not (d / "part-00000.parquet").exists()
    _part(d, "part-00000.parquet", 5)
    m = run.finish()
    assert m["parts"] == {"part-00000.parquet": {"bytes": os.path.getsize(d / "part-00000.parquet"), "rows": 5},
                          "part-00001.parquet": {"bytes": os.path.getsize(d / "part-00001.parquet"), "rows": 7}}
    again, run2 = storage.begin(str(d), "s", "k1", resume=True)
    assert run2 is None and again == m  # done and intact: skipped
    # another key: cleared whatever the resume flag
    done, run = storage.begin(str(d), "s", "k2", resume=True)
    assert done is None and not (d / "part-00001.parquet").exists()
    # a stage that cannot resume is cleared even with the same key
    _part(d, "part-00000.parquet", 3)
    storage.begin(str(d), "s", "k2", resume=False)
    assert not (d / "part-00000.parquet").exists()


def test_damaged_or_missing_part_is_detected_from_the_listing(tmp_path, caplog):
    d = tmp_path / "stage"
    _, run = storage.begin(str(d), "s", "k")
    _part(d, "part-00000.parquet", 5)
    _part(d, "sub/part-00001.parquet", 9)
    m = run.finish()
    assert storage.completed(str(d), "k") == m
    with open(d / "sub" / "part-00001.parquet", "r+b") as f:  # an interrupted copy
        f.truncate(40)
    with caplog.at_level("WARNING"):
        assert storage.completed(str(d), "k") is None
    assert "sub/part-00001.parquet" in caplog.text
    _part(d, "sub/part-00001.parquet", 9)
    assert storage.completed(str(d), "k") is not None
    os.remove(d / "part-00000.parquet")
    assert storage.completed(str(d), "k") is None
    assert storage.damaged_parts(str(d), m) == ["part-00000.parquet"]


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    out = str(tmp_path)
    # a live owner: another process on this host with a fresh heartbeat
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        storage.write_json(storage.join(out, storage.LOCK),
                           {"host": os.uname().nodename, "pid": other.pid, "heartbeat": time.time()})
        with pytest.raises(storage.LockedError, match=f"pid {other.pid}"):
            storage.RunLock(out).acquire()
    finally:
        other.kill()
        other.wait()
    # the owner was killed: its pid is gone, the lock is taken over with a warning
    with caplog.at_level("WARNING"):
        with storage.RunLock(out, heartbeat_s=0.05):
            held = storage.read_json(storage.join(out, storage.LOCK))
            assert held["pid"] == os.getpid()
            time.sleep(0.2)
            assert storage.read_json(storage.join(out, storage.LOCK))["heartbeat"] > held["heartbeat"]  # beating
    assert "stale lock" in caplog.text
    assert not os.path.exists(storage.join(out, storage.LOCK))  # released
    # a stale heartbeat from another host is taken over too
    storage.write_json(storage.join(out, storage.LOCK), {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600})
    with storage.RunLock(out):
        pass
