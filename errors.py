"""The errors that describe a problem with what the user gave: a config, a folder, a damaged file.

`qdistill ...` prints any QdistillError as one line (`qdistill: error: ...`) and exits with 2; every other
exception is a bug in qdistill or a library and keeps its traceback. Each class still derives from the
builtin it replaced, so callers that caught ValueError or FileNotFoundError keep working.
"""


class QdistillError(Exception):
    """A user-facing error; the message names the config key, file, folder, shard or rank."""


class ConfigError(QdistillError, ValueError):
    """A config problem: unknown key, wrong type, a value its dataclass rejects, a missing config file."""


class ModelFolderError(QdistillError, ValueError):
    """The model folder is missing or is not a diffusers folder."""


class CalibrationSetError(QdistillError, ValueError):
    """A trajectory folder or one of its shards is missing, incomplete, damaged or from another model."""


class CheckpointError(QdistillError, ValueError):
    """A saved state (run checkpoint or quantized folder) is missing, truncated or does not fit."""


class ExportError(QdistillError, ValueError):
    """An export folder is missing, tampered with, truncated or does not fit its config."""


class DivergenceError(QdistillError, RuntimeError):
    """A non-finite loss or update: training of the block stopped; the last good checkpoint is kept."""


class BuildLockError(QdistillError, RuntimeError):
    """A lock left by a killed JIT build of DeepSpeed's ops: the next build would wait on it forever."""


class DatasetMissingError(QdistillError, FileNotFoundError):
    """A data set the bench needs is not installed."""
