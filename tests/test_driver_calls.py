"""The driver's filesystem calls do not grow with the number of parts (issue 26).

On an object store every driver call is a request, so a serial per-part call (a footer read per part) is hours
at 10^6 parts. Each driver-side step that looks at a table's or a stage's parts runs here through an
instrumented filesystem on 1,000 and on 10,000 parts: planning pieces from footers, an embedding table's
layout (the search index), a corpus layout (BM25), a stage's manifest with its part list, the up-to-date check
of a finished stage, and the resume check of an earlier run's parts. The count of the driver's calls must be
the same at both sizes; the footers are read by a bounded number of Ray tasks (their processes do not use the
instrumented filesystem), and every result is checked against the parts written.
"""
from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raymine import bm25, index, parts, storage

CALLS = ("get_file_info", "get_file_info_selector", "create_dir", "delete_dir", "delete_dir_contents", "delete_file",
         "move", "copy_file", "open_input_stream", "open_input_file", "open_output_stream", "open_append_stream")


class CountingHandler(pafs.FSSpecHandler):
    """The local filesystem, counting every call the driver makes through it."""

    def __init__(self, counts: collections.Counter):
        import fsspec

        super().__init__(fsspec.filesystem("file"))
        self.counts = counts

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name in CALLS:
            object.__getattribute__(self, "counts")[name] += 1
        return attr


@pytest.fixture
def counted(monkeypatch):
    """Driver-side ``storage.resolve`` through the counting filesystem; returns the live counter."""
    counts: collections.Counter = collections.Counter()
    real = storage.resolve

    def resolve(uri: str):
        fs, path = real(uri)
        return (pafs.PyFileSystem(CountingHandler(counts)), path) if "://" not in uri else (fs, path)

    monkeypatch.setattr(storage, "resolve", resolve)
    return counts


def _write_parts(folder, n: int) -> None:
    """``n`` one-row parts of an embedding-and-text table, named as the stages name them."""
    folder.mkdir(parents=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4, np.float32)), 4)
    for i in range(n):
        pq.write_table(pa.table({"doc_id": [f"d{i}"], "text": [f"text {i}"], "embedding": emb}),
                       folder / parts.part_name(i))


def _driver_calls(counted, folder, n: int) -> dict[str, int]:
    uri = str(folder)
    calls = {}

    def count(step, fn):
        counted.clear()
        out = fn()
        calls[step] = sum(counted.values())
        return out

    pieces = count("plan_pieces", lambda: parts.plan_pieces(uri, 1000))  # footers: parts.row_groups
    assert len(pieces) == n and sum(p.rows for p in pieces) == n
    dim, groups = count("embedding_layout", lambda: index.embedding_layout(uri))
    assert dim == 4 and len(groups) == n
    cols, groups = count("corpus_layout", lambda: bm25.corpus_layout(uri))
    assert cols == ["doc_id", "text"] and len(groups) == n
    storage.write_json(storage.join(uri, storage.STARTED), {"key": "k"})
    m = count("manifest", lambda: storage.StageRun(uri, "s", "k").finish())
    assert m["parts"]["count"] == n and m["parts"]["rows"] == n  # the side file's summary
    assert count("up_to_date", lambda: storage.completed(uri, "k")) == m
    kept, nbytes = count("resume_check", lambda: parts.kept_parts(uri, np.ones(n, np.int64)))
    assert kept.all() and (nbytes > 0).all()
    return calls


@pytest.mark.parametrize("small,large", [
    (200, 2_000),  # in CI (~15 s)
    pytest.param(1_000, 10_000, marks=pytest.mark.slow),  # the sizes (~70 s: 10k footers read 5 times)
])
def test_driver_filesystem_calls_do_not_grow_with_the_number_of_parts(ray_local, counted, tmp_path, monkeypatch,
                                                                     small, large):
    monkeypatch.setattr(storage, "INLINE_PARTS", small // 2)  # both sizes list their parts in the side file
    _write_parts(tmp_path / "small", small)
    _write_parts(tmp_path / "large", large)
    at_small = _driver_calls(counted, tmp_path / "small", small)
    at_large = _driver_calls(counted, tmp_path / "large", large)
    assert at_large == at_small, f"driver calls at {small} parts {at_small}, at {large} {at_large}"
    assert max(at_large.values()) <= 10, at_large  # a listing, a schema or side-file read, a manifest: not per part


def test_footer_tasks_are_bounded_and_cover_every_file():
    for n in (1, 255, 256, 257, 1_000, 10_000, 1_000_000):
        chunks = storage.file_chunks(n)
        assert len(chunks) <= storage.FILES_TASKS_MAX
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
        assert all(hi - lo >= min(n, storage.FILES_PER_TASK) for lo, hi in chunks)
