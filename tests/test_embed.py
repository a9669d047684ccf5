"""Ray embed stage: equals single-process encoding, in input order, Parquet layout, manifest skip."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.columns import DOC_ID, EMBEDDING, QUERY_ID, TEXT
from raymine.config import EmbedConfig, TeacherConfig
from raymine.embed import (
    arrow_to_embeddings,
    embedding_files,
    embeddings_to_arrow,
    iter_embedding_batches,
    read_embeddings,
)

WORDS = "protein cell gene vitamin bone brain neuron insulin tumour virus".split()


def corpus(n: int) -> list[dict]:
    """Texts of very different lengths (so length sorting reorders), ids not in sort order."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 60)))
        rows.append({DOC_ID: f"doc-{(i * 37) % n:04d}", TEXT: f"passage {i}: " + " ".join(words)})
    return rows


def test_arrow_roundtrip_fixed_size_list():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    arr = embeddings_to_arrow(emb)
    assert arr.type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(arrow_to_embeddings(arr), emb)
    np.testing.assert_array_equal(arrow_to_embeddings(arr.slice(1, 2)), emb[1:3])  # offsets respected
    half = embeddings_to_arrow(emb.astype(np.float16))
    assert half.type == pa.list_(pa.float16(), 3)
    got = arrow_to_embeddings(pa.chunked_array([half.slice(0, 1), half.slice(1, 3)]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, emb)


def _write(rows: list[dict], path, row_group_size: int) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def both_run(ray_local, minilm_path, tmp_path_factory):
    """One pool embeds 120 passages (two files' worth of row groups) and 30 prompted queries: 2 actors,
    pieces of 15 passages (the pool's share, under rows_per_block 16) and 16 queries, some passages truncated."""
    from raymine.embed import EmbedInput, embed_tables

    tmp = tmp_path_factory.mktemp("emb")
    rows = corpus(120)
    qrows = [{QUERY_ID: f"q{i}", TEXT: r[TEXT][:60]} for i, r in enumerate(corpus(30))]
    (tmp / "corpus").mkdir()
    _write(rows[:70], tmp / "corpus" / "a.parquet", 40)  # row groups 40 + 30, then 50
    _write(rows[70:], tmp / "corpus" / "b.parquet", 50)
    qpath = _write(qrows, tmp / "queries.parquet", 30)
    teacher = TeacherConfig(model=minilm_path, passage_max_length=24, batch_size=8, query_prompt="query: ")
    cfg = EmbedConfig(num_actors=2, rows_per_block=16, num_cpus_per_actor=0.5)
    inputs = [EmbedInput("passage", str(tmp / "corpus"), DOC_ID, TEXT, str(tmp / "out" / "corpus")),
              EmbedInput("query", qpath, QUERY_ID, TEXT, str(tmp / "out" / "queries"))]
    manifest = embed_tables(teacher, cfg, inputs, str(tmp / "out"), input_key="k1")
    return rows, qrows, teacher, cfg, inputs, tmp, manifest


def test_one_pool_equals_single_process_in_input_order(both_run):
    from raymine.encoders import Encoder

    rows, qrows, teacher, cfg, inputs, tmp, manifest = both_run
    ids, emb = read_embeddings(inputs[0].out_uri, DOC_ID)
    assert ids.dtype == object and list(ids) == [r[DOC_ID] for r in rows]
    enc = Encoder(teacher)
    ref = enc.encode([r[TEXT] for r in rows], "passage")
    assert emb.shape == (120, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    qids, qemb = read_embeddings(inputs[1].out_uri, QUERY_ID)
    assert list(qids) == [r[QUERY_ID] for r in qrows]
    np.testing.assert_allclose(qemb, enc.encode([r[TEXT] for r in qrows], "query"), atol=1e-5)  # prompted

    counts = manifest["counts"]
    assert counts["passage_rows"] == 120 and counts["query_rows"] == 30 and counts["rows"] == 150
    assert counts["passage_truncated"] == enc.truncated_by_side["passage"] > 0  # the same texts were cut
    # 120 passages for 2 actors: pieces of ceil(120 / 8) = 15 rows (under rows_per_block 16, over the batch 8);
    # they never cross row groups: 40 → 15+15+10, 30 → 15+15, 50 → 15+15+15+5; queries keep 16: 30 → 16+14
    assert counts["pieces"] == 3 + 2 + 4 + 2
    assert counts["actors_used"] == 2 and counts["actors_requested"] == 2  # both actors got work
    assert 0 < counts["busy_fraction"] <= 1
    # each actor's start-up: model loaded after its constructor began, both inside the stage's wall time, and a
    # busy actor's work fits in what is left of the wall after it was ready
    ready, load, busy = manifest["ready_s_per_actor"], manifest["load_s_per_actor"], manifest["busy_s_per_actor"]
    assert len(ready) == len(load) == len(busy) == 2
    assert all(0 < x < manifest["wall_s"] for x in ready) and all(0 < x <= r for x, r in zip(load, ready, strict=True))
    assert max(busy) <= manifest["wall_s"] - min(ready) + 0.5
    assert manifest["dim"] == 384 and manifest["pooling"] == "mean" and manifest["model"] == teacher.model


def test_parquet_layout_and_streaming_reader(both_run):
    rows, _, _, _, inputs, _, _ = both_run
    files = embedding_files(inputs[0].out_uri)
    assert [os.path.basename(f) for f in files] == [f"part-{i:09d}.parquet" for i in range(9)]
    schema = pq.read_schema(files[0])
    assert schema.field(DOC_ID).type == pa.string()
    assert schema.field(EMBEDDING).type == pa.list_(pa.float32(), 384)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [15, 15, 10, 15, 15, 15, 15, 15, 5]

    ids_all, emb_all = read_embeddings(inputs[0].out_uri, DOC_ID)
    batches = list(iter_embedding_batches(inputs[0].out_uri, DOC_ID, batch_rows=7))
    assert max(len(i) for i, _ in batches) == 7
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), ids_all)
    np.testing.assert_array_equal(np.concatenate([e for _, e in batches]), emb_all)


