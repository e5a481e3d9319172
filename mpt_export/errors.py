"""One exception hierarchy for mpt-export.

Every message says what was expected, what was found and what to do. The CLI turns any ``MptExportError`` into one
red line and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MptExportError(Exception):
    """Base class of every error the toolkit raises on purpose. ``param``: the field or option at fault, where one is
    (``"temperature"``, ``"max_new_tokens"``, ``"provider"``), else None — data, so no caller reads it off the
    message (the HTTP server's 400 names it)."""

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param


class CheckpointError(MptExportError):
    """A PEFT adapter directory is missing, corrupt, not MPT, or inconsistent with its config."""


class BaseModelError(MptExportError):
    """The base model directory is not a supported causal LM, or does not match the adapters or bundle."""


class TaskNameError(MptExportError):
    """A task name is invalid, duplicated or unknown."""


class BundleError(MptExportError):
    """A bundle is missing, incomplete, tampered with, or of an unknown format."""


class OutputExistsError(MptExportError):
    """The output path exists and ``force`` was not given."""


class ExportError(MptExportError):
    """torch -> ONNX conversion failed."""


class MissingDependencyError(MptExportError):
    """An optional dependency (export extra, TensorRT, ...) is not installed."""


class InputError(MptExportError):
    """Runtime inputs (ids, masks, tasks, sampling settings) have the wrong shape, dtype or content."""


class OptionError(InputError):
    """An option has a bad value: how a session opens (backend, provider, threads), an export (dtype, opset), a
    server (port, queue). ``param`` names the option."""


class NumericsError(MptExportError):
    """The model produced NaN or Inf where numbers were expected (a broken bundle or task)."""


class ValidationError(MptExportError):
    """Exported graphs disagree with PEFT beyond tolerance. ``report`` holds the per-output numbers."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class GenerationError(MptExportError):
    """A graph call failed for one request (retried alone, it still failed); the other requests are unaffected."""


class TrtRuntimeError(MptExportError):
    """TensorRT refused an execution (shape outside the engine, a failed launch)."""


class TrtCheckError(MptExportError):
    """A graph TensorRT's ONNX parser would refuse; ``problems`` lists every one found."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class EngineMismatchError(MptExportError):
    """An engine does not belong to this bundle, TensorRT version or GPU."""


class QueueFull(MptExportError):
    """The waiting queue is at ``max_queue``: try again later."""


class Draining(MptExportError):
    """The engine is shutting down and takes no new requests."""


class TritonRepositoryError(MptExportError):
    """A repository Triton would refuse (or one this bundle's engines cannot make)."""

