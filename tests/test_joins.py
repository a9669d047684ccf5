"""The one-task join equals Ray Data's distributed hash join (every join type, list payloads, nulls from
outer joins, coalesced keys), and the size rule that picks between them."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine import joins

LEFT = pa.table({
    "query_id": ["q1", "q2", "q3", "q4"],
    "neg": [["d1", "d2"], [], ["d3"], None],
    "score": pa.array([[0.5, 0.4], [], [0.9], None], pa.list_(pa.float32())),
})
RIGHT = pa.table({"query_id": ["q3", "q1", "q5"], "query": ["three", "one", "five"], "pos": [["p3"], ["p1", "p9"], []]})


def rows(t: pa.Table) -> list[tuple]:
    d = t.to_pydict()
    names = sorted(d)
    return sorted(tuple(repr(d[c][i]) for c in names) for i in range(t.num_rows))


def by_hand(how: str) -> list[dict]:
    """The join written out from its definition, on Python dicts."""
    left = {r["query_id"]: r for r in LEFT.to_pylist()}
    right = {r["query_id"]: r for r in RIGHT.to_pylist()}
    keys = {"inner": left.keys() & right.keys(), "left_outer": left.keys(), "right_outer": right.keys(),
            "full_outer": left.keys() | right.keys()}[how]
    empty_l = {"neg": None, "score": None}
    empty_r = {"query": None, "pos": None}
    return [{"query_id": k, **{c: v for c, v in left.get(k, empty_l).items() if c != "query_id"},
             **{c: v for c, v in right.get(k, empty_r).items() if c != "query_id"}} for k in keys]


@pytest.mark.parametrize("how", ["inner", "left_outer", "right_outer", "full_outer"])
def test_arrow_join_equals_the_definition(how):
    got = joins.arrow_join(LEFT, RIGHT, ["query_id"], how)
    assert got.column_names == ["query_id", "neg", "score", "query", "pos"]
    assert got.schema.field("score").type == pa.list_(pa.float32())
    assert rows(got) == rows(pa.Table.from_pylist(by_hand(how), schema=got.schema))


def test_arrow_join_refuses_a_column_clash_and_an_unknown_type():
    with pytest.raises(ValueError, match="query"):
        joins.arrow_join(LEFT.append_column("query", pa.array(["a"] * 4)), RIGHT, ["query_id"], "inner")
    with pytest.raises(ValueError, match="semi"):
        joins.arrow_join(LEFT, RIGHT, ["query_id"], "semi")


@pytest.mark.parametrize("how", ["left_outer", "full_outer"])
def test_local_join_equals_ray_data_join(ray_local, how):
    import ray.data

    left = ray.data.from_arrow([LEFT.slice(0, 2), LEFT.slice(2)])  # two blocks
    right = ray.data.from_arrow(RIGHT)
    dist = joins.join(left, right, how, 2, ("query_id",), local=False).to_arrow_refs()
    loc = joins.join(left, right, how, 2, ("query_id",), local=True).to_arrow_refs()
    a, b = (pa.concat_tables(ray.get(r)) for r in (dist, loc))
    assert rows(a) == rows(b.select(a.column_names))
    assert len(rows(b)) == len(by_hand(how))


def test_size_rule(tmp_path, monkeypatch):
    pq.write_table(LEFT, tmp_path / "a.parquet")
    (tmp_path / "folder").mkdir()
    pq.write_table(RIGHT, tmp_path / "folder" / "part-0.parquet")
    uris = [str(tmp_path / "a.parquet"), str(tmp_path / "folder")]
    size = (tmp_path / "a.parquet").stat().st_size + (tmp_path / "folder" / "part-0.parquet").stat().st_size
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", str(size))
    assert joins.is_small(uris)
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", str(size - 1))
    assert not joins.is_small(uris)
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", "0")  # 0 = always the distributed join
    assert not joins.is_small([])


def test_partitions_follow_the_input_size(tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    for i in range(3):
        pq.write_table(LEFT, tmp_path / "t" / f"part-{i}.parquet")
    size = sum(p.stat().st_size for p in (tmp_path / "t").iterdir())
    uris = [str(tmp_path / "t")]
    assert joins.plan(uris, 0) == (True, joins.MIN_PARTITIONS)  # small: one task (the count is then unused)
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", "0")
    monkeypatch.setattr(joins, "JOIN_PARTITION_BYTES", max(1, size // 10))  # ~10 partitions' worth of input
    local, n = joins.plan(uris, 0)
    assert not local and n == -(-size // joins.JOIN_PARTITION_BYTES) and 10 <= n <= 11
    monkeypatch.setattr(joins, "JOIN_PARTITION_BYTES", 1)
    assert joins.plan(uris, 0) == (False, min(joins.MAX_PARTITIONS, size))  # capped
    assert joins.plan(uris, 7) == (False, 7)  # an explicit count wins


def test_a_join_whose_output_outgrows_its_inputs_is_not_run_in_one_task(tmp_path, monkeypatch):
    """Small inputs but a large estimated output (an id → text join): the distributed join, with partitions sized
    from the output; without the estimate the same inputs join in one task."""
    pq.write_table(LEFT, tmp_path / "a.parquet")
    uris = [str(tmp_path / "a.parquet")]
    size = (tmp_path / "a.parquet").stat().st_size
    monkeypatch.setenv("RAYMINE_LOCAL_JOIN_BYTES", str(size * 2))
    assert joins.plan(uris, 0) == (True, joins.MIN_PARTITIONS)
    assert joins.plan(uris, 0, output_bytes=size * 2) == (True, joins.MIN_PARTITIONS)  # at the limit: one task
    assert joins.plan(uris, 0, output_bytes=size * 2 + 1)[0] is False
    monkeypatch.setattr(joins, "JOIN_PARTITION_BYTES", size)
    assert joins.plan(uris, 0, output_bytes=size * 9) == (False, 9)  # partitions from the output, not the input

