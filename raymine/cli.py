"""The command line: ``raymine run [--config FILE] [--data D] [--output O] [--stages S] [key=value ...]``.

One entry point shared by the console script (``raymine``, from ``pip install raymine``) and the job
script ``jobs/mine_and_train.py`` (what ``ray job submit --working-dir .`` runs without an install).

One rule for errors (issue 14):

- input, config or environment the job cannot use (:class:`raymine.errors.UserError`, and by type
  ``ConfigError``, ``IngestError``, ``PipelineError``, ``EvaluationError``), raised here or inside a Ray
  task, actor or training worker → exit code 2 and ONE line on stderr naming the culprit (file:line, key,
  stage) and what to do; the traceback goes to the log at DEBUG only (``RAYMINE_LOG=DEBUG`` or
  ``--log-level DEBUG`` shows it);
- anything else (a bug, an out-of-memory kill, a lost node) → exit code 1, its traceback, and a line
  saying what died where.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raymine.errors import UserError, causes, quiet_ray_user_errors

log = logging.getLogger("raymine")

STAGES = ("embed", "search", "mine", "train", "evaluate")  # = raymine.pipeline.STAGES (checked by a test)
DEFAULT_CONFIG_NAME = "scifact_minilm.yaml"
EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2

# Error types that are the user's to fix, matched by qualified name so that this module imports nothing
# heavy and Ray's dynamic ``as_instanceof_cause`` subclasses match too.
USER_ERROR_TYPES = {
    "raymine.errors.UserError": "",
    "raymine.config.ConfigError": "fix that key in the config file or its key=value override",
    "raymine.ingest.IngestError": "",  # each carries the hint of its rule (a missing folder is no bad line)
    "raymine.pipeline.PipelineError": "",
    "raymine.evaluate.EvaluationError": "check evaluate.tasks and the data folder",
}


class UsageError(UserError):
    """Bad command-line flags (argparse), reported as one line like every user error."""

    hint = "see `raymine run --help`"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit 2
        raise UsageError(f"{self.prog}: {message}")


def default_config() -> Path:
    """The shipped default config: the package data ``raymine.configs`` when installed, else ``<repo>/configs``."""
    repo = Path(__file__).resolve().parents[1] / "configs" / DEFAULT_CONFIG_NAME
    if repo.is_file():  # a checkout or a working dir submitted with `ray job submit`
        return repo
    try:
        from importlib.resources import files

        packaged = files("raymine.configs") / DEFAULT_CONFIG_NAME
        if packaged.is_file():
            return Path(str(packaged))
    except (ModuleNotFoundError, TypeError):
        pass
    return repo


def shipped_configs() -> dict[str, Path]:
    """The shipped configs by name (file stem): what ``--config NAME`` accepts."""
    return {p.stem: p for p in sorted(default_config().parent.glob("*.yaml"))}


def resolve_config(arg: str | None) -> Path:
    """``--config``: a YAML file, else the name of a shipped config (``scifact_minilm``); none → the default."""
    if not arg:
        return default_config()
    path = Path(arg)
    if path.is_file():
        return path
    shipped = shipped_configs()
    names = ", ".join(shipped)
    if "/" not in arg and path.stem in shipped and path.suffix in ("", ".yaml"):
        return shipped[path.stem]
    if "/" in arg or arg.endswith((".yaml", ".yml")):
        raise UserError(f"--config: {arg} does not exist", hint=f"give a YAML file or a shipped config's name: {names}")
    raise UserError(f"--config: {arg!r} is neither a file nor a shipped config", hint=f"shipped: {names}")


def _shipped_data(cfg: Any, config: Path) -> Any:
    """A shipped config's relative ``ingest.data`` that is not found from the working dir: the copy shipped
    with raymine. Shipped configs and data sit side by side (``configs/`` + ``data/`` in a checkout,
    ``raymine/configs`` + ``raymine/data`` when installed), so the path resolves against the folder above."""
    from dataclasses import replace

    data = cfg.ingest.data
    if config.resolve().parent != default_config().parent.resolve():
        return cfg  # a user's config: relative paths mean the working dir, as written
    if "://" in data or Path(data).is_absolute() or Path(data).exists():
        return cfg
    packaged = config.resolve().parent.parent / data
    if not packaged.exists():
        return cfg
    log.info("ingest.data %s: not in the working dir; using the copy shipped with raymine (%s)", data, packaged)
    return replace(cfg, ingest=replace(cfg.ingest, data=str(packaged)))


def load_cli_config(config: str | None, overrides: list[str], data: str | None = None, output: str | None = None):
    """The run's config as ``raymine run`` and ``raymine config show`` see it (flags become overrides)."""
    from raymine.config import load_config

    path = resolve_config(config)
    overrides = list(overrides)
    if data:
        overrides.append(f"ingest.data={data}")
    if output:
        overrides.append(f"output={output}")
    cfg = load_config(path, overrides)
    if any(o.split("=", 1)[0].strip() == "ingest.data" for o in overrides):
        return cfg
    return _shipped_data(cfg, path)


