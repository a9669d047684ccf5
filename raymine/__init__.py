"""raymine: positive-aware hard-negative mining and retriever fine-tuning on Ray.

The Python API (``raymine.api``): :func:`mine_hard_negatives` (sentence-transformers' call on raymine's
distributed stages), :func:`train`, :func:`evaluate`; :class:`Config` / :func:`load_config` build a run's
configuration in code.
"""
from raymine.api import MinedDataset, evaluate, mine_hard_negatives, train
from raymine.config import Config, TeacherConfig, load_config

__version__ = "0.1.0"
__all__ = ["Config", "MinedDataset", "TeacherConfig", "__version__", "evaluate", "load_config",
           "mine_hard_negatives", "train"]
