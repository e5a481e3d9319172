"""Architecture adapters, registered by Hugging Face ``model_type``."""

from . import gpt2, llama, t5  # noqa: F401  (registration)
from .base import Arch, CausalArch, arch_for, supported_model_types

__all__ = ["Arch", "CausalArch", "arch_for", "supported_model_types"]
