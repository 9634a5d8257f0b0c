"""Selection (SAT_SPEC §3): exact top-k, Plackett–Luce sampling statistics, determinism."""

import itertools
import math

import pytest
import torch

from megatron_sat.selection import num_kept, select, selection_generator


def test_num_kept_half_up():
    assert num_kept(8, 0.5) == 4 and num_kept(8, 0.75) == 2 and num_kept(8, 0.25) == 6
    assert num_kept(5, 0.5) == 3  # 2.5 rounds up
    assert num_kept(3, 0.99) == 1  # never zero
    assert num_kept(4, 0.0) == 4


def test_topk_exact_with_ties_to_lower_index():
    s = torch.tensor([0.5, 3.0, 1.0, 3.0, 2.0, 3.0])
    assert select(s, 2, "topk").tolist() == [1, 3]
    assert select(s, 4, "topk").tolist() == [1, 3, 4, 5]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(17, generator=g)
        k = int(torch.randint(1, 17, (1,), generator=g))
        expect = sorted(sorted(range(17), key=lambda i: (-x[i].item(), i))[:k])
        assert select(x, k, "topk").tolist() == expect


def softmax_probs(s, temperature):
    s_hat = s / s.mean()
    return torch.softmax(s_hat.double() / temperature, dim=0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_k1_frequencies_chi_square(temperature):
    s = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.5])
    n_draws = 20000
    gen = selection_generator(7, 0, 0, 0)
    picks = select(s.expand(n_draws, -1), 1, "sampling", temperature, gen).reshape(-1)
    counts = torch.bincount(picks, minlength=5).double()
    expected = softmax_probs(s, temperature) * n_draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47, (chi2, counts, expected)  # df=4, p=0.001 critical value


def exact_inclusion(p, k):
    """Inclusion probabilities of successive draws without replacement, enumerated."""
    n = len(p)
    incl = [0.0] * n
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            incl[i] += prob
    return incl


def test_sampling_k2_of_5_inclusion_matches_plackett_luce():
    s = torch.tensor([0.2, 1.0, 2.5, 0.7, 1.6])
    temperature = 0.8
    p = softmax_probs(s, temperature).tolist()
    exact = exact_inclusion(p, 2)
    assert math.isclose(sum(exact), 2.0)
    n_draws = 40000
    picks = select(s.expand(n_draws, -1), 2, "sampling", temperature,
                   selection_generator(11, 3, 2, 0))
    freq = torch.bincount(picks.reshape(-1), minlength=5).double() / n_draws
    for i in range(5):
        sd = math.sqrt(exact[i] * (1 - exact[i]) / n_draws)
        assert abs(freq[i].item() - exact[i]) < 5 * sd, (i, freq[i].item(), exact[i])


def test_uniform_scores_sampling_is_uniform_subset():
    n_draws = 20000
    picks = select(torch.ones(n_draws, 4), 2, "sampling", 1.0, selection_generator(1, 1, 1, 1))
    freq = torch.bincount(picks.reshape(-1), minlength=4).double() / n_draws
    assert torch.allclose(freq, torch.full((4,), 0.5, dtype=torch.float64), atol=0.02)
    zeros = select(torch.zeros(n_draws, 4), 1, "sampling", 1.0, selection_generator(1, 1, 1, 2))
    freq0 = torch.bincount(zeros.reshape(-1), minlength=4).double() / n_draws
    assert torch.allclose(freq0, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)


@pytest.mark.parametrize("method", ["topk", "sampling"])
def test_distinct_sorted_and_deterministic(method):
    s = torch.rand(3, 32)
    a = select(s, 9, method, 1.0, selection_generator(5, 10, 3, 1))
    b = select(s, 9, method, 1.0, selection_generator(5, 10, 3, 1))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (3, 9)
    for row in a.tolist():
        assert row == sorted(set(row))


def test_generator_depends_on_every_key_part():
    s = torch.rand(64)
    base = select(s, 8, "sampling", 1.0, selection_generator(1, 2, 3, 4)).tolist()
    others = [select(s, 8, "sampling", 1.0, selection_generator(*key)).tolist()
              for key in [(2, 2, 3, 4), (1, 3, 3, 4), (1, 2, 4, 4), (1, 2, 3, 5)]]
    assert all(o != base for o in others)


def test_bad_k_is_named():
    with pytest.raises(ValueError, match="cannot keep k=5 of n=4"):
        select(torch.rand(4), 5, "topk")
