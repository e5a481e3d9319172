"""What the Triton modules (test_triton_repository.py, test_triton_generation.py) share: a model's config.pbtxt
parsed into Triton's own ModelConfig protobuf. Imported only by modules that checked for tritonclient first."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb


def parse(path: Path):
    cfg = pb.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg
