"""Architecture adapters, registered by Hugging Face ``model_type``."""

from . import decoders, gpt2, llama, others, t5  # noqa: F401  (registration)
from .base import FEATURES, Arch, CausalArch, GenericCausal, arch_for, listed_archs, supported_model_types

__all__ = ["FEATURES", "Arch", "CausalArch", "GenericCausal", "arch_for", "listed_archs", "supported_model_types"]
