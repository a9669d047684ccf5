"""Optional dependencies chosen at install time, imported with a message naming the extra.

FAISS is a choice, not a clash: ``faiss-cpu`` (extra ``cpu``) and ``faiss-gpu-cu12`` (extra ``gpu``) both
provide the module ``faiss``, so the core depends on neither and the user installs exactly one.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from raymine.errors import MissingDependencyError

log = logging.getLogger(__name__)

FAISS_HINT = (
    "install one FAISS build: `pip install 'raymine[cpu]'` (faiss-cpu) or, on CUDA 12 GPUs, "
    "`pip install 'raymine[gpu]'` (faiss-gpu-cu12) — not both, they provide the same `faiss` module; "
    "or set search.backend=torch to search without FAISS"
)


def import_faiss() -> ModuleType:
    """``import faiss``, or raise :class:`MissingDependencyError` (an ImportError) naming the extra."""
    try:
        return importlib.import_module("faiss")
    except ImportError as e:
        raise MissingDependencyError(f"the Python module 'faiss' is not installed ({e}); {FAISS_HINT}") from e


def faiss_has_gpu(faiss: ModuleType) -> bool:
    """Whether this FAISS build can use a GPU (faiss-gpu builds with at least one visible device)."""
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0)


# Weights a bi-encoder never uses: BERT-like poolers (we pool token states ourselves). Their absence
# (student saved without it) or surplus (loaded with add_pooling_layer=False) is not the user's concern.
UNUSED_WEIGHT_PREFIXES = ("pooler.",)


def from_pretrained_quiet(auto_cls: Any, path: str, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained(path, **kwargs)`` without transformers' load report for unused weights.

    The report (a multi-line table with 'MISSING' / 'UNEXPECTED') is silenced for this call only; keys that
    matter are logged here instead: weights missing from the checkpoint (newly initialised — a wrong path or
    architecture) as a warning naming them, surplus ones at debug.
    """
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(before)

    def relevant(keys: Any) -> list[str]:
        return sorted(k for k in (keys or ()) if not k.startswith(UNUSED_WEIGHT_PREFIXES))

    missing, unexpected = relevant(info.get("missing_keys")), relevant(info.get("unexpected_keys"))
    if missing:
        log.warning("%s: %d weight(s) not in the checkpoint were newly initialised (%s%s) — check the model path "
                    "and architecture", path, len(missing), ", ".join(missing[:5]), " …" if len(missing) > 5 else "")
    if unexpected:
        log.debug("%s: %d checkpoint weight(s) unused by %s: %s", path, len(unexpected), type(model).__name__,
                  ", ".join(unexpected[:5]))
    return model
