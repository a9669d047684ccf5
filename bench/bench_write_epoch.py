"""Driver memory and wall time of ``train_data.write_epoch`` alone, on an existing training-rows table.

Runs one implementation in this process on a private local Ray and prints the driver's RSS before, its peak
during the call (``VmHWM``, reset first) and the wall time. ``--rev REV`` loads ``raymine/train_data.py`` as it
was at a git revision (e.g. ``6accf3c``, the Ray Data sort) instead of the working tree; run each implementation
in its own process so peaks do not carry over. The rows table of a ``bench_scale.py --full`` point is at
``<work>/<docs>x<queries>/out/train_checkpoints/train_rows/<key>``:

    .venv/bin/python bench/bench_write_epoch.py --rows /tmp/bs_fq/50000x200000/out/train_checkpoints/train_rows/<key>
    .venv/bin/python bench/bench_write_epoch.py --rows ... --rev 6accf3c
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", required=True, help="a training-rows folder written by train_data.build_rows")
    ap.add_argument("--rev", help="git revision whose raymine/train_data.py to run (default: the working tree)")
    ap.add_argument("--row-group-rows", type=int, default=16, help="per-rank batch (bench_scale's full job: 16)")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    import raymine.train_data as mod

    if args.rev:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.rev}:raymine/train_data.py"], check=True,
                             capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "train_data_rev.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("train_data_rev", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    out = tempfile.mkdtemp(prefix="epoch-")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    mod.write_epoch(args.rows, 13, 0, out, args.row_group_rows)
    wall = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(out + "/*.parquet"))
    print(f"{args.rev or 'working tree'}: driver {before:.0f} MB before, peak {peak:.0f} MB (+{peak - before:.0f}); "
          f"{wall:.1f} s; {rows} rows written", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
