"""Optional dependencies chosen at install time, imported with a message naming the extra.

FAISS is a choice, not a clash: ``faiss-cpu`` (extra ``cpu``) and ``faiss-gpu-cu12`` (extra ``gpu``) both
provide the module ``faiss``, so the core depends on neither and the user installs exactly one.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from raymine.errors import MissingDependencyError

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
