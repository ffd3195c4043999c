"""The library's error types in one light module: callers (the pipeline's one error path) can catch them
without importing the heavy modules that raise them. Each is re-exported where it is raised."""

from __future__ import annotations


class BNConversionError(ValueError):
    """Raised when conversion cannot proceed; the model is left untouched."""


class DatasetFormatError(ValueError):
    """A dataset directory or in-memory set violates the format; the message names the file and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely or does not fit the architecture; the message says why."""


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""
