"""``SATConfig``: every SAT setting in one validated dataclass (SAT_SPEC §1–§5).

Why one object: the layers, the schedule and the trainer all read the same settings, and
a bad value must be caught once, at construction, with a message that says what is wrong
and what is allowed, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

METRICS = ("uniform", "magnitude", "wanda", "maxip")
SELECTIONS = ("topk", "sampling")
SCHEDULES = ("constant", "linear", "cosine", "ladder")
LADDER_SPACINGS = ("lengthening", "equal")

# Measured default (docs/SAT_SPEC_ADDENDUM.md, "§3 Sampling temperature"): T = 0.5 matched
# dense and topk validation loss under LORS with the least seed spread; T >= 2 was worse.
DEFAULT_TEMPERATURE = 0.5


@dataclass(frozen=True)
class SATConfig:
    """Sparsity-Accelerated Training settings.

    Attributes:
        enabled: master switch; when False the SAT layers are the stock layers.
        metric: neuron importance (SAT_SPEC §1).
        selection: ``topk`` or temperature ``sampling`` (SAT_SPEC §3).
        temperature: ``T`` of ``softmax(ŝ/T)``; only used by ``sampling``.
        attn_omission_rate / mlp_omission_rate: ``ρ_max`` for heads / channels, in [0, 1).
        schedule: how ``ρ`` evolves with the iteration (SAT_SPEC §5).
        decay_start: ``t_s``; the iteration where the schedule starts to decay.
        total_iters: ``t_end``; the run's total number of iterations.
        ladder_rungs: ``N`` rungs of LORS.
        ladder_spacing: ``lengthening`` (``w_i = i``) or ``equal`` (``w_i = 1``).
        seed: base seed of the per-(iteration, layer, TP rank) selection generators (§3).
        dp_consistent: all-reduce the input statistics (``maxip``'s ``x̄``, ``wanda``'s
            column sums of squares) over the data-parallel group before scoring, so every
            replica trains the same sub-network (§3 rev 2); no effect on ``uniform`` /
            ``magnitude``, which need no collective.
    """

    enabled: bool = True
    metric: str = "maxip"
    selection: str = "sampling"
    temperature: float = DEFAULT_TEMPERATURE
    attn_omission_rate: float = 0.5
    mlp_omission_rate: float = 0.5
    schedule: str = "ladder"
    decay_start: int = 0
    total_iters: int = 1000
    ladder_rungs: int = 4
    ladder_spacing: str = "lengthening"
    seed: int = 1234
    dp_consistent: bool = True

    def __post_init__(self):
        problems = []

        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                problems.append(f"{name}={value!r} is not one of {', '.join(allowed)}")

        choice("metric", METRICS)
        choice("selection", SELECTIONS)
        choice("schedule", SCHEDULES)
        choice("ladder_spacing", LADDER_SPACINGS)
        for name in ("attn_omission_rate", "mlp_omission_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                problems.append(f"{name}={value!r} must be in [0, 1) (the fraction of units dropped)")
        if not isinstance(self.temperature, (int, float)) or not float(self.temperature) > 0.0:
            problems.append(f"temperature={self.temperature!r} must be > 0")
        for name in ("decay_start", "total_iters", "ladder_rungs", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be an integer")
        if isinstance(self.total_iters, int) and self.total_iters < 1:
            problems.append(f"total_iters={self.total_iters!r} must be >= 1")
        if isinstance(self.decay_start, int) and self.decay_start < 0:
            problems.append(f"decay_start={self.decay_start!r} must be >= 0")
        if (
            isinstance(self.decay_start, int)
            and isinstance(self.total_iters, int)
            and self.decay_start > self.total_iters
        ):
            problems.append(
                f"decay_start={self.decay_start} must be <= total_iters={self.total_iters}"
            )
        if isinstance(self.ladder_rungs, int) and self.ladder_rungs < 1:
            problems.append(f"ladder_rungs={self.ladder_rungs!r} must be >= 1")
        if problems:
            raise ValueError("invalid SATConfig: " + "; ".join(problems))

    def replace(self, **changes) -> "SATConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def unsupported_settings(config) -> list:
    """Problems with a megatron ``TransformerConfig`` that every SAT layer refuses.

    ``gradient_accumulation_fusion`` makes megatron's linear layers accumulate weight
    gradients into ``param.main_grad`` inside their own backward; the SAT path computes
    with the weights directly and returns ``.grad`` through autograd, which megatron's
    DDP would then never see.  Refusing is better than silently losing the gradient.
    """
    problems = []
    if getattr(config, "gradient_accumulation_fusion", False):
        problems.append("gradient_accumulation_fusion is not supported with SAT (its "
                        "main_grad accumulation bypasses the sparse path); turn it off")
    return problems