RUN_DESCRIPTION = """\
Mine hard negatives for your training queries, fine-tune a retriever on them and evaluate it, on Ray.

Stages, in order; each writes Parquet and a manifest under --output, and a re-run skips the finished
stages and resumes an interrupted one per part:
  ingest    read corpus, queries and qrels (BEIR folder, plain or .gz, or Parquet tables); always first
  embed     encode queries and passages with every teacher (Hugging Face models, BM25)
  search    top-k candidates per teacher from a sharded index (exact by default)
  mine      positive-aware filtering (naive, shifted, abs, marginpos, percpos), sampling, teacher
            ensembling; exports for sentence-transformers and FlagEmbedding
  train     contrastive fine-tuning of the student (Ray Train)
  evaluate  nDCG@10 of the student before and after training, on the test split
--stages runs every stage up to the last one named: `--stages mine` = ingest, embed, search, mine."""

RUN_EPILOG = """\
configuration:
  --config takes a shipped config's name (`raymine configs` lists them) or your YAML file; without it,
  the demo scifact_minilm runs (SciFact, shipped with raymine; MiniLM + BM25 teachers; CPU).
  key=value overrides any key: mine.method=marginpos mine.margin=0.05 teachers=bm25 search.num_shards=4.
  `raymine config show [--config X] [key=value ...]` lists every key with its value, default and help.

Ray:
  --address, else RAY_ADDRESS, else a head started with `ray start --head` on this machine; with none
  of them a private local Ray is started (`--address local` always starts one).

examples:
  raymine run                                          # the demo, start to finish
  raymine run --stages mine --data my_beir/ --output runs/mine1 teachers=bm25
  raymine run --config nv_retriever_v1_mistral7b --data s3://bucket/beir --output s3://bucket/runs/r1
  ray job submit --working-dir . -- python jobs/mine_and_train.py --config my.yaml

exit status: 0 done; 2 the input, config or flags need fixing (one line says what); 1 a bug or a
resource failure (its traceback is printed); a re-run of the same command resumes."""


