"""One exception hierarchy for mpt-export.

Every message says what was expected, what was found and what to do. The CLI turns any ``MptExportError`` into one
red line and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MptExportError(Exception):
    """Base class of every error the toolkit raises on purpose."""


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
    """Runtime inputs (ids, masks, tasks) have the wrong shape, dtype or content."""


class NumericsError(MptExportError):
    """The model produced NaN or Inf where numbers were expected (a broken bundle or task)."""


class ValidationError(MptExportError):
    """Exported graphs disagree with PEFT beyond tolerance. ``report`` holds the per-output numbers."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class GenerationError(MptExportError):
    """A graph call failed for one request (retried alone, it still failed); the other requests are unaffected."""
