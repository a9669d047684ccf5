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


@pytest.fixture(scope="module")
def passage_run(ray_local, minilm_path, tmp_path_factory):
    """One Ray run: 2 actors, blocks of 16 rows, files of 50 rows, some texts truncated."""
    import ray

    rows = corpus(120)
    teacher = TeacherConfig(model=minilm_path, passage_max_length=24, batch_size=8)
    cfg = EmbedConfig(num_actors=2, rows_per_block=16, rows_per_file=50, num_cpus_per_actor=0.5)
    out = str(tmp_path_factory.mktemp("emb") / "passages")
    from raymine.embed import embed_stage

    ds = ray.data.from_items(rows)
    manifest = embed_stage(ds, DOC_ID, TEXT, teacher, cfg, "passage", out)
    return rows, teacher, cfg, out, ds, manifest


def test_ray_stage_equals_single_process_in_input_order(passage_run):
    from raymine.encoders import Encoder

    rows, teacher, cfg, out, _, manifest = passage_run
    ids, emb = read_embeddings(out, DOC_ID)
    assert ids.dtype == object and list(ids) == [r[DOC_ID] for r in rows]
    enc = Encoder(teacher)
    ref = enc.encode([r[TEXT] for r in rows], "passage")
    assert emb.shape == (120, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=1e-5)

    counts = manifest["counts"]
    assert counts["rows"] == 120
    assert counts["truncated"] == enc.truncated > 0  # the same texts were cut in the actors
    assert counts["input_blocks"] == 8  # ceil(120 rows / 16 per block)
    assert counts["actors_used"] == 2  # both actors got work
    assert manifest["dim"] == 384 and manifest["pooling"] == "mean" and manifest["model"] == teacher.model
    assert manifest["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_parquet_layout_and_streaming_reader(passage_run):
    rows, _, _, out, _, _ = passage_run
    files = embedding_files(out)
    assert [os.path.basename(f) for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    schema = pq.read_schema(files[0])
    assert schema.field(DOC_ID).type == pa.string()
    assert schema.field(EMBEDDING).type == pa.list_(pa.float32(), 384)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [50, 50, 20]

    ids_all, emb_all = read_embeddings(out, DOC_ID)
    batches = list(iter_embedding_batches(out, DOC_ID, batch_rows=7))
    assert max(len(i) for i, _ in batches) == 7
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), ids_all)
    np.testing.assert_array_equal(np.concatenate([e for _, e in batches]), emb_all)


def test_rerun_with_same_config_does_no_work(passage_run):
    from raymine.embed import embed_stage

    rows, teacher, cfg, out, ds, manifest = passage_run
    mtimes = {f: os.stat(f).st_mtime_ns for f in embedding_files(out)}
    again = embed_stage(ds, DOC_ID, TEXT, teacher, cfg, "passage", out)
    assert again == manifest  # the stored manifest, same finish time: nothing ran
    assert {f: os.stat(f).st_mtime_ns for f in embedding_files(out)} == mtimes


def test_query_side_prompt_float16_and_config_change_reruns(ray_local, minilm_path, tmp_path):
    import ray

    from raymine.embed import embed_stage
    from raymine.encoders import Encoder

    rows = [{QUERY_ID: f"q{i}", TEXT: r[TEXT][:60]} for i, r in enumerate(corpus(30))]
    ds = ray.data.from_items(rows)
    teacher = TeacherConfig(model=minilm_path, query_prompt="query: ", passage_prompt="passage: ",
                            storage_dtype="float16")
    cfg = EmbedConfig(num_actors=2, rows_per_block=8)
    out = str(tmp_path / "queries")
    m1 = embed_stage(ds, QUERY_ID, TEXT, teacher, cfg, "query", out)
    assert m1["prompt"] == "query: " and m1["side"] == "query"
    assert pq.read_schema(embedding_files(out)[0]).field(EMBEDDING).type == pa.list_(pa.float16(), 384)
    ids, emb = read_embeddings(out, QUERY_ID)
    assert list(ids) == [r[QUERY_ID] for r in rows] and emb.dtype == np.float32
    ref = Encoder(TeacherConfig(model=minilm_path)).encode(["query: " + r[TEXT] for r in rows], "query")
    np.testing.assert_allclose(emb, ref, atol=2e-3)  # float16 storage

    changed = replace(teacher, query_max_length=16)
    m2 = embed_stage(ds, QUERY_ID, TEXT, changed, cfg, "query", out)
    assert m2["key"] != m1["key"] and m2["config"]["teacher"]["query_max_length"] == 16
    assert m2["counts"]["truncated"] > 0 and m1["counts"]["truncated"] == 0


def test_bad_arguments_fail_before_any_work(ray_local, minilm_path, tmp_path):
    import ray

    from raymine.embed import embed_stage

    ds = ray.data.from_items([{DOC_ID: "a", TEXT: "x"}])
    with pytest.raises(ValueError, match="side"):
        embed_stage(ds, DOC_ID, TEXT, TeacherConfig(model=minilm_path), EmbedConfig(), "doc", str(tmp_path))
    with pytest.raises(ValueError, match="dense"):
        embed_stage(ds, DOC_ID, TEXT, TeacherConfig(kind="bm25"), EmbedConfig(), "passage", str(tmp_path))
    with pytest.raises(ValueError, match="lacks column"):
        embed_stage(ds, "pid", TEXT, TeacherConfig(model=minilm_path), EmbedConfig(), "passage", str(tmp_path))
