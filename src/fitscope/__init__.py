"""fitscope: a reproducible pipeline for studying overfitting and underfitting."""

__version__ = "0.1.0"