def build_parser(prog: str = "raymine") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Positive-aware hard-negative mining and retriever training on Ray.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser("run", help="mine, train and evaluate (the job of jobs/mine_and_train.py)",
                       description=RUN_DESCRIPTION, epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(r)
    sub.add_parser("configs", help="list the shipped configs")
    c = sub.add_parser("config", help="inspect a config: `raymine config show`")
    show = c.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True).add_parser(
        "show", help="every key with its value, default and help",
        description="Every config key of the run with its value (after --config and overrides), its default "
                    "and its help.")
    show.add_argument("--config", default=None, help="shipped config name or YAML file (default: scifact_minilm)")
    show.add_argument("overrides", nargs="*", help="key=value overrides, as for `raymine run`")
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``raymine run`` and ``jobs/mine_and_train.py`` (one definition)."""
    p.add_argument("--config", default=None, metavar="NAME|FILE",
                   help="a shipped config's name (scifact_minilm, nv_retriever_v1_mistral7b, ...) or a YAML file "
                        "(default: scifact_minilm, the embedded SciFact run)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to attach to (host:port, ray://host:10001, auto) or 'local' for a new private "
                        "instance (default: $RAY_ADDRESS, else a head started on this machine, else local)")
    p.add_argument("--data", metavar="PATH", help="BEIR folder or Parquet tables (overrides ingest.data)")
    p.add_argument("--output", metavar="PATH", help="output folder or URI (overrides output)")
    p.add_argument("--stages", default=",".join(STAGES), metavar="S,...",
                   help=f"comma list out of {','.join(STAGES)}; runs ingest and every stage up to the last one "
                        "named (default: all)")
    p.add_argument("--log-level", metavar="LEVEL", default=os.environ.get("RAYMINE_LOG", "INFO"),
                   help="DEBUG shows the traceback of user errors too (default: $RAYMINE_LOG or INFO)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. mine.method=naive search.num_shards=4")


# ------------------------------------------------------------------------------------------------
# The error rule
# ------------------------------------------------------------------------------------------------
_causes = causes  # ``exc`` and everything it wraps (Ray's cause, Train's worker failures, __cause__/__context__)


def _is_user_error(e: BaseException) -> bool:
    return _is_user_error_type(type(e))


def _hint(e: BaseException) -> str:
    if getattr(e, "hint", ""):
        return e.hint  # type: ignore[attr-defined]
    for c in type(e).__mro__:
        h = USER_ERROR_TYPES.get(f"{c.__module__}.{c.__qualname__}")
        if h:
            return h
    return ""


def find_user_error(exc: BaseException) -> BaseException | None:
    """The user error ``exc`` is or wraps (unwrapped from Ray's exceptions), else None."""
    for e in _causes(exc):
        if _is_user_error(e) and not _is_ray_wrapper(e):
            return e
    for e in _causes(exc):  # a Ray wrapper that is also an instance of the cause (as_instanceof_cause)
        if _is_user_error(e):
            return e
    for e in _causes(exc):  # Ray Data re-raises a UDF's error as UserCodeException: only its text survives
        found = _user_error_in_text(str(e))
        if found is not None:
            return found
    return None


class RemoteUserError(UserError):
    """A user error known only from a remote traceback's text (its type named in ``remote_type``)."""


_EXC_LINE = re.compile(r"^(raymine\.[\w.]+): (.+)$", re.M)


def _user_error_in_text(text: str) -> UserError | None:
    """The last ``raymine.<module>.<UserErrorType>: message`` line of a remote traceback, as a UserError."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    for qualname, message in reversed(_EXC_LINE.findall(text)):
        if qualname in USER_ERROR_TYPES or _names_user_error(qualname):
            err = RemoteUserError(message.strip(), hint=USER_ERROR_TYPES.get(qualname, ""))
            err.remote_type = qualname  # type: ignore[attr-defined]
            return err
    return None


def _names_user_error(qualname: str) -> bool:
    module, _, name = qualname.rpartition(".")
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod else None
    return isinstance(cls, type) and issubclass(cls, BaseException) and _is_user_error_type(cls)


def _is_user_error_type(cls: type) -> bool:
    return issubclass(cls, UserError) or any(f"{c.__module__}.{c.__qualname__}" in USER_ERROR_TYPES for c in cls.__mro__)


def _is_ray_wrapper(e: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(e).__mro__[1:]) and hasattr(e, "cause")


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def user_error_line(e: BaseException) -> str:
    """The one line printed for a user error: what is wrong (culprit included), then what to do."""
    msg = str(e)
    if _is_ray_wrapper(e):  # as_instanceof_cause: str() is Ray's whole report; the cause's own message
        msg = str(getattr(e, "cause", e))
    stage = getattr(e, "raymine_stage", None)
    if stage and f"{stage}:" not in msg and f"stage {stage}" not in msg:
        msg = f"stage {stage}: {msg}"
    hint = _hint(e)
    if hint and hint not in msg:
        msg = f"{msg} — {hint}"
    return _one_line(f"error: {msg}")


def _where(exc: BaseException) -> str:
    """'ExcType in file:line (function)' of the innermost frame, and Ray's task/actor and node when remote."""
    inner = exc
    for e in _causes(exc):
        inner = e
        if not (e.__cause__ or e.__context__ or getattr(e, "cause", None)):
            break
    frames = traceback.extract_tb(inner.__traceback__) if inner.__traceback__ else []
    at = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    name, message, remote = type(inner).__name__, str(inner), ""
    for e in _causes(exc):  # Ray's report: "ray::fn() (pid=1, ip=10.0.0.1)" + the remote traceback
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours the task name
        m = re.search(r"ray::(\S+?)\(\)\s*\(pid=(\d+), ip=([\w.:]+)", text)  # Ray Data: MapBatches(f)->Write
        if m:
            remote = f" in Ray task/actor {m.group(1)} (pid {m.group(2)}, node {m.group(3)})"
            root = _REMOTE_ROOT.search(text, m.end())
            if root and type(inner).__module__.startswith("ray."):  # Ray's wrapper (UserCodeException): its root
                name, message, text = root.group(1).rpartition(".")[2], root.group(2), text[: root.start()]
                at = ""
            files = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
            if files and not at:
                at = f" at {files[-1][0]}:{files[-1][1]} ({files[-1][2]})"
            break
    stage = next((e.raymine_stage for e in _causes(exc) if getattr(e, "raymine_stage", None)), None)
    where = f" during stage {stage}" if stage else ""
    return f"{name}{at}{remote}{where}: {_one_line(message, 300)}"


# the first exception line of a remote traceback's text ("ZeroDivisionError: division by zero"): its root cause
_REMOTE_ROOT = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.M)


