"""Omission-rate schedules against hand-computed values (SAT_SPEC §5)."""

import math

import pytest

from megatron_sat.config import SATConfig
from megatron_sat.schedule import ladder_rung_ends, omission_rates, schedule_phase


def rates(cfg, t):
    return omission_rates(cfg, t)


def test_ladder_lengthening_boundaries():
    # t_s=10, t_end=110, D=100, N=4, w=1..4 (sum 10): ends 10+10, 10+30, 10+60, 10+100.
    c = SATConfig(attn_omission_rate=0.5, mlp_omission_rate=0.25, schedule="ladder",
                  decay_start=10, total_iters=110, ladder_rungs=4)
    assert ladder_rung_ends(c) == [20, 40, 70, 110]
    expected = {9: 1.0, 10: 0.75, 19: 0.75, 20: 0.5, 39: 0.5, 40: 0.25, 69: 0.25,
                70: 0.0, 109: 0.0, 0: 1.0}
    for t, m in expected.items():
        assert rates(c, t) == (0.5 * m, 0.25 * m), t


def test_ladder_equal_boundaries_with_rounding():
    # D=10, N=3 equal: ends 0+round(10/3)=3, round(20/3)=7, 10.
    c = SATConfig(schedule="ladder", ladder_spacing="equal", decay_start=0, total_iters=10,
                  ladder_rungs=3, attn_omission_rate=0.6, mlp_omission_rate=0.3)
    assert ladder_rung_ends(c) == [3, 7, 10]
    for t, m in {0: 2 / 3, 2: 2 / 3, 3: 1 / 3, 6: 1 / 3, 7: 0.0, 9: 0.0}.items():
        a, b = rates(c, t)
        assert math.isclose(a, 0.6 * m) and math.isclose(b, 0.3 * m), t
    # half-up rounding: D=5, N=2 equal -> ends at 2.5 -> 3 and 5.
    c2 = SATConfig(schedule="ladder", ladder_spacing="equal", decay_start=0, total_iters=5,
                   ladder_rungs=2)
    assert ladder_rung_ends(c2) == [3, 5]


def test_ladder_rungs_tile_span_and_change_n_minus_1_times():
    for ts, te, n, spacing in [(0, 1000, 4, "lengthening"), (7, 93, 5, "equal"),
                               (3, 20, 6, "lengthening"), (0, 1, 1, "equal")]:
        c = SATConfig(schedule="ladder", decay_start=ts, total_iters=te, ladder_rungs=n,
                      ladder_spacing=spacing)
        ends = ladder_rung_ends(c)
        assert ends[-1] == te and len(ends) == n and ends == sorted(ends)
        values = [rates(c, t)[0] for t in range(ts, te)]
        changes = sum(1 for a, b in zip(values, values[1:]) if a != b)
        assert changes <= n - 1
        assert values[-1] == 0.0


def test_linear_and_cosine_and_constant():
    lin = SATConfig(schedule="linear", decay_start=20, total_iters=120, attn_omission_rate=0.5)
    assert rates(lin, 19)[0] == 0.5 and rates(lin, 20)[0] == 0.5
    assert rates(lin, 70)[0] == pytest.approx(0.25)
    assert rates(lin, 119)[0] == pytest.approx(0.5 * (1 / 100))
    cos = SATConfig(schedule="cosine", decay_start=20, total_iters=120, attn_omission_rate=0.5)
    assert rates(cos, 20)[0] == 0.5
    assert rates(cos, 70)[0] == pytest.approx(0.25)
    assert rates(cos, 45)[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    const = SATConfig(schedule="constant", total_iters=10, attn_omission_rate=0.3)
    assert rates(const, 0) == (0.3, 0.5) and rates(const, 9) == (0.3, 0.5)


def test_disabled_is_dense_and_phases():
    assert rates(SATConfig(enabled=False), 0) == (0.0, 0.0)
    c = SATConfig(decay_start=10, total_iters=110, ladder_rungs=4)
    assert [schedule_phase(c, t) for t in (0, 9, 10, 20, 40, 70, 109)] == [0, 0, 1, 2, 3, 4, 4]
