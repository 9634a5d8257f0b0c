"""SATConfig validation and model-shape errors: one clear message naming value and fix."""

import pytest

from megatron_sat.config import SATConfig
from megatron_sat.model import LlamaShape


def test_defaults_match_spec():
    c = SATConfig()
    assert (c.metric, c.selection, c.schedule) == ("maxip", "sampling", "ladder")
    assert c.attn_omission_rate == c.mlp_omission_rate == 0.5
    assert c.dp_consistent is True
    assert c.temperature == 0.5  # measured: docs/SAT_SPEC_ADDENDUM.md


@pytest.mark.parametrize("kwargs, needle", [
    ({"attn_omission_rate": 1.5}, "attn_omission_rate=1.5 must be in [0, 1)"),
    ({"mlp_omission_rate": -0.1}, "mlp_omission_rate=-0.1 must be in [0, 1)"),
    ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
    ({"temperature": -2}, "temperature=-2 must be > 0"),
    ({"metric": "l1"}, "metric='l1' is not one of uniform, magnitude, wanda, maxip"),
    ({"selection": "greedy"}, "selection='greedy' is not one of topk, sampling"),
    ({"decay_start": 50, "total_iters": 10}, "decay_start=50 must be <= total_iters=10"),
    ({"ladder_rungs": 0}, "ladder_rungs=0 must be >= 1"),
])
def test_invalid_values_are_named(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SATConfig(**kwargs)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_all_problems_in_one_error():
    with pytest.raises(ValueError) as err:
        SATConfig(attn_omission_rate=1.5, temperature=0, metric="x")
    msg = str(err.value)
    assert "attn_omission_rate" in msg and "temperature" in msg and "metric" in msg


def test_tp_not_dividing_heads_or_groups():
    shape = LlamaShape(2, 96, 264, 6, 3)
    with pytest.raises(ValueError, match="tensor-model-parallel-size 4 does not divide "
                                         "num_attention_heads=6, num_query_groups=3"):
        shape.check_tp(4)
    shape.check_tp(3)


def test_shape_errors():
    with pytest.raises(ValueError, match="not divisible by num_query_groups=3"):
        LlamaShape(2, 128, 256, 4, 3)


def test_padded_vocab():
    assert LlamaShape(2, 128, 256, 4, 4, vocab_size=32000).padded_vocab_size(4) == 32256
    assert LlamaShape(2, 128, 256, 4, 4, vocab_size=32000).padded_vocab_size(1) == 32000
