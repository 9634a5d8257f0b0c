"""What the quality study runs: presets (model, data and step counts) and the SAT variants.

Why a separate file: the plan is data that the study, its report and its test all read;
keeping it apart from the orchestration lets the test check every variant's flags through
the trainer without running the study, and keeps each file to one concern.

The variants are the paper's ablations (issue 10), all at the same data order, learning
rate schedule and step count; only the SAT flags differ (SAT_SPEC §1 metrics, §3
selection, §5 schedules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Preset:
    """Sizes of one study. ``model`` holds the trainer's shape flags (no vocabulary: the
    tokenizer sets it, and the extended tokenizer grows it)."""

    model: tuple
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    base_iters: int
    base_lr: float
    cpt_iters: int
    cpt_lr: float
    eval_interval: int  # CPT validation interval (the val-loss curves)
    eval_iters: int
    a_train_lines: int  # domain A (reviews) lines for base pre-training; 0 = all
    b_train_lines: int  # domain B (news) lines for extension and CPT; 0 = all
    heldout_lines: int  # per domain, every 20th line, never trained on
    eval_tokens: int  # eval_ppl --max-tokens per domain
    ext_vocab_size: int  # extend_vocab --vocab-size (Chinese BPE model on domain B)
    seeds: int  # seeds of the multi-seed variants (others run seed 0)
    extra_flags: tuple = ()
    note: str = ""


PRESETS = {
    # Pipeline check for the test suite: tiny model, a handful of steps.
    "smoke": Preset(
        model=("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
               "--num-attention-heads", "4"),
        seq_length=64, micro_batch_size=2, global_batch_size=2, base_iters=24, base_lr=3e-3,
        cpt_iters=8, cpt_lr=1e-3, eval_interval=4, eval_iters=2, a_train_lines=600,
        b_train_lines=1500, heldout_lines=20, eval_tokens=1500, ext_vocab_size=3000, seeds=1,
        note="pipeline check only; the numbers mean nothing"),
    # The recorded run: <= 100 min on 2 idle CPU cores. MLP-heavy like the demo so the
    # attention/MLP work SAT can skip is most of the FLOPs, as it is at 7B (there the
    # 32000-row LM head is ~2% of the FLOPs). Sizing, from process CPU time per step on
    # one thread (2026-11-29, the 2-core project machine): base 1.16 s, CPT dense 1.09 s,
    # CPT SAT at rho 0.5 0.88 s. Base ~15 min; 15 CPT runs ~49 min; eval_ppl ~9 min;
    # validation, process starts and tools ~6 min: ~80 min on one thread, less on two.
    # Checked 2026-11-29 with `--preset cpu --variants dense --cpt-iters 4 --seeds 1` on one
    # thread: the base stage took 734 s and reached held-out reviews ppl 75.8 (unigram
    # baseline 418.6); HF round trip max |dlogit| 9.5e-06; eval_ppl ~35 s per checkpoint.
    # Recorded 2026-11-29 on both cores (docs/QUALITY.md): the 15 CPT runs with their
    # evaluation took 35 min (base stage cached); ~45-50 min from scratch.
    "cpu": Preset(
        model=("--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "4096",
               "--num-attention-heads", "4"),
        seq_length=128, micro_batch_size=4, global_batch_size=4, base_iters=800, base_lr=2e-3,
        cpt_iters=200, cpt_lr=5e-4, eval_interval=20, eval_iters=4, a_train_lines=12000,
        b_train_lines=8000, heldout_lines=400, eval_tokens=12000, ext_vocab_size=4000,
        seeds=3, note="4 layers, hidden 256, ffn 4096, seq 128, 512 tokens/step"),
    # Same protocol sized for ~10 minutes on one H200 (bf16): a ~140M-parameter model.
    # Sized by estimate (~0.1 s per 16k-token step, ~10 s per process start), not measured.
    "gpu": Preset(
        model=("--num-layers", "8", "--hidden-size", "768", "--ffn-hidden-size", "3072",
               "--num-attention-heads", "12"),
        seq_length=1024, micro_batch_size=16, global_batch_size=16, base_iters=450,
        base_lr=1e-3, cpt_iters=150, cpt_lr=3e-4, eval_interval=10, eval_iters=4,
        a_train_lines=0, b_train_lines=0, heldout_lines=1000, eval_tokens=100000,
        ext_vocab_size=8000, seeds=3, extra_flags=("--bf16",),
        note="8 layers, hidden 768, ffn 3072, seq 1024, 16k tokens/step, bf16"),
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    sat: Optional[dict] = None  # None = dense
    multi_seed: bool = False
    tags: tuple = field(default_factory=tuple)


RECOMMENDED = dict(metric="maxip", selection="sampling", rho=0.5, schedule="ladder")

VARIANTS = (
    Variant("dense", "dense", None, multi_seed=True),
    Variant("sat", "SAT maxip+sampling+LORS ρmax 0.5 (recommended)", RECOMMENDED,
            multi_seed=True),
    Variant("no_lors", "maxip+sampling, constant ρ 0.5 (no LORS)",
            dict(RECOMMENDED, schedule="constant"), multi_seed=True),
    Variant("topk", "maxip+top-k+LORS ρmax 0.5", dict(RECOMMENDED, selection="topk")),
    Variant("uniform", "uniform+sampling+LORS ρmax 0.5", dict(RECOMMENDED, metric="uniform")),
    Variant("magnitude", "magnitude+sampling+LORS ρmax 0.5",
            dict(RECOMMENDED, metric="magnitude")),
    Variant("wanda", "wanda+sampling+LORS ρmax 0.5", dict(RECOMMENDED, metric="wanda")),
    Variant("rho025", "recommended at ρmax 0.25", dict(RECOMMENDED, rho=0.25)),
    Variant("rho075", "recommended at ρmax 0.75", dict(RECOMMENDED, rho=0.75)),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)

# LORS as in examples/llama2/_launch_common.sh: sparse for the first half, then 4
# lengthening rungs down to dense (SAT_SPEC §5).
LADDER_RUNGS = 4


def sat_flags(variant: Variant, train_iters: int) -> list:
    """Trainer flags of one variant (empty for dense)."""
    s = variant.sat
    if s is None:
        return []
    flags = ["--sat", "--sat-metric", s["metric"], "--sat-selection", s["selection"],
             "--sat-attn-omission-rate", s["rho"], "--sat-mlp-omission-rate", s["rho"],
             "--sat-schedule", s["schedule"]]
    if s["schedule"] == "ladder":
        flags += ["--sat-decay-start", train_iters // 2, "--sat-ladder-rungs", LADDER_RUNGS]
    return [str(f) for f in flags]


def seeds_of(variant: Variant, preset: Preset) -> list:
    """Seed k of every variant shares seed k's data order (paired comparison)."""
    return list(range(preset.seeds if variant.multi_seed else 1))


def select_variants(names: Optional[str]) -> list:
    if not names:
        return list(VARIANTS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in VARIANT_NAMES]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(VARIANT_NAMES)}")
    return [v for v in VARIANTS if v.name in wanted]
