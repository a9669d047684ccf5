"""Fault injection: workers and the driver die mid-stage, the output stays identical.

- an embedding actor is SIGKILLed mid-stage → Ray Data restarts it and retries its blocks; the
  written embeddings equal an undisturbed run's;
- a shard actor is SIGKILLed mid-search → the actor restarts (rebuilding its shard from the same
  Parquet rows) and the search call is retried; candidates and mined negatives equal the undisturbed run;
- a search run that died part-way → a re-run searches only the missing query pieces, output identical;
- the driver is SIGKILLed mid-mining → a re-run skips the finished search stage and ends identical;
- the same seed twice → identical negatives (and another seed → different ones, so the seed matters).

The synthetic-data helpers here are also used by ``test_multinode.py`` and by the driver scripts
run in subprocesses (they import this module by path).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raymine import columns as C
from raymine.config import EmbedConfig, MineConfig, SearchConfig, TeacherConfig

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCIFACT_MINI = TESTS / "data" / "scifact_mini"

# the configuration every synthetic run here uses: sampled negatives so that the seed matters
MINE = MineConfig(method="percpos", perc=0.95, num_negatives=4, sampling="sampled", sample_top_k=8,
                  join_partitions=2, batch_size=64)
SEARCH = SearchConfig(num_shards=2, query_batch_size=50, num_cpus_per_shard=0.25, threads_per_shard=1, search_tasks=1)
PIECE = 10  # queries per search piece (= part): many small parts leave time to inject a fault mid-stage


# ------------------------------------------------------------------------------------------------
# Synthetic data: precomputed vectors written as the embed stage writes them
# ------------------------------------------------------------------------------------------------
def write_synthetic(folder: Path, n_docs: int = 3000, n_queries: int = 200, dim: int = 32, seed: int = 0,
                    rows_per_file: int = 1000) -> dict[str, str]:
    """Corpus + query embedding Parquet and a queries/positives table; returns their paths.

    Queries are noisy copies of one to three positives, so positive scores are high and PercPos
    leaves plenty of candidates below the ceiling."""
    from raymine.embed import embeddings_to_arrow

    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)  # [n_docs, d]
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    doc_ids = np.array([f"d{i:06d}" for i in range(n_docs)], dtype=object)
    npos = rng.integers(1, 4, size=n_queries)
    pos = [rng.choice(n_docs, size=int(k), replace=False) for k in npos]
    q = np.stack([docs[p].mean(axis=0) for p in pos]) + 0.6 * rng.standard_normal((n_queries, dim)) / np.sqrt(dim)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)  # [n_queries, d]
    qids = [f"q{i:05d}" for i in range(n_queries)]
    folder.mkdir(parents=True, exist_ok=True)
    corpus_dir, query_dir = folder / "corpus_emb", folder / "query_emb"
    for d in (corpus_dir, query_dir):
        d.mkdir(exist_ok=True)
    for part, lo in enumerate(range(0, n_docs, rows_per_file)):
        hi = min(n_docs, lo + rows_per_file)
        pq.write_table(pa.table({C.DOC_ID: pa.array(doc_ids[lo:hi], pa.string()),
                                 C.EMBEDDING: embeddings_to_arrow(docs[lo:hi])}),
                       corpus_dir / f"part-{part:05d}.parquet", row_group_size=250)
    for part, lo in enumerate(range(0, n_queries, PIECE)):  # query-embedding part i = query piece i
        pq.write_table(pa.table({C.QUERY_ID: pa.array(qids[lo : lo + PIECE], pa.string()),
                                 C.EMBEDDING: embeddings_to_arrow(q[lo : lo + PIECE])}),
                       query_dir / f"part-{part:05d}.parquet")
    queries = pa.table({
        C.QUERY_ID: pa.array(qids, pa.string()),
        C.TEXT: pa.array([f"synthetic query {i}" for i in range(n_queries)], pa.string()),
        C.POSITIVE_IDS: pa.array([[doc_ids[j] for j in p] for p in pos], pa.list_(pa.string())),
        C.EXCLUDED_IDS: pa.array([[] for _ in pos], pa.list_(pa.string())),
    })
    pq.write_table(queries, folder / "train_queries.parquet", row_group_size=PIECE)
    return {"corpus": str(corpus_dir), "queries_emb": str(query_dir), "queries": str(folder / "train_queries.parquet")}


def search_and_mine(paths: dict[str, str], out: Path, mine: MineConfig = MINE, search: SearchConfig = SEARCH,
                    on_start=None, shard_rows=None) -> tuple[dict, dict, list]:
    """Search + mine one synthetic teacher ("dense") under ``out``: (search manifest, mine manifest, shard infos).

    ``on_start(index, search_dir)`` runs in a thread beside the search (the fault-injection hook: it can
    watch the parts appear and kill a shard or a node)."""
    from raymine.index import ShardedIndex
    from raymine.mine import mine_stage
    from raymine.search import SearchSpec, search_teacher

    spec = SearchSpec("dense", paths["queries"], paths["queries_emb"], str(out / "search" / "dense"), mine, search,
                      PIECE)
    index = ShardedIndex.from_parquet(paths["corpus"], search, shard_rows=shard_rows)
    th = None
    try:
        infos = list(index.infos)
        if on_start is not None:
            th = threading.Thread(target=on_start, args=(index, out / "search" / "dense"), daemon=True)
            th.start()
        sm = search_teacher(index, spec, "synthetic", dense=True)
    finally:
        if th is not None:
            th.join(timeout=60)
        index.close()
    mm = mine_stage({"dense": str(out / "search" / "dense")}, paths["queries"], mine, str(out / "mine"))
    return sm, mm, infos


def wait_for_parts(folder: Path, n: int, timeout: float = 240) -> int:
    """Block until ``n`` parts exist in ``folder`` (or the timeout); returns how many exist."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        have = len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0
        if have >= n:
            return have
        time.sleep(0.02)
    return -1


