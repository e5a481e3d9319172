"""The graph I/O names of the contract, made from one template each (as ONNX Runtime GenAI's ``past_key_values.%d.key``):
the traced graphs' key/value cache, the fused graph's and the seq2seq decoder's cross-attention keys. The exporter
writes these names, the bundle checks them, the runtime and TensorRT's profiles feed them; nothing builds them by
string surgery."""

from __future__ import annotations

KINDS = ("key", "value")

# traced graphs (backbone, seq2seq decoder): the cache in and out, one pair per layer
PAST = "past_key_values.{layer}.{kind}"
PRESENT = "present.{layer}.{kind}"
# the fused graph: one buffer per layer and kind, bound to its input and output at once (updated in place)
FUSED_PAST = "past_{kind}.{layer}"
FUSED_PRESENT = "present_{kind}.{layer}"
# the seq2seq decoder's cross-attention keys/values (computed once from the encoder's output)
CROSS = "cross.{layer}.{kind}"

_PAIRS = {PAST: PRESENT, FUSED_PAST: FUSED_PRESENT}


def kv_names(template: str, layers: int) -> list[str]:
    """Every name of ``template`` for ``layers`` layers, in graph order (layer by layer, key before value)."""
    return [template.format(layer=i, kind=k) for i in range(layers) for k in KINDS]


def parse_kv(name: str) -> tuple[str, int, str] | None:
    """``name`` -> (its template, layer, kind), or None for a name no cache template makes."""
    for template in (PAST, PRESENT, FUSED_PAST, FUSED_PRESENT, CROSS):
        head, _, tail = template.partition("{")
        if not name.startswith(head):
            continue
        rest = name[len(head):]
        if template in (PAST, PRESENT, CROSS):  # "{layer}.{kind}"
            layer, _, kind = rest.partition(".")
        else:  # "{kind}.{layer}"
            kind, _, layer = rest.partition(".")
        if layer.isdigit() and kind in KINDS and template.format(layer=int(layer), kind=kind) == name:
            return template, int(layer), kind
    return None


def is_past(name: str) -> bool:
    """A cache input of a traced or fused graph."""
    parsed = parse_kv(name)
    return parsed is not None and parsed[0] in _PAIRS


def present_of(past: str) -> str:
    """The output a cache input's new keys/values come back as (``past_key_values.3.key`` -> ``present.3.key``;
    ``past_key.3`` -> ``present_key.3``)."""
    template, layer, kind = _parsed(past, _PAIRS)
    return _PAIRS[template].format(layer=layer, kind=kind)


def as_traced(name: str, template: str = PAST) -> str:
    """The traced graph's name (``template``: :data:`PAST` or :data:`PRESENT`) of any cache name's layer and kind."""
    _, layer, kind = _parsed(name, (PAST, PRESENT, FUSED_PAST, FUSED_PRESENT))
    return template.format(layer=layer, kind=kind)


def _parsed(name: str, templates) -> tuple[str, int, str]:
    parsed = parse_kv(name)
    if parsed is None or parsed[0] not in templates:
        raise ValueError(f"{name!r} is not a key/value cache name of the graph I/O contract")
    return parsed
