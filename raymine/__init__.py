"""raymine: positive-aware hard-negative mining and retriever fine-tuning on Ray."""
__version__ = "0.1.0"
