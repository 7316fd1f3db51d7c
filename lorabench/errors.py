"""Errors raised for bad input. Each message names the file, key or value and what is allowed."""


class LorabenchError(Exception):
    """Base class: bad input that stops a run before any training."""


class ConfigError(LorabenchError):
    """A configuration, matrix file or command-line option is invalid."""


class ThresholdError(LorabenchError):
    """thresholds.yaml is malformed."""


class ModelError(LorabenchError):
    """A --model cannot be found or is not a causal language model."""


class DatasetError(LorabenchError):
    """A --dataset is missing, empty or lacks the needed columns."""


class HistoryError(LorabenchError):
    """A stored run cannot be found or read."""


class StorageError(LorabenchError):
    """A directory a run writes to cannot take its outputs."""
