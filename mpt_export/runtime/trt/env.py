"""What the machine offers TensorRT: the ``tensorrt`` module (imported lazily) and the GPU's identity. Used by the
engine builder and by the TensorRT runtime backend alike, and importing nothing of the bundle."""

from __future__ import annotations

from ...errors import MissingDependencyError


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            "the tensorrt Python package is not installed here; install TensorRT for this GPU (pip install tensorrt "
            "from NVIDIA's index, or JetPack on Jetson), or print the equivalent trtexec commands with "
            "`mpt-export build BUNDLE --print-trtexec`"
        ) from None
    return trt


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of device 0, through torch or cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return prop.name.decode(errors="replace").rstrip("\0"), f"{prop.major}.{prop.minor}"
    except ImportError:
        pass
    raise MissingDependencyError("no CUDA GPU visible (through torch or cuda-python); TensorRT engines need one")
