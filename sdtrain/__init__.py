"""sdtrain: a distributed training launcher and job runner for PyTorch."""

__version__ = "0.1.0"
