"""parts: the Ray Dataset over a folder table that every stage reads raymine's own Parquet with."""
from __future__ import annotations

import json

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


def test_read_dataset_of_an_empty_table_has_its_schema(ray_local, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    schema = pa.schema([("id", pa.string()), ("x", pa.int64())])
    pq.write_table(schema.empty_table(), root / "part-00000.parquet")
    ds = parts.read_dataset(str(root), ["id"])
    assert ds.count() == 0
    assert ds.schema().names == ["id"]
