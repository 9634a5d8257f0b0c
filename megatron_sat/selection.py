"""Selection of ``k`` units out of ``n`` (SAT_SPEC §3): ``topk`` or Plackett–Luce sampling.

Why Gumbel-top-k: successive draws without replacement from ``softmax(ŝ/T)`` equal the
top-k of ``ŝ/T + Gumbel`` noise exactly, and that is a single device kernel: no
``multinomial`` loop, no ``.item()``, no host–device synchronisation.
"""

from __future__ import annotations

import torch

from megatron_sat.config import SELECTIONS

_MASK64 = (1 << 64) - 1


def num_kept(n: int, rho: float) -> int:
    """``k = max(1, ⌊(1 − ρ)·n + ½⌋)``, rounded half up (SAT_SPEC §3)."""
    # Exact for the rates people write (0.25, 0.5, 0.75): (1-ρ)·n + ½ in float64.
    return max(1, min(n, int((1.0 - float(rho)) * n + 0.5 + 1e-9)))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def selection_seed(seed: int, iteration: int, layer: int, tp_rank: int) -> int:
    """A 63-bit seed from ``(seed, t, l, r)`` alone, so a resumed run draws identically."""
    h = 0
    for part in (seed, iteration, layer, tp_rank):
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def selection_generator(seed: int, iteration: int, layer: int, tp_rank: int,
                        device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for the draw of (iteration, layer, TP rank) on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(selection_seed(seed, iteration, layer, tp_rank))
    return gen


def select(scores: torch.Tensor, k: int, method: str, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick ``k`` of the ``n`` units along the last dim of ``scores``; sorted ascending.

    Args:
        scores: ``[..., n]`` non-negative unit scores; leading dims are independent rows
            (e.g. one row per GQA group).
        k: units to keep, ``1 <= k <= n``.
        method: ``topk`` (ties to the lower index) or ``sampling``
            (Plackett–Luce with ``p = softmax((s / mean s) / T)``).
        temperature: ``T > 0`` for ``sampling``.
        generator: the seeded generator on ``scores.device`` (see ``selection_generator``).
    Returns:
        ``LongTensor[..., k]`` of distinct indices, ascending.
    """
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}; use one of {', '.join(SELECTIONS)}")
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep k={k} of n={n} units; k must be in [1, {n}]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    s = scores.float()
    if k == n:
        idx = torch.arange(n, device=s.device).expand(s.shape)
        return idx.contiguous()
    if method == "topk":
        # Stable descending sort: among equal scores the lower index comes first.
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        return torch.sort(order[..., :k], dim=-1).values
    mean = s.mean(dim=-1, keepdim=True)
    s_hat = torch.where(mean == 0, torch.ones_like(s), s / torch.where(mean == 0, 1.0, mean))
    u = torch.rand(s.shape, generator=generator, device=s.device, dtype=torch.float64)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)
    gumbel = -torch.log(-torch.log(u))  # [..., n] standard Gumbel noise
    keys = s_hat.double() / temperature + gumbel
    top = torch.topk(keys, k, dim=-1, sorted=False).indices
    return torch.sort(top, dim=-1).values
