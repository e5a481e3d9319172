"""Architecture adapters, registered by Hugging Face ``model_type``."""

from . import llama, gpt2, decoders, others, t5  # noqa: F401, I001  (registration, in the order the docs list them)
from .base import FEATURES, Arch, CausalArch, GenericCausal, arch_for, listed_archs, supported_model_types, window_of

__all__ = ["FEATURES", "Arch", "CausalArch", "GenericCausal", "arch_for", "listed_archs", "supported_model_types",
           "window_of"]
