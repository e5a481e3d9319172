"""Architecture adapters, registered by Hugging Face ``model_type``."""

from . import gpt2, llama  # noqa: F401  (registration)
from .base import CausalArch, arch_for, supported_model_types

__all__ = ["CausalArch", "arch_for", "supported_model_types"]