def test_rerun_with_same_config_does_no_work(both_run):
    from raymine.embed import embed_tables

    _, _, teacher, cfg, inputs, tmp, manifest = both_run
    files = embedding_files(inputs[0].out_uri) + embedding_files(inputs[1].out_uri)
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    again = embed_tables(teacher, cfg, inputs, str(tmp / "out"), input_key="k1")
    assert again == manifest  # the stored manifest, same finish time: nothing ran
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes


def test_killed_run_resumes_only_missing_parts_identically(both_run, tmp_path):
    """A run that died mid-stage (no manifest, some parts missing, one truncated) re-embeds exactly the
    missing and damaged pieces; the result equals the uninterrupted run."""
    import shutil

    from raymine.embed import embed_tables

    _, _, teacher, cfg, inputs, tmp, manifest = both_run
    ref_ids, ref_emb = read_embeddings(inputs[0].out_uri, DOC_ID)
    shutil.copytree(tmp / "out", tmp_path / "out")
    moved = [replace(s, out_uri=s.out_uri.replace(str(tmp / "out"), str(tmp_path / "out"))) for s in inputs]
    os.remove(tmp_path / "out" / "_manifest.json")  # the driver died before finishing
    os.remove(tmp_path / "out" / "corpus" / "part-000000003.parquet")
    os.remove(tmp_path / "out" / "queries" / "part-000000001.parquet")
    with open(tmp_path / "out" / "corpus" / "part-000000007.parquet", "r+b") as f:  # an interrupted copy
        f.truncate(100)
    kept = {f: os.stat(f).st_mtime_ns for f in embedding_files(moved[0].out_uri) if "000000007" not in f}
    m = embed_tables(teacher, cfg, moved, str(tmp_path / "out"), input_key="k1")
    assert m["counts"]["pieces"] == 3 and m["counts"]["parts_kept"] == 11 - 3  # 7 corpus + 1 query part kept
    for f, t in kept.items():
        assert os.stat(f).st_mtime_ns == t  # untouched
    ids, emb = read_embeddings(moved[0].out_uri, DOC_ID)
    assert list(ids) == list(ref_ids)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6)
    assert m["counts"]["passage_rows"] == 15 + 15 and m["counts"]["query_rows"] == 14