def guard(fn: Callable[[], Any]) -> int:
    """Run ``fn`` under the error rule; return the exit code (0, 1 or 2)."""
    quiet_ray_user_errors()  # Ray logs a failed task's traceback itself: not for a user error
    try:
        fn()
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the rule: classify every failure
        user = find_user_error(exc)
        if user is not None:
            log.debug("user error, traceback:", exc_info=exc)
            print(user_error_line(user), file=sys.stderr, flush=True)
            return EXIT_USER
        traceback.print_exception(exc, file=sys.stderr)
        print(f"failed: {_where(exc)} — a bug or a resource failure (out of memory, lost node); the traceback "
              "is above; re-running the same command resumes from the last finished stage", file=sys.stderr,
              flush=True)
        return EXIT_BUG
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    level = str(level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise UsageError(f"--log-level / RAYMINE_LOG: {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"--stages: unknown stage(s) {unknown or [text]}", hint=f"choose from {','.join(STAGES)}")
    return stages


def run_command(args: argparse.Namespace) -> None:
    """Load and validate the config, then run the pipeline on Ray (started locally unless a cluster is set)."""
    stages = parse_stages(args.stages)
    cfg = load_cli_config(args.config, args.overrides, data=args.data, output=args.output)

    import ray

    from raymine.pipeline import run_pipeline
    from raymine.raycluster import init_ray, shutdown_ray

    owned = not ray.is_initialized()
    init_ray(args.address)
    try:
        report = run_pipeline(cfg, stages)
    finally:
        if owned:
            shutdown_ray()
    md = Path(cfg.output, "report.md")
    print(md.read_text() if "://" not in cfg.output and md.is_file() else report)


def config_table(cfg: Any) -> str:
    """Every key of ``cfg`` (teacher_defs expanded per teacher) with its value, default and help."""
    import json

    from raymine.config import Config, TeacherConfig, describe, to_dict

    rows = []
    for row in describe(Config):  # the dataclasses' order: sections as in the YAML files
        if row[0] != "teacher_defs":
            rows.append(row)
            continue
        for name in cfg.teacher_defs:  # a teacher's field left out of the YAML takes TeacherConfig's default
            rows += describe(TeacherConfig, f"teacher_defs.{name}.")
    values = to_dict(cfg)

    def value(key: str) -> str:
        node = values
        for part in key.split("."):
            node = node[part]
        return json.dumps(node, default=str)

    table = [("KEY", "VALUE", "DEFAULT", "HELP")] + [(k, value(k), d, h) for k, d, h in rows]
    w = [min(max(len(r[i]) for r in table), cap) for i, cap in enumerate((48, 40, 40))]
    return "\n".join(f"{k:<{w[0]}}  {v:<{w[1]}}  {d:<{w[2]}}  {h}".rstrip() for k, v, d, h in table)


def config_show_command(args: argparse.Namespace) -> None:
    cfg = load_cli_config(args.config, args.overrides)
    print(f"# {resolve_config(args.config)}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""))
    print(config_table(cfg))


def main(argv: list[str] | None = None, prog: str = "raymine") -> int:
    """``raymine COMMAND ...``; returns the exit code (0 ok, 1 bug/resource failure, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    state: dict[str, Any] = {}

    def parse() -> None:
        state["args"] = build_parser(prog).parse_args(argv)

    try:
        code = guard(parse)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    if code:
        return code
    args = state["args"]
    if args.command is None:
        build_parser(prog).print_help()
        return EXIT_USER
    if args.command == "configs":
        for name, p in shipped_configs().items():
            print(f"{name:<40} {p}")
        return EXIT_OK
    if args.command == "config":
        return guard(lambda: config_show_command(args))
    code = guard(lambda: _setup_logging(args.log_level))
    return code or guard(lambda: run_command(args))


def job_main(argv: list[str] | None = None) -> int:
    """``jobs/mine_and_train.py``: ``raymine run`` with the same flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["run", *argv], prog="mine_and_train.py")


if __name__ == "__main__":
    sys.exit(main())
