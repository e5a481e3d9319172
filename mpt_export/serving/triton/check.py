"""What Triton would refuse in a model repository, checked without Triton: each ``config.pbtxt`` parsed into
Triton's own ``ModelConfig`` protobuf (from ``tritonclient``), the rules Triton applies when it loads a model, the
files its backends look for, and — for graph models — agreement with the ONNX graph itself."""

from __future__ import annotations

from pathlib import Path

from ...errors import MissingDependencyError, TritonRepositoryError

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL",
                  8: "TYPE_STRING", 11: "TYPE_FP64"}


def parse_config(path: Path):
    """config.pbtxt -> Triton's own ``ModelConfig`` protobuf (from tritonclient). Errors name the file."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingDependencyError("checking a Triton config needs tritonclient: pip install 'mpt-export[triton]' "
                                     "grpcio") from None
    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(), cfg)
    except text_format.ParseError as e:
        raise TritonRepositoryError(f"{path} is not a valid Triton model config: {e}") from None
    return cfg


def _onnx_io(model_file: Path) -> dict:
    import onnx

    m = onnx.load(str(model_file), load_external_data=False)
    io = {}
    for side, values in (("input", m.graph.input), ("output", m.graph.output)):
        for v in values:
            t = v.type.tensor_type
            io[(side, v.name)] = (ONNX_TO_TRITON.get(t.elem_type, f"onnx type {t.elem_type}"), len(t.shape.dim),
                                  [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim])
    locations = set()
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {e.value for e in init.external_data if e.key == "location"}
    return {"io": io, "external": locations}


def check_model(model_dir: Path, graph_spec=None) -> list[str]:
    """What Triton would refuse in one model directory (its config rules, the files its backend loads), and, for a
    graph model, any difference from the graph itself. -> problems (empty: fine)."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.pbtxt"
    if not cfg_file.is_file():
        return [f"{model_dir.name}: no config.pbtxt"]
    try:
        cfg = parse_config(cfg_file)
    except TritonRepositoryError as e:
        return [str(e)]
    where = model_dir.name
    if cfg.name != model_dir.name:
        problems.append(f"{where}: config name {cfg.name!r} is not the directory's name")
    platform_backend = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
    if cfg.platform and platform_backend.get(cfg.platform, cfg.backend) != cfg.backend:
        problems.append(f"{where}: platform {cfg.platform!r} and backend {cfg.backend!r} disagree")
    default_file = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}.get(cfg.backend)
    if default_file is None:
        problems.append(f"{where}: unknown backend {cfg.backend!r}")
    if cfg.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size} < 0")
    versions = sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        problems.append(f"{where}: no numeric version directory")
    seen = set()
    for side, tensors in (("input", cfg.input), ("output", cfg.output)):
        if not tensors and cfg.backend != "python":
            problems.append(f"{where}: no {side}s")
        for t in tensors:
            if not t.name or t.name in seen:
                problems.append(f"{where}: {side} name {t.name!r} empty or repeated")
            seen.add(t.name)
            if t.data_type == pb.DataType.TYPE_INVALID:
                problems.append(f"{where}: {side} {t.name} has no data_type")
            if not t.dims and not t.HasField("reshape"):
                problems.append(f"{where}: {side} {t.name} has no dims")
            if any(d < -1 or d == 0 for d in t.dims):
                problems.append(f"{where}: {side} {t.name} dims {list(t.dims)}: each must be >= 1 or -1")
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size == 0:
            problems.append(f"{where}: dynamic_batching needs max_batch_size > 0")
        if cfg.dynamic_batching.default_queue_policy.max_queue_size <= 0:
            problems.append(f"{where}: dynamic_batching's queue is unbounded (default_queue_policy.max_queue_size)")
    for g in cfg.instance_group:
        if g.count < 1:
            problems.append(f"{where}: instance_group count {g.count} < 1")
        if cfg.backend == "tensorrt" and g.kind != pb.ModelInstanceGroup.Kind.KIND_GPU:
            problems.append(f"{where}: TensorRT plans run on KIND_GPU instances only")
        if g.profile and cfg.backend != "tensorrt":
            problems.append(f"{where}: optimization profiles apply to TensorRT plans only")
    if cfg.backend == "python" and not cfg.model_transaction_policy.decoupled:
        problems.append(f"{where}: the generation model streams several responses per request: it must be "
                        "decoupled (model_transaction_policy { decoupled: true })")
    for v in versions:
        path = model_dir / v / (cfg.default_model_filename or default_file or "")
        if not path.exists():
            problems.append(f"{where}: {v}/{path.name} is missing")
            continue
        if cfg.backend == "onnxruntime" and graph_spec is not None:
            onnx_file = path / "model.onnx" if path.is_dir() else path
            if not onnx_file.is_file():
                problems.append(f"{where}: {v}/{path.name}/ holds no model.onnx")
                continue
            info = _onnx_io(onnx_file)
            for loc in info["external"]:
                if not (onnx_file.parent / loc).is_file():
                    problems.append(f"{where}: external data {loc} is not beside {onnx_file.name}")
            problems += _compare_io(where, cfg, info["io"])
    if graph_spec is not None:
        want = {("input", s.name): s for s in graph_spec.inputs} | {("output", s.name): s for s in graph_spec.outputs}
        have = {("input", t.name): t for t in cfg.input} | {("output", t.name): t for t in cfg.output}
        for key in sorted(set(want) ^ set(have)):
            problems.append(f"{where}: {key[0]} {key[1]} is in {'the graph' if key in want else 'the config'} only")
    return problems


def _compare_io(where: str, cfg, io: dict) -> list[str]:
    """Config tensors against the ONNX graph's: names, types, ranks (the batch axis outside ``dims`` when
    ``max_batch_size > 0``), fixed sizes."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    batched = cfg.max_batch_size > 0
    have = {("input", t.name): t for t in cfg.input} | {("output", t.name): t for t in cfg.output}
    for key in sorted(set(io) ^ set(have)):
        problems.append(f"{where}: {key[0]} {key[1]} is in {'the ONNX graph' if key in io else 'config.pbtxt'} only")
    for key in sorted(set(io) & set(have)):
        dtype, rank, dims = io[key]
        t = have[key]
        tname = pb.DataType.Name(t.data_type)
        if tname != dtype:
            problems.append(f"{where}: {key[0]} {key[1]} is {tname} in config.pbtxt, {dtype} in the graph")
        if len(t.dims) + batched != rank:
            problems.append(f"{where}: {key[0]} {key[1]} has dims {list(t.dims)} (+ batch: {batched}) but rank "
                            f"{rank} in the graph" + ("; with max_batch_size > 0 dims must leave the batch axis out"
                                                      if len(t.dims) == rank else ""))
            continue
        gdims = dims[1:] if batched else dims
        if batched and dims[0] not in (-1, 0):
            problems.append(f"{where}: {key[0]} {key[1]}'s first axis is fixed ({dims[0]}): it cannot be batched")
        for c, g in zip(t.dims, gdims):
            if g > 0 and c != g:
                problems.append(f"{where}: {key[0]} {key[1]} dims {list(t.dims)} disagree with the graph's {gdims}")
                break
    return problems


def check_repository(root: Path, bundle=None, names: dict | None = None) -> list[str]:
    """Every model directory under ``root`` (see :func:`check_model`); with ``bundle`` and ``names`` (model name ->
    graph), graph models are compared with the bundle's graphs too. -> problems."""
    root = Path(root)
    problems = []
    graphs = bundle.info.graphs if bundle is not None else {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        problems += check_model(d, graphs.get((names or {}).get(d.name, d.name)))
    return problems