def read_sorted(uri: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file/folder as one table sorted by query id (row order across files is not part of the contract)."""
    t = pads.dataset(str(uri), format="parquet").to_table(columns=columns)
    return t.sort_by(C.QUERY_ID)


def mined_table(out: Path) -> pa.Table:
    return read_sorted(out / "mine" / "mined", [*C.MINED_COLUMNS, C.NUM_SHORT])


def candidates_table(out: Path) -> pa.Table:
    return read_sorted(out / "search" / "dense")


def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    assert a.num_rows == b.num_rows and a.column_names == b.column_names
    for name in a.column_names:
        assert a.column(name).combine_chunks().equals(b.column(name).combine_chunks()), f"column {name} differs"


# ------------------------------------------------------------------------------------------------
# Reference run (undisturbed), shared by the tests of this module
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def reference(ray_local, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    sm, mm, _ = search_and_mine(synthetic, out)
    assert sm["counts"]["queries"] == 200 and mm["counts"]["mined"] == 200
    return out


# ------------------------------------------------------------------------------------------------
def test_same_seed_identical_negatives_other_seed_differs(reference, synthetic, tmp_path):
    ref = mined_table(reference)
    assert ref.num_rows == 200
    # different batch size and join partitions: the result must not depend on how work is split
    same = replace(MINE, batch_size=17, join_partitions=3)
    from raymine.mine import mine_stage

    mine_stage({"dense": str(reference / "search" / "dense")}, synthetic["queries"], same, str(tmp_path / "a" / "mine"))
    assert_tables_equal(mined_table(tmp_path / "a"), ref)
    # a physical byte check of the negatives themselves (ids + float32 score bits)
    got = mined_table(tmp_path / "a")
    for col in (C.NEGATIVE_IDS, C.NEGATIVE_SCORES):
        ba = [b.to_pybytes() if b is not None else b"" for b in got.column(col).combine_chunks().flatten().buffers()]
        bb = [b.to_pybytes() if b is not None else b"" for b in ref.column(col).combine_chunks().flatten().buffers()]
        assert ba == bb
    other = replace(MINE, seed=MINE.seed + 1)
    mine_stage({"dense": str(reference / "search" / "dense")}, synthetic["queries"], other, str(tmp_path / "b" / "mine"))
    diff = mined_table(tmp_path / "b")
    changed = sum(x != y for x, y in zip(diff.column(C.NEGATIVE_IDS).to_pylist(), ref.column(C.NEGATIVE_IDS).to_pylist(), strict=True))
    assert changed > 20, f"another seed changed only {changed} of 200 queries' negatives"


def test_shard_actor_killed_mid_search_same_output(reference, synthetic, tmp_path):
    """SIGKILL shard 0's process once the first query part is written (19 remain): Ray restarts the actor
    (same shard rows) and retries the call. Needs ``max_restarts=-1, max_task_retries=-1`` on the shards."""
    killed: list[tuple[int, int]] = []

    def kill_shard(index, folder):
        import ray

        if wait_for_parts(folder, 1) > 0:
            pid = ray.get(index.actors[0].info.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, len(list(folder.glob("part-*.parquet")))))

    sm, mm, _ = search_and_mine(synthetic, tmp_path, on_start=kill_shard)
    assert killed, "the fault hook never ran"
    assert killed[0][1] < 200 // PIECE, f"killed after the last part was written: {killed}"
    assert sm["counts"]["queries"] == 200
    assert_tables_equal(candidates_table(tmp_path), candidates_table(reference))
    assert_tables_equal(mined_table(tmp_path), mined_table(reference))


def test_search_died_part_way_rerun_searches_only_missing_parts(reference, synthetic, tmp_path):
    """A search whose run died after some parts (no manifest; one part cut short by the crash): the re-run
    keeps the intact parts, searches the rest, and the output equals the undisturbed run."""
    import shutil

    out = tmp_path / "search" / "dense"
    shutil.copytree(reference / "search" / "dense", out)
    os.remove(out / "_manifest.json")
    for i in (3, 4, 5, 17):
        os.remove(out / f"part-{i:09d}.parquet")
    with open(out / "part-000000008.parquet", "r+b") as f:
        f.truncate(64)
    sm, mm, _ = search_and_mine(synthetic, tmp_path)
    assert sm["counts"]["pieces"] == 5 and sm["counts"]["parts_kept"] == 15 and sm["counts"]["queries"] == 50
    assert_tables_equal(candidates_table(tmp_path), candidates_table(reference))
    assert_tables_equal(mined_table(tmp_path), mined_table(reference))


def test_search_killed_mid_stage_resumed_with_another_shard_count(reference, synthetic, tmp_path):
    """A search killed part-way (no manifest, parts missing) and resumed with 3 shards and 3 query tasks
    instead of 2 and 1: exact search, so the same key; the finished parts are kept untouched, only the
    missing pieces are searched, and candidates and negatives equal the uninterrupted 2-shard run."""
    import shutil

    out = tmp_path / "search" / "dense"
    shutil.copytree(reference / "search" / "dense", out)
    os.remove(out / "_manifest.json")
    for i in (0, 9, 19):
        os.remove(out / f"part-{i:09d}.parquet")
    kept = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    resized = replace(SEARCH, num_shards=3, search_tasks=3, threads_per_shard=0)
    sm, mm, infos = search_and_mine(synthetic, tmp_path, search=resized)
    assert len(infos) == 3
    assert sm["key"] == json_key(reference)
    assert sm["counts"]["pieces"] == 3 and sm["counts"]["parts_kept"] == 17 and sm["counts"]["queries"] == 30
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # no finished part redone
    assert_tables_equal(candidates_table(tmp_path), candidates_table(reference))
    assert_tables_equal(mined_table(tmp_path), mined_table(reference))


def json_key(out: Path) -> str:
    import json

    return json.loads((out / "search" / "dense" / "_manifest.json").read_text())["key"]


# ------------------------------------------------------------------------------------------------
def _embed_actor_pids() -> list[int]:
    """PIDs of this test session's Ray Data EmbedPieces actors (descendants of this process only)."""
    import psutil

    pids = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "EmbedPieces" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


@pytest.mark.slow  # CI budget (25 min): 42 s on 2 quiet cores; `make test-slow` runs it
def test_embed_actor_killed_mid_stage_same_embeddings(ray_local, minilm_path, tmp_path):
    """SIGKILL one EmbedPieces actor once the first part is written (pieces remain): the stage completes
    with every row, and the embeddings equal those of an undisturbed run."""
    from raymine.embed import EmbedInput, embed_tables, read_embeddings
    from raymine.ingest import read_beir

    corpus = read_beir(str(SCIFACT_MINI), "train").corpus.slice(0, 240)
    pq.write_table(corpus.select([C.DOC_ID, C.TEXT]), tmp_path / "corpus.parquet", row_group_size=120)
    teacher = TeacherConfig(model=minilm_path, passage_max_length=96, batch_size=16)
    cfg = EmbedConfig(num_actors=2, rows_per_block=12, num_cpus_per_actor=0.5)

    def inputs(name):
        return [EmbedInput("passage", str(tmp_path / "corpus.parquet"), C.DOC_ID, C.TEXT, str(tmp_path / name / "c"))]

    embed_tables(teacher, cfg, inputs("ref"), str(tmp_path / "ref"), "k")
    out = tmp_path / "killed" / "c"
    state = {"killed": None}

    def killer():
        if wait_for_parts(out, 1) > 0:  # mid-stage: output has started, pieces remain
            for _ in range(200):
                pids = _embed_actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    state["killed"] = (pids[0], len(list(out.glob("part-*.parquet"))))
                    return
                time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    m = embed_tables(teacher, cfg, inputs("killed"), str(tmp_path / "killed"), "k")
    th.join(timeout=5)
    assert state["killed"] is not None, "no embedding actor was found to kill while the stage ran"
    assert state["killed"][1] < 20, f"killed after the last part was written: {state['killed']}"
    assert m["counts"]["rows"] == 240
    ids_a, emb_a = read_embeddings(str(tmp_path / "ref" / "c"), C.DOC_ID)
    ids_b, emb_b = read_embeddings(str(out), C.DOC_ID)
    assert list(ids_a) == list(ids_b)
    np.testing.assert_array_equal(emb_a, emb_b)


# ------------------------------------------------------------------------------------------------
# Driver killed mid-mining
# ------------------------------------------------------------------------------------------------
DRIVER = textwrap.dedent("""
    import logging, os, sys, tempfile
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    import test_faults as T
    from pathlib import Path
    from raymine import mine as M
    paths = {paths!r}
    out = Path({out!r})
    real_mine = M.mine_stage
    def announced(*a, **k):
        print("MINING", flush=True)
        return real_mine(*a, **k)
    M.mine_stage = announced
    sm, mm, _ = T.search_and_mine(paths, out)
    print("SEARCH_WALL", sm["wall_s"], sm["finished_at"], flush=True)
    print("DONE", flush=True)
""")


def _driver(paths: dict[str, str], out: Path, distributed_join: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if distributed_join:  # Ray Data's hash joins (their shuffle actors take seconds to start) even on small inputs
        env["RAYMINE_LOCAL_JOIN_BYTES"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    script = DRIVER.format(tests=str(TESTS), root=str(ROOT), paths=paths, out=str(out))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then its Ray processes (they are this test's own children) by pid."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(kids, timeout=10)  # Ray's reaper normally ends them itself
    for k in alive:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow  # CI budget (25 min): 58 s on 2 quiet cores; `make test-slow` runs it
def test_driver_killed_mid_mining_resumes_identical(reference, synthetic, tmp_path):
    """Run 1 is SIGKILLed one second into the mining stage's Ray job (search finished, mining not);
    run 2 skips the finished search (its manifest is unchanged) and writes mined output equal to
    the undisturbed reference run. Run 1 takes the distributed joins, so the kill lands inside the mining job
    (a one-task join on this small input can finish within the second); the reference and run 2 join in one
    task, so the equality also holds across the two join paths."""
    out = tmp_path / "run"
    p = _driver(synthetic, out, distributed_join=True)
    lines = []
    deadline = time.time() + 150
    try:
        for line in p.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("MINING") or time.time() > deadline:
                break
        time.sleep(1.0)  # let the mining job start: joins and map_batches tasks are running
    finally:
        _kill_tree(p)
    assert any(line.startswith("MINING") for line in lines), "".join(lines[-30:])
    search_manifest = (out / "search" / "dense" / "_manifest.json").read_text()
    assert not (out / "mine" / "_manifest.json").exists()  # mining never finished

    p2 = _driver(synthetic, out)
    text, _ = p2.communicate(timeout=240)
    assert p2.returncode == 0, text[-3000:]
    assert "DONE" in text
    assert "up to date" in text  # the finished search stage was skipped, not redone
    assert (out / "search" / "dense" / "_manifest.json").read_text() == search_manifest
    assert_tables_equal(mined_table(out), mined_table(reference))
    assert_tables_equal(read_sorted(out / "mine" / "dropped"), read_sorted(reference / "mine" / "dropped"))
