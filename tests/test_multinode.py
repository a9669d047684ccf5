"""Multi-node on one machine: Ray's test cluster (``ray.cluster_utils.Cluster``) with three raylets.

The scenario runs in a subprocess with its own ``RAY_TMPDIR``: the cluster's address file and
session folders stay out of ``/tmp/ray``, so neither the session Ray of this pytest process nor
anybody else's bare ``ray.init()`` can connect to it, and a stale address file cannot break them.

- shards at 1 CPU each on 1-CPU nodes → the two shards sit on two different nodes (actor node ids);
- an undisturbed run and a run whose shard-holding worker node is removed once the first query part is
  written (the shard restarts on the spare node, the query workers' calls are retried) write identical
  candidates and mined negatives.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# CI budget (25 min): the three-raylet cluster takes ~105 s on 2 quiet cores; `make test-slow` runs it
pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from dataclasses import replace
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    import test_faults as T

    work = Path({work!r})
    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    result = {{"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
               "head": cluster.head_node.node_id}}
    paths = T.write_synthetic(work / "data")
    # one shard per 1-CPU node; the query worker takes no CPU, so a removed shard can restart on the spare node
    search = replace(T.SEARCH, num_cpus_per_shard=1.0, num_cpus_per_task=0.0)

    def node_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

    placements = {{}}

    def record(index, folder):
        placements["ref"] = [node_of(a) for a in index.actors]

    T.search_and_mine(paths, work / "ref", search=search, on_start=record)
    removed = {{}}

    def remove_worker(index, folder):
        placements["fault"] = [node_of(a) for a in index.actors]
        if T.wait_for_parts(folder, 1) > 0:  # mid-search: the first query part is written, 19 remain
            on = {{n.node_id: n for n in workers}}
            victim = next(nid for nid in placements["fault"] if nid in on)  # a worker node holding a shard
            removed["parts_then"] = len(list(folder.glob("part-*.parquet")))
            cluster.remove_node(on[victim])
            removed["node"] = victim
    T.search_and_mine(paths, work / "fault", search=search, on_start=remove_worker)
    result["placements"] = placements
    result["removed"] = removed.get("node")
    result["parts_when_removed"] = removed.get("parts_then")
    result["alive_after"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.fixture(scope="module")
def multinode_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    script = SCRIPT.format(tests=str(TESTS), root=str(ROOT), work=str(work))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=480)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return work, json.loads(line[len("RESULT "):])


def test_shards_on_different_nodes(multinode_run):
    _, r = multinode_run
    assert len(r["nodes"]) == 3
    for run in ("ref", "fault"):
        nodes = r["placements"][run]
        assert len(nodes) == 2 and len(set(nodes)) == 2, f"{run}: shards share a node: {nodes}"
        assert set(nodes) <= set(r["nodes"])


def test_worker_node_removed_mid_search_identical_output(multinode_run):
    from test_faults import assert_tables_equal, candidates_table, mined_table

    work, r = multinode_run
    assert r["removed"] in r["placements"]["fault"] and r["removed"] != r["head"]
    assert r["parts_when_removed"] < 20  # removed mid-stage, before the last query part
    assert r["removed"] not in r["alive_after"] and len(r["alive_after"]) == 2
    assert_tables_equal(candidates_table(work / "fault"), candidates_table(work / "ref"))
    assert_tables_equal(mined_table(work / "fault"), mined_table(work / "ref"))
