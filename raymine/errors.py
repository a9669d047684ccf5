"""The one base class for errors caused by the user's input, config or environment.

Rule (issue 14): a :class:`UserError` ends the job with exit code 2 and one line that names the culprit
(file:line, config key, stage) and what to do; anything else is a bug or a resource failure and keeps its
traceback (exit code 1). ``raymine.cli`` applies the rule; library code only raises.
"""
from __future__ import annotations

import contextlib
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
