"""TensorRT: optimization profiles, trtexec command lines, CPU-side graph checks, engine identity (all pure Python,
tested anywhere), and engine building / running (``tensorrt`` imported lazily, only where it is installed)."""
