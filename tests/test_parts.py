"""parts: the Ray Dataset over a folder table that every stage reads raymine's own Parquet with."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import parts


def _folder(tmp_path):
    """part-00000: 7 rows in 3 row groups (3 + 3 + 1); part-00001: an empty table; beside them a manifest and a
    ``_work`` folder whose Parquet is not part of the table."""
    root = tmp_path / "table"
    root.mkdir()
    a = pa.table({"id": [f"d{i}" for i in range(7)], "x": list(range(7)), "v": [[float(i)] * 2 for i in range(7)]})
    pq.write_table(a, root / "part-00000.parquet", row_group_size=3)
    pq.write_table(a.schema.empty_table(), root / "part-00001.parquet")
    (root / "_manifest.json").write_text(json.dumps({"done": True}))
    (root / "_work").mkdir()
    pq.write_table(a.slice(0, 2), root / "_work" / "part-00000.parquet")
    return root, a


def test_read_dataset_gives_every_row_of_every_row_group(ray_local, tmp_path):
    root, a = _folder(tmp_path)
    assert pq.ParquetFile(root / "part-00000.parquet").metadata.num_row_groups == 3
    got = pa.concat_tables(parts.read_dataset(str(root)).iter_batches(batch_size=None, batch_format="pyarrow"))
    # every row group's rows once; the _work folder's rows are not read, the empty part adds none
    assert got.sort_by("x").equals(a)


def test_read_dataset_selects_columns(ray_local, tmp_path):
    root, a = _folder(tmp_path)
    got = pa.concat_tables(parts.read_dataset(str(root), ["x", "id"]).iter_batches(batch_size=None,
                                                                                      batch_format="pyarrow"))
    assert got.column_names == ["x", "id"]
    assert parts.schema(str(root)) == a.schema  # from the first part's footer, not the _work folder's
    assert parts.num_rows(str(root)) == 7  # footers: 3 + 3 + 1 + the empty part; the _work folder's 2 not counted
    assert sorted(got.column("id").to_pylist()) == a.column("id").to_pylist()


def test_read_dataset_bounds_its_read_tasks_and_reads_every_file_once(ray_local, tmp_path, monkeypatch):
    """More files than ``read_tasks()``: runs of consecutive files per task (the driver's memory grows with the
    number of Ray Data tasks, not with the files); every row of every file exactly once."""
    import re

    root = tmp_path / "many"
    root.mkdir()
    for i in range(7):
        pq.write_table(pa.table({"x": list(range(10 * i, 10 * i + 10))}), root / parts.part_name(i), row_group_size=4)
    monkeypatch.setenv("RAYMINE_READ_TASKS", "3")
    assert parts.read_tasks() == 3
    ds = parts.read_dataset(str(root), ["x"]).materialize()
    assert sorted(pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))["x"].to_pylist()) \
        == list(range(70))
    assert re.search(r"MapBatches\(_read_files\): 3 tasks executed", ds.stats())
    monkeypatch.delenv("RAYMINE_READ_TASKS")
    assert parts.read_tasks() == max(parts.MIN_TASKS, 2 * 4)  # Ray Data's default: max(200, 2 x the CPUs)


def test_read_dataset_of_an_empty_table_has_its_schema(ray_local, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    schema = pa.schema([("id", pa.string()), ("x", pa.int64())])
    pq.write_table(schema.empty_table(), root / "part-00000.parquet")
    ds = parts.read_dataset(str(root), ["id"])
    assert ds.count() == 0
    assert ds.schema().names == ["id"]


# ------------------------------------------------------------------------------------------------
# Part names at scale, resume checks, and manifests that summarise their parts
# ------------------------------------------------------------------------------------------------
def test_part_names_sort_in_input_order_up_to_10_to_the_8():
    idx = [0, 1, 9, 10, 99_999, 100_000, 100_001, 999_999, 1_000_000, 12_345_678, 99_999_999, 10**8, 10**8 + 1,
           999_999_999]
    names = [parts.part_name(i) for i in idx]
    assert sorted(names) == names  # as text: what any reader of the folder does
    assert [parts.part_index(n) for n in names] == idx
    assert parts.part_index("part-00012.parquet") is None and parts.part_index("part-0000000012.parquet") is None
    # older 5-digit names (a 6th digit from 100,000 on) sort as text wrongly, by sort_key rightly
    legacy = [parts.LEGACY_PART.format(i) for i in (9, 10, 99_999, 100_000, 100_001, 1_000_000)]
    assert sorted(legacy) != legacy
    assert sorted(reversed(legacy), key=parts.sort_key) == legacy
    # ingest's part-<task>-<block> by numbers; other names keep their text order
    assert sorted(["d/part-10-2.parquet", "d/part-9-10.parquet", "d/part-9-9.parquet"], key=parts.sort_key) == [
        "d/part-9-9.parquet", "d/part-9-10.parquet", "d/part-10-2.parquet"]
    assert sorted(["b.parquet", "a.parquet", "part-3f.parquet"], key=parts.sort_key) == [
        "a.parquet", "b.parquet", "part-3f.parquet"]


def test_a_folder_of_older_names_still_reads_in_input_order(tmp_path):
    from raymine.embed import embedding_files, embeddings_to_arrow, read_embeddings

    root = tmp_path / "emb"
    root.mkdir()
    for i in (99_998, 99_999, 100_000, 100_001):  # the names an older run gave parts past 99,999
        pq.write_table(pa.table({"doc_id": [f"d{i}"], "embedding": embeddings_to_arrow(np.full((1, 2), i, np.float32))}),
                       root / parts.LEGACY_PART.format(i))
    order = [f"d{i}" for i in (99_998, 99_999, 100_000, 100_001)]
    assert [os.path.basename(p) for p in parts.list_parquet(str(root))] == [
        parts.LEGACY_PART.format(i) for i in (99_998, 99_999, 100_000, 100_001)]
    assert len(embedding_files(str(root))) == 4
    assert list(read_embeddings(str(root), "doc_id")[0]) == order
    # part i by its number: the older name where only it exists, the 9-digit one otherwise
    assert parts.find_part(str(root), 100_000).endswith("part-100000.parquet")
    parts.write_part(pa.table({"x": [1]}), str(root), 100_000)
    assert parts.find_part(str(root), 100_000).endswith(parts.part_name(100_000))


def test_kept_parts_checks_footers_in_ray_tasks_and_deletes_damaged(ray_local, tmp_path, monkeypatch):
    folder = str(tmp_path / "out")
    rows = np.array([3, 4, 5, 6, 7], np.int64)
    assert parts.kept_parts(folder, rows)[0].tolist() == [False] * 5  # nothing there: a listing only
    sizes = {}
    for i in (0, 1, 3, 4):
        _, sizes[i] = parts.write_part_sized(pa.table({"x": list(range(int(rows[i])))}), folder, i)
    assert sizes[0] == os.path.getsize(tmp_path / "out" / parts.part_name(0))
    parts.write_part(pa.table({"x": [1, 2]}), folder, 3)  # a part of another size: damaged
    with open(tmp_path / "out" / parts.part_name(4), "r+b") as f:  # cut short
        f.truncate(20)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "part-00001.parquet")  # not this stage's name
    from raymine import storage

    monkeypatch.setattr(storage, "FILES_PER_TASK", 2)  # several tasks
    kept, nbytes = parts.kept_parts(folder, rows)
    assert kept.tolist() == [True, True, False, False, False]
    assert nbytes.tolist() == [sizes[0], sizes[1], 0, 0, 0]
    assert not (tmp_path / "out" / parts.part_name(3)).exists() and not (tmp_path / "out" / parts.part_name(4)).exists()


def test_many_parts_are_summarised_in_a_side_file(tmp_path, monkeypatch):
    from raymine import storage

    monkeypatch.setattr(storage, "INLINE_PARTS", 3)
    d = tmp_path / "stage"
    _, run = storage.begin(str(d), "s", "k")
    names, sizes, rows = [], [], []
    for i in range(5):
        _, b = parts.write_part_sized(pa.table({"x": list(range(i + 1))}), str(d / "t"), i)
        names.append(f"t/{parts.part_name(i)}")
        sizes.append(b)
        rows.append(i + 1)
    m = run.finish(parts=storage.part_table(names, sizes, rows))
    assert m["parts"] == {"file": storage.PARTS_FILE, "count": 5, "bytes": sum(sizes), "rows": 15}
    assert storage.listed_parts(str(d), m) == dict(zip(names, sizes, strict=True))
    assert storage.completed(str(d), "k") == m
    assert parts.list_parquet(str(d / "t")) and parts.num_rows(str(d)) == 15  # the side file is not a table part
    parts.write_part(pa.table({"x": list(range(100))}), str(d / "t"), 0)  # replaced: another size
    assert storage.damaged_parts(str(d), m) == [names[0]]
    assert storage.completed(str(d), "k") is None
    # a listing-based finish (stages whose workers do not report) summarises the same way
    _, run = storage.begin(str(tmp_path / "other"), "s", "k")
    for i in range(4):
        parts.write_part(pa.table({"x": [i]}), str(tmp_path / "other"), i)
    assert run.finish()["parts"]["count"] == 4