def test_killed_run_resumed_with_another_pool_redoes_no_finished_part(both_run, tmp_path):
    """Killed mid-embed (no manifest, parts missing) and resumed with 1 actor instead of 2: the same key, so
    every finished part is kept untouched (bit for bit), only the missing pieces are embedded, and the vectors
    equal the uninterrupted 2-actor run's — to float32 rounding: the one actor runs 2 torch threads where each
    of the two ran 1, and on some CPUs (this AVX2-only one: max |diff| 1.3e-7) the GEMM then sums in another
    order. The manifest's parts (what the actors reported with each write) equal a listing with every footer
    read."""
    import shutil

    from raymine import storage
    from raymine.embed import embed_tables

    _, _, teacher, cfg, inputs, tmp, manifest = both_run
    shutil.copytree(tmp / "out", tmp_path / "out")
    moved = [replace(s, out_uri=s.out_uri.replace(str(tmp / "out"), str(tmp_path / "out"))) for s in inputs]
    os.remove(tmp_path / "out" / "_manifest.json")
    for name in ("corpus/part-000000000.parquet", "corpus/part-000000008.parquet", "queries/part-000000000.parquet"):
        os.remove(tmp_path / "out" / name)
    kept = {f: os.stat(f).st_mtime_ns for s in moved for f in embedding_files(s.out_uri)}
    resized = replace(cfg, num_actors=1, num_cpus_per_actor=1.0)
    m = embed_tables(teacher, resized, moved, str(tmp_path / "out"), input_key="k1")
    assert m["key"] == manifest["key"]
    assert m["counts"]["pieces"] == 3 and m["counts"]["parts_kept"] == 11 - 3 and m["counts"]["actors_used"] == 1
    assert m["counts"]["passage_rows"] == 15 + 5 and m["counts"]["query_rows"] == 16
    assert {f: os.stat(f).st_mtime_ns for f in kept} == kept  # no finished part redone
    for spec, ref in zip(moved, inputs, strict=True):
        idc = DOC_ID if spec.side == "passage" else QUERY_ID
        ids, emb = read_embeddings(spec.out_uri, idc)
        ref_ids, ref_emb = read_embeddings(ref.out_uri, idc)
        assert list(ids) == list(ref_ids)
        np.testing.assert_allclose(emb, ref_emb, rtol=0, atol=1e-6)
    listing = storage._part_records(str(tmp_path / "out"))
    assert m["parts"] == {
        n: {"bytes": b, "rows": r} for n, b, r in zip(*(listing.column(c).to_pylist() for c in ("name", "bytes", "rows")),
                                                       strict=True)}
    # the same parts with the same rows; re-embedded parts may differ in compressed bytes (last-bit float changes)
    assert {n: p["rows"] for n, p in m["parts"].items()} == {n: p["rows"] for n, p in manifest["parts"].items()}
    kept_names = [n for n in m["parts"] if os.path.join(str(tmp_path / "out"), n) in kept]
    assert len(kept_names) == 8 and all(m["parts"][n] == manifest["parts"][n] for n in kept_names)
    assert len(m["parts"]) == 11 and storage.completed(str(tmp_path / "out"), m["key"]) == m


