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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from raymine.errors import UserError

log = logging.getLogger("raymine")

STAGES = ("embed", "search", "mine", "train", "evaluate")  # = raymine.pipeline.STAGES (checked by a test)
DEFAULT_CONFIG_NAME = "scifact_minilm.yaml"
EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2

# Error types that are the user's to fix, matched by qualified name so that this module imports nothing
# heavy and Ray's dynamic ``as_instanceof_cause`` subclasses match too.
USER_ERROR_TYPES = {
    "raymine.errors.UserError": "",
    "raymine.config.ConfigError": "fix that key in the config file or its key=value override",
    "raymine.ingest.IngestError": "fix that line of the input (or set the matching ingest.on_* key where offered)",
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


def build_parser(prog: str = "raymine") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Positive-aware hard-negative mining and retriever training on Ray.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser("run", help="mine, train and evaluate (the job of jobs/mine_and_train.py)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(r)
    sub.add_parser("configs", help="list the shipped configs")
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``raymine run`` and ``jobs/mine_and_train.py`` (one definition)."""
    p.add_argument("--config", default=None,
                   help=f"YAML config (default: the shipped {DEFAULT_CONFIG_NAME}, the embedded SciFact run)")
    p.add_argument("--data", help="BEIR folder or Parquet tables (overrides ingest.data)")
    p.add_argument("--output", help="output folder or URI (overrides output)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)}")
    p.add_argument("--log-level", default=os.environ.get("RAYMINE_LOG", "INFO"),
                   help="DEBUG shows the traceback of user errors too (default: $RAYMINE_LOG or INFO)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. mine.method=naive search.num_shards=4")


# ------------------------------------------------------------------------------------------------
# The error rule
# ------------------------------------------------------------------------------------------------
def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: Ray's ``cause``, Train's worker failures, ``__cause__``/``__context__``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError / RayActorError
        if isinstance(cause, BaseException):
            todo.append(cause)
        failures = getattr(e, "worker_failures", None)  # ray.train WorkerGroupError (Train V2): rank -> error
        if isinstance(failures, dict):
            todo.extend(v for v in failures.values() if isinstance(v, BaseException))
        # Train V2 wraps a worker's exception in UserExceptionWithTraceback (private ``_base_exc``); a
        # controller failure is ``controller_failure``
        for attr in ("_base_exc", "controller_failure"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


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
    remote = ""
    for e in _causes(exc):  # Ray's report: "ray::fn() (pid=1, ip=10.0.0.1)" + the remote traceback
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours the task name
        m = re.search(r"ray::([\w.<>]+)\(\)\s*\(pid=(\d+), ip=([\w.:]+)", text)
        if m:
            remote = f" in Ray task/actor {m.group(1)} (pid {m.group(2)}, node {m.group(3)})"
            files = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
            if files and not at:
                at = f" at {files[-1][0]}:{files[-1][1]} ({files[-1][2]})"
            break
    stage = next((e.raymine_stage for e in _causes(exc) if getattr(e, "raymine_stage", None)), None)
    where = f" during stage {stage}" if stage else ""
    return f"{type(inner).__name__}{at}{remote}{where}: {_one_line(str(inner), 300)}"


def guard(fn: Callable[[], Any]) -> int:
    """Run ``fn`` under the error rule; return the exit code (0, 1 or 2)."""
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
    from raymine.config import load_config

    stages = parse_stages(args.stages)
    config = Path(args.config) if args.config else default_config()
    if not config.is_file():
        raise UserError(f"--config: {config} does not exist", hint="give a YAML file; `raymine configs` lists the shipped ones")
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"ingest.data={args.data}")
    if args.output:
        overrides.append(f"output={args.output}")
    cfg = load_config(config, overrides)

    import ray

    from raymine.pipeline import run_pipeline
    from raymine.raycluster import init_ray, shutdown_ray

    owned = not ray.is_initialized()
    init_ray()
    try:
        report = run_pipeline(cfg, stages)
    finally:
        if owned:
            shutdown_ray()
    md = Path(cfg.output, "report.md")
    print(md.read_text() if "://" not in cfg.output and md.is_file() else report)


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
        folder = default_config().parent
        for p in sorted(folder.glob("*.yaml")):
            print(p)
        return EXIT_OK
    code = guard(lambda: _setup_logging(args.log_level))
    return code or guard(lambda: run_command(args))


def job_main(argv: list[str] | None = None) -> int:
    """``jobs/mine_and_train.py``: ``raymine run`` with the same flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["run", *argv], prog="mine_and_train.py")


if __name__ == "__main__":
    sys.exit(main())
