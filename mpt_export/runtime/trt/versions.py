"""Which TensorRT a bundle's engines are meant for: the version a user names (``--trt-version 10.3``), the ONNX opsets
each release's parser reads, and the releases mpt-export targets.

The parser's opset range per release, from onnx-tensorrt's ``docs/operators.md`` on each release branch and NVIDIA's
opset guide: TensorRT 8.6 "up to Opset 17" (branch 8.6-GA); 10.0 (and the 10.1 branch) "opset 9 to opset 20"; 10.15
"opset 9 to opset 24"; 11.x "maximum opset 25" (TensorRT documentation, ONNX Opset Guide). Releases between two
known ones are held to the lower one (10.3, JetPack 6.1/6.2's, reads up to 20). JetPack 6.0 ships TensorRT 8.6,
JetPack 6.1 and 6.2 ship 10.3 (NVIDIA's JetPack release notes)."""

from __future__ import annotations

from ...errors import InputError

# (major, minor) -> the highest ONNX opset that release's parser reads
PARSER_MAX_OPSET = {(8, 6): 17, (10, 0): 20, (10, 15): 24, (11, 0): 25}
OLDEST = (10, 0)  # the oldest release mpt-export builds for (strongly typed networks, --profile groups, --noTF32)


def parse_trt_version(text) -> tuple[int, int]:
    """``"10"``, ``"10.3"``, ``"10.3.0.26"`` or an int -> (major, minor); one clear error otherwise."""
    parts = str(text).strip().split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise InputError(f"--trt-version must look like 10 or 10.3 (TensorRT's major.minor), got {text!r}") from None
    return major, minor


def check_target(version: tuple[int, int]) -> None:
    """Refuse releases mpt-export does not build for, naming what to do."""
    if version < OLDEST:
        jetpack = " (JetPack 6.0's)" if version[0] == 8 else ""
        raise InputError(f"TensorRT {version[0]}.{version[1]}{jetpack} is older than the {OLDEST[0]}.{OLDEST[1]} "
                         "mpt-export builds for (strongly typed networks, several profiles per engine); use TensorRT "
                         "10 or later (JetPack 6.1 or 6.2 ship 10.3), or run the bundle with ONNX Runtime")


def max_opset(version: tuple[int, int]) -> int:
    """The highest ONNX opset ``version``'s parser reads: the nearest known release at or below it."""
    known = [v for v in PARSER_MAX_OPSET if v <= version]
    return PARSER_MAX_OPSET[max(known)] if known else min(PARSER_MAX_OPSET.values())


def opset_problem(opset: int, version: tuple[int, int]) -> str | None:
    """What is wrong with a graph of ``opset`` for ``version``'s parser, or None."""
    top = max_opset(version)
    if opset > top:
        return (f"the graphs are opset {opset}; TensorRT {version[0]}.{version[1]}'s ONNX parser reads up to opset "
                f"{top}; export the bundle again with --opset {top}")
    return None
