"""The CLI's error rule (issue 14): user errors exit 2 with one line, everything else exits 1 with a traceback.

Exact exit codes and the content of the one line, for a config error, an unknown stage, a missing data
folder, a malformed corpus line (file:line in the line), and errors raised inside a Ray task.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from raymine import cli
from raymine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY_BEIR = Path(__file__).resolve().parent / "data" / "tiny_beir"


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _one_line(capsys) -> str:
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert "usage:" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


def test_config_error_exits_2_with_one_line_naming_the_key(capsys):
    assert cli.main(["run", "mine.perc=95"]) == 2
    line = _one_line(capsys)
    assert line.startswith("error: mine.perc: 95.0 must be in (0, 1]"), line
    assert "config" in line  # what to do


def test_bad_yaml_value_names_the_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mine:\n  num_negatives: -3\n")
    assert cli.main(["run", "--config", str(bad)]) == 2
    line = _one_line(capsys)
    assert f"{bad}: mine.num_negatives: -3 must be >= 1" in line


def test_unknown_stage_exits_2_before_anything_runs(capsys):
    assert cli.main(["run", "--stages", "embed,polish"]) == 2
    line = _one_line(capsys)
    assert "--stages" in line and "'polish'" in line and "embed,search,mine,train,evaluate" in line


def test_unknown_flag_is_one_line_not_a_usage_block(capsys):
    assert cli.main(["run", "--nope"]) == 2
    line = _one_line(capsys)
    assert "unrecognized arguments: --nope" in line and "--help" in line


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["run", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in _one_line(capsys)


def test_missing_data_folder_exits_2(ray_local, tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    assert cli.main(["run", "--data", str(missing), "--output", str(tmp_path / "out")]) == 2
    line = _stderr_lines(capsys)[-1]
    assert line.startswith(f"error: stage ingest: {missing}: [missing_path] data folder not found"), line


def test_malformed_corpus_line_names_file_and_line(ray_local, tmp_path, capsys):
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    (data / "queries.jsonl").write_bytes((TINY_BEIR / "queries.jsonl").read_bytes())
    for split in ("train", "test"):
        (data / "qrels" / f"{split}.tsv").write_bytes((TINY_BEIR / "qrels" / "test.tsv").read_bytes())
    lines = (TINY_BEIR / "corpus.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a truncated JSON line, line 3 of the file
    (data / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert cli.main(["run", "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    line = _stderr_lines(capsys)[-1]
    assert f"{data / 'corpus.jsonl'}:3: [json] not a JSON object" in line, line
    assert "fix that line" in line


# ------------------------------------------------------------------------------------------------
# Errors inside Ray: unwrapped and classified like local ones
# ------------------------------------------------------------------------------------------------
def test_user_error_inside_a_ray_task_exits_2(ray_local, capsys):
    import ray

    def _ingest_error_in_task():  # nested: pickled by value (the test module is not importable in workers)
        from raymine.ingest import IngestError

        raise IngestError("s3://bucket/corpus.jsonl", 7, "json", "not a JSON object")

    task = ray.remote(num_cpus=0.1)(_ingest_error_in_task)
    code = cli.guard(lambda: ray.get(task.remote()))
    assert code == 2
    line = _one_line(capsys)
    assert line.startswith("error: s3://bucket/corpus.jsonl:7: [json] not a JSON object"), line
    assert "RayTaskError" not in line


def test_user_error_inside_a_ray_actor_exits_2(ray_local, capsys):
    import ray

    @ray.remote(num_cpus=0.1)
    class Failing:
        def run(self):
            raise UserError("stage search: shard 3 has no vectors", hint="re-run the embed stage")

    actor = Failing.remote()
    assert cli.guard(lambda: ray.get(actor.run.remote())) == 2
    assert _one_line(capsys) == "error: stage search: shard 3 has no vectors — re-run the embed stage"
    ray.kill(actor)


def test_bug_inside_a_ray_task_exits_1_with_traceback_and_where(ray_local, capsys):
    import ray

    def _bug_in_task():
        return {}["missing"]

    task = ray.remote(num_cpus=0.1)(_bug_in_task)
    assert cli.guard(lambda: ray.get(task.remote())) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("failed: KeyError at "), last
    assert "_bug_in_task" in last and "in Ray" in last and "'missing'" in last


def test_local_bug_exits_1_and_names_the_stage(capsys):
    from raymine.errors import in_stage

    def boom():
        with in_stage("mine"):
            raise ZeroDivisionError("division by zero")

    assert cli.guard(boom) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("failed: ZeroDivisionError at ") and "(boom)" in last and "during stage mine" in last


def test_user_error_tagged_with_its_stage(capsys):
    from raymine.errors import in_stage

    def fail():
        with in_stage("train"):
            raise UserError("no mined rows: all 12 queries dropped (no_negatives_left=12)")

    assert cli.guard(fail) == 2
    assert _one_line(capsys) == "error: stage train: no mined rows: all 12 queries dropped (no_negatives_left=12)"


def test_traceback_of_user_errors_is_logged_at_debug_only(caplog, capsys):
    import logging

    def fail():
        raise UserError("bad thing")

    with caplog.at_level(logging.DEBUG, logger="raymine"):
        assert cli.guard(fail) == 2
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="raymine"):
        caplog.clear()
        assert cli.guard(fail) == 2
    assert not caplog.records


# ------------------------------------------------------------------------------------------------
# The two entry points agree; the job script works without an install
# ------------------------------------------------------------------------------------------------
def test_cli_stage_list_is_the_pipelines():
    from raymine.pipeline import STAGES

    assert cli.STAGES == STAGES


def test_default_config_is_the_shipped_one():
    assert cli.default_config() == ROOT / "configs" / "scifact_minilm.yaml"


def test_job_script_process_exit_code_and_single_line(tmp_path):
    # a fresh interpreter from another folder, like `ray job submit --working-dir .` (no install needed)
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "mine_and_train.py"), "mine.sample_top_k=2",
                        "mine.sampling=sampled"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines == ["error: mine.sample_top_k: 2 must be >= mine.num_negatives (4) with mine.sampling='sampled' "
                     "— fix that key in the config file or its key=value override"], lines
    h = subprocess.run([sys.executable, str(ROOT / "jobs" / "mine_and_train.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--stages" in h.stdout and "--data" in h.stdout


def test_console_script_help():
    """`raymine run --help` is written for users: what run does, the stages, overrides, Ray, examples."""
    p = subprocess.run([sys.executable, "-m", "raymine.cli", "run", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0 and "--config" in p.stdout
    assert p.stdout.count("\n") < 80
    assert "Mine hard negatives for your training queries" in p.stdout
    for stage in ("ingest", "embed", "search", "mine", "train", "evaluate"):
        assert re.search(rf"^  {stage} +\S", p.stdout, re.M), stage  # one line per stage
    for text in ("key=value", "raymine config show", "--address", "RAY_ADDRESS", "ray start --head", "examples:",
                 "ray job submit", "--config nv_retriever_v1_mistral7b", "exit status"):
        assert text in p.stdout, text
    assert "issue 14" not in p.stdout and "One rule for errors" not in p.stdout  # not the module's docstring


# ------------------------------------------------------------------------------------------------
# --config NAME, the default's data from the package, `raymine config show`
# ------------------------------------------------------------------------------------------------
def test_config_takes_a_shipped_name_or_a_path(tmp_path):
    shipped = ROOT / "configs"
    assert cli.resolve_config(None) == shipped / "scifact_minilm.yaml"
    assert cli.resolve_config("nv_retriever_v1_mistral7b") == shipped / "nv_retriever_v1_mistral7b.yaml"
    assert cli.resolve_config("scifact_minilm.yaml") == shipped / "scifact_minilm.yaml"
    own = tmp_path / "scifact_minilm.yaml"  # a file of the user's wins over a shipped name
    own.write_text("mine:\n  perc: 0.9\n")
    assert cli.resolve_config(str(own)) == own
    assert set(cli.shipped_configs()) == {p.stem for p in shipped.glob("*.yaml")}


def test_unknown_config_name_lists_the_shipped_ones(capsys):
    assert cli.main(["run", "--config", "scifact_mini"]) == 2
    line = _one_line(capsys)
    names = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
    assert line == f"error: --config: 'scifact_mini' is neither a file nor a shipped config — shipped: {names}", line


def test_shipped_default_data_found_from_another_folder(tmp_path, monkeypatch):
    """data/scifact of the shipped default resolves against the shipped copy when the working dir lacks it;
    a user's config, --data and an ingest.data override keep their path as written."""
    monkeypatch.chdir(tmp_path)
    cfg = cli.load_cli_config(None, [])
    assert cfg.ingest.data == str(ROOT / "data" / "scifact")
    assert cli.load_cli_config("nv_retriever_v1_mistral7b", []).ingest.data == str(ROOT / "data" / "scifact")
    assert cli.load_cli_config(None, [], data="data/scifact").ingest.data == "data/scifact"
    assert cli.load_cli_config(None, ["ingest.data=data/scifact"]).ingest.data == "data/scifact"
    own = tmp_path / "own.yaml"
    own.write_text("ingest:\n  data: data/scifact\n")
    assert cli.load_cli_config(str(own), []).ingest.data == "data/scifact"
    (tmp_path / "data" / "scifact").mkdir(parents=True)  # found from the working dir: kept relative
    assert cli.load_cli_config(None, []).ingest.data == "data/scifact"


def test_config_show_lists_every_key_with_value_default_and_help(capsys):
    from raymine.config import Config, TeacherConfig, describe

    assert cli.main(["config", "show", "--config", "scifact_minilm", "mine.perc=0.9", "teachers=bm25"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# {ROOT / 'configs' / 'scifact_minilm.yaml'} + mine.perc=0.9 teachers=bm25"
    rows = {line.split()[0]: line for line in out[2:]}
    keys = {k for k, _, _ in describe(Config) if k != "teacher_defs"}
    keys |= {f"teacher_defs.{t}.{k}" for t in ("minilm", "bm25") for k, _, _ in describe(TeacherConfig)}
    assert set(rows) == keys
    assert re.fullmatch(r"mine\.perc +0\.9 +0\.95 +'percpos': keep .*", rows["mine.perc"]), rows["mine.perc"]
    assert re.fullmatch(r'teachers +\["bm25"\] +\["minilm", "bm25"\] +teachers used .*', rows["teachers"])
    assert re.fullmatch(r'teacher_defs\.bm25\.kind +"bm25" +"dense" +.*', rows["teacher_defs.bm25.kind"])


def test_config_show_bad_override_is_one_line(capsys):
    assert cli.main(["config", "show", "mine.nosuch=1"]) == 2
    assert "unknown config key 'mine.nosuch'" in _one_line(capsys)


def test_address_flag_reaches_init_ray(monkeypatch, tmp_path):
    """`--address` is parsed by both entry points and handed to init_ray (which attaches like ray.init())."""
    seen = {}

    def fake_init(address=None, **_):
        seen["address"] = address
        raise UserError("stop here")

    monkeypatch.setattr("raymine.raycluster.init_ray", fake_init)
    monkeypatch.setattr("ray.is_initialized", lambda: False)  # as in a fresh process, whatever this one holds
    assert cli.main(["run", "--address", "10.0.0.1:6379", "--output", str(tmp_path / "o")]) == 2
    assert seen == {"address": "10.0.0.1:6379"}
    assert cli.main(["run", "--output", str(tmp_path / "o")]) == 2
    assert seen == {"address": None}


@pytest.mark.parametrize("argv", [[], ["configs"]])
def test_top_level_commands(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr().out
    if argv:
        assert code == 0 and "scifact_minilm.yaml" in out
    else:
        assert code == 2 and "run" in out


def test_local_ray_starts_without_the_auth_notice_and_keeps_auth(tmp_path):
    """init_ray states Ray's default (token auth) for a local instance it starts: no notice, auth still on."""
    import os
    import shutil
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    temp_dir = tempfile.mkdtemp(prefix="rmauth", dir="/tmp")  # short: Ray's socket paths have a length limit
    code = ("import ray\nfrom raymine.raycluster import init_ray, shutdown_ray\n"
            f"init_ray(address='local', num_cpus=1, _temp_dir={temp_dir!r})\n"
            "print('task', ray.get(ray.remote(lambda: 1).remote()))\nshutdown_ray()\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "task 1" in p.stdout
    assert "Token authentication" not in p.stderr + p.stdout, p.stderr
    assert (tmp_path / ".ray" / "auth_token").is_file()


def test_user_error_inside_ray_data_map_batches_exits_2(ray_local, capsys):
    import ray

    def udf(batch):
        from raymine.errors import UserError

        raise UserError("embed: text of doc 'd7' is empty", hint="set ingest.on_empty_text=skip")

    ds = ray.data.range(8).map_batches(udf, batch_size=4)
    assert cli.guard(lambda: ds.materialize()) == 2
    line = _stderr_lines(capsys)[-1]
    assert line == "error: embed: text of doc 'd7' is empty — set ingest.on_empty_text=skip", line


def test_user_error_inside_a_ray_train_worker_is_unwrapped(capsys):
    """Ray Train V2's real wrappers (WorkerGroupError → UserExceptionWithTraceback → the worker's error)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from raymine.config import ConfigError

    inner = ConfigError("train.model: /models/mistral does not exist on node 10.0.0.3")
    err = WorkerGroupError("Training failed due to worker errors", {1: UserExceptionWithTraceback(inner, "tb")})

    def fail():
        raise err

    assert cli.guard(fail) == 2
    assert _one_line(capsys).startswith("error: train.model: /models/mistral does not exist on node 10.0.0.3")
