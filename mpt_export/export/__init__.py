"""torch -> ONNX export and validation against PEFT. Importing this package imports no torch; the functions do."""

from .api import export_bundle, verify_bundle

__all__ = ["export_bundle", "verify_bundle"]
