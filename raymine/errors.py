"""The one base class for errors caused by the user's input, config or environment.

Rule (issue 14): a :class:`UserError` ends the job with exit code 2 and one line that names the culprit
(file:line, config key, stage) and what to do; anything else is a bug or a resource failure and keeps its
traceback (exit code 1). ``raymine.cli`` applies the rule; library code only raises.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class UserError(Exception):
    """Input, config or environment the job cannot use; ``str(e)`` is the one line shown to the user.

    ``hint`` (optional) says what to do; the CLI appends it when the message does not already say it.
    """

    hint: str = ""

    def __init__(self, message: str = "", *args: object, hint: str = "") -> None:
        super().__init__(message, *args)
        if hint:
            self.hint = hint

    def __str__(self) -> str:  # the hint travels inside the text too (Ray Data passes on only the text)
        text = super().__str__()
        return f"{text} — {self.hint}" if self.hint and self.hint not in text else text


class MissingDependencyError(UserError, ImportError):
    """An optional dependency (an extra such as ``raymine[cpu]``) is not installed."""


@contextlib.contextmanager
def in_stage(stage: str) -> Iterator[None]:
    """Tag any exception leaving the block with the stage it came from (``exc.raymine_stage``), unwrapped.

    The CLI names the stage in its one line (user errors) or its 'what died where' line (everything else).
    """
    try:
        yield
    except BaseException as e:
        if getattr(e, "raymine_stage", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                e.raymine_stage = stage  # type: ignore[attr-defined]
        raise


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: Ray's ``cause``, Train's worker failures, ``__cause__``/``__context__``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
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


# ------------------------------------------------------------------------------------------------
# Ray's own report of a failed task
# ------------------------------------------------------------------------------------------------
# Ray Data logs a failed task's exception itself, traceback included, before the driver sees it (the
# operator's "An exception was raised from a task ..." and the top-level "Full stack trace"); for a user
# error that is ~40 lines above raymine's one line. These are the loggers that write it (Ray 2.60); the
# filter is attached to them by name, before or after Ray imports them (a logger object is created once).
RAY_TASK_ERROR_LOGGERS = (
    "ray.data",
    "ray.data.exceptions",
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data._internal.execution.streaming_executor",
    "ray.data.dataset",
)


class _UserErrorRecords(logging.Filter):
    """Drops a log record about a user error (its exception, or an exception in its args, is or wraps a
    :class:`UserError`); everything else, bugs included, is logged as Ray logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = [record.exc_info[1]] if record.exc_info and record.exc_info[1] is not None else []
        found += [a for a in (record.args if isinstance(record.args, tuple) else ()) if isinstance(a, BaseException)]
        return not any(isinstance(c, UserError) for e in found for c in causes(e))


_FILTER = _UserErrorRecords()


def quiet_ray_user_errors() -> None:
    """Keep Ray from logging a user error's traceback (idempotent; call before or after importing Ray).

    Workers report bad input as data (see :mod:`raymine.ingest`), so this is the second line: any path that
    still raises a :class:`UserError` inside a Ray task ends in raymine's one line only. Bugs keep Ray's log."""
    for name in RAY_TASK_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