@pytest.mark.slow  # CI budget (25 min): 39 s on 2 quiet cores; `make test-slow` runs it
def test_float16_storage_and_config_change_reruns(ray_local, minilm_path, tmp_path):
    from raymine.embed import EmbedInput, embed_tables
    from raymine.encoders import Encoder

    rows = [{QUERY_ID: f"q{i}", TEXT: r[TEXT][:60]} for i, r in enumerate(corpus(30))]
    qpath = _write(rows, tmp_path / "q.parquet", 30)
    teacher = TeacherConfig(model=minilm_path, query_prompt="query: ", storage_dtype="float16")
    cfg = EmbedConfig(num_actors=2, rows_per_block=8)
    inputs = [EmbedInput("query", qpath, QUERY_ID, TEXT, str(tmp_path / "out" / "queries"))]
    m1 = embed_tables(teacher, cfg, inputs, str(tmp_path / "out"), input_key="k")
    assert m1["query_prompt"] == "query: "
    out = inputs[0].out_uri
    assert pq.read_schema(embedding_files(out)[0]).field(EMBEDDING).type == pa.list_(pa.float16(), 384)
    ids, emb = read_embeddings(out, QUERY_ID)
    assert list(ids) == [r[QUERY_ID] for r in rows] and emb.dtype == np.float32
    ref = Encoder(replace(teacher, storage_dtype="float32")).encode([r[TEXT] for r in rows], "query")
    np.testing.assert_allclose(emb, ref, atol=2e-3)  # float16 storage

    changed = replace(teacher, query_max_length=16)
    m2 = embed_tables(changed, cfg, inputs, str(tmp_path / "out"), input_key="k")
    assert m2["key"] != m1["key"] and m2["config"]["teacher"]["query_max_length"] == 16
    assert m2["counts"]["truncated"] > 0 and m1["counts"]["truncated"] == 0


def test_bad_arguments_fail_before_any_work(ray_local, minilm_path, tmp_path):
    from raymine.embed import EmbedInput, embed_tables

    path = _write([{DOC_ID: "a", TEXT: "x"}], tmp_path / "c.parquet", 1)
    with pytest.raises(ValueError, match="side"):
        embed_tables(TeacherConfig(model=minilm_path), EmbedConfig(),
                     [EmbedInput("doc", path, DOC_ID, TEXT, str(tmp_path / "o"))], str(tmp_path / "o"), "k")
    with pytest.raises(ValueError, match="dense"):
        embed_tables(TeacherConfig(kind="bm25"), EmbedConfig(),
                     [EmbedInput("passage", path, DOC_ID, TEXT, str(tmp_path / "o"))], str(tmp_path / "o"), "k")
    with pytest.raises(ValueError, match="missing"):
        embed_tables(TeacherConfig(model=minilm_path), EmbedConfig(),
                     [EmbedInput("passage", path, "pid", TEXT, str(tmp_path / "o"))], str(tmp_path / "o"), "k")


def test_piece_rows_cut_small_corpora_finer_whatever_the_pool():
    from raymine.embed import piece_rows

    cfg = EmbedConfig(num_actors=2, rows_per_block=256)
    assert piece_rows("passage", 5183, cfg, 32) == 256  # SciFact: 21 pieces of 256, as before
    assert piece_rows("passage", 300, cfg, 32) == 38  # ceil(300 / 8 pieces): 8 pieces, not 2 (as before at 2 actors)
    assert piece_rows("passage", 20, cfg, 32) == 32  # never below one encoder batch
    assert piece_rows("query", 300, cfg, 32) == 256  # queries keep the size search maps parts with
    assert piece_rows("passage", 300, EmbedConfig(num_actors=2, rows_per_block=16), 32) == 16  # never above it
    assert piece_rows("passage", 300, EmbedConfig(num_actors=64, rows_per_block=256), 8) == 38  # pool left out
    for actors in (1, 3, 64):  # the pool never moves a piece boundary
        for n in (20, 300, 5183, 10**6):
            assert piece_rows("passage", n, replace(cfg, num_actors=actors), 32) == piece_rows("passage", n, cfg, 32)


def test_embed_key_leaves_out_the_pool_resources():
    from raymine.embed import key_config

    cfg = EmbedConfig(num_actors=2, num_cpus_per_actor=0.5, rows_per_block=256)
    for other in (replace(cfg, num_actors=64), replace(cfg, num_cpus_per_actor=4.0), replace(cfg, num_actors=1)):
        assert key_config(other) == key_config(cfg)
    assert key_config(replace(cfg, num_gpus_per_actor=1.0)) == key_config(replace(cfg, num_gpus_per_actor=0.5))
    assert key_config(replace(cfg, num_gpus_per_actor=1.0)) != key_config(cfg)  # GPU encodes in half precision
    assert key_config(replace(cfg, rows_per_block=128)) != key_config(cfg)  # other pieces, other batches
