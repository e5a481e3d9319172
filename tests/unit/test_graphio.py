"""The graph I/O names come from one template each: made, parsed and paired the same way everywhere."""

import pytest

from mpt_export.runtime.graphio import (CROSS, FUSED_PAST, FUSED_PRESENT, PAST, PRESENT, as_traced, is_past, kv_names,
                                        parse_kv, present_of)


def test_names_round_trip_through_their_templates():
    for template in (PAST, PRESENT, FUSED_PAST, FUSED_PRESENT, CROSS):
        names = kv_names(template, 12)
        assert len(names) == len(set(names)) == 24
        assert [parse_kv(n) for n in names] == [(template, i, k) for i in range(12) for k in ("key", "value")]
    assert kv_names(PAST, 2) == ["past_key_values.0.key", "past_key_values.0.value",
                                 "past_key_values.1.key", "past_key_values.1.value"]
    assert kv_names(FUSED_PAST, 1) == ["past_key.0", "past_value.0"]


def test_pairs_and_conversions():
    assert present_of("past_key_values.11.value") == "present.11.value"
    assert present_of("past_key.3") == "present_key.3"
    assert as_traced("present_value.7", PRESENT) == "present.7.value"
    assert as_traced("past_key.7") == "past_key_values.7.key"
    assert is_past("past_value.0") and is_past("past_key_values.0.key")
    assert not is_past("present.0.key") and not is_past("cross.0.key") and not is_past("position_ids")


@pytest.mark.parametrize("name", ["past_key_values.x.key", "past_key_values.1.query", "past_key_values.01.key",
                                  "present.1", "past_key.1.2", "logits", ""])
def test_anything_else_is_not_a_cache_name(name):
    assert parse_kv(name) is None
    with pytest.raises(ValueError, match="not a key/value cache name"):
        present_of(name)
