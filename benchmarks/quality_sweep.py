"""Why is SAT behind dense at equal steps? A schedule sweep on the training split only.

    python benchmarks/quality_sweep.py --preset cpu      # ~45 min on 2 idle CPU cores

Issue 10 asks, when SAT ends more than 2% ppl behind dense at equal steps, for the cause
to be looked for in the LORS rung count, the sampling temperature and where the dense
phase begins, without ever tuning on the evaluation text. So this sweep:

- trains from the quality study's own cached extended checkpoint (same base model,
  tokenizer, data order, LR schedule and step count; ``quality_study.prepare``);
- changes one setting at a time around the recommended SAT (maxip + sampling, LORS at
  ρ_max 0.5, dense phase from half the run, 4 lengthening rungs, T = 0.5);
- judges every setting by the trainer's own validation loss: documents that
  ``--split 98,2,0`` sets aside from the *training* file. ``tools/eval_ppl.py`` and the
  held-out text the study reports on are never touched here;
- reports, per setting and paired by seed, the final validation loss against dense,
  the CPU-time speedup, and the equal-wall-time comparison (dense's validation loss at
  the moment the setting finished all its steps).

Writes ``sweep.json`` and ``sweep.md`` into ``--output-dir`` (default: the study's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from quality_plan import PRESETS, RECOMMENDED, Variant, sat_flags  # noqa: E402
from quality_report import _interp, _ms, read_curves  # noqa: E402
from quality_steps import Runner, StudyError, machine  # noqa: E402
from quality_study import cpt_stage, prepare, train_cpt  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    dense: bool = False
    decay_frac: float = 0.5  # t_s / t_end: where the LORS decay (and later the dense rung) starts
    rungs: int = 4
    temperature: float = 0.5
    extra: tuple = field(default_factory=tuple)


SETTINGS = (
    Setting("dense", "dense", dense=True),
    Setting("recommended", "study's recommended: t_s = 50%, 4 rungs, T 0.5"),
    Setting("start25", "t_s = 25%", decay_frac=0.25),
    Setting("start0", "t_s = 0 (the --sat-decay-start default)", decay_frac=0.0),
    Setting("rungs2", "2 rungs", rungs=2),
    Setting("rungs8", "8 rungs", rungs=8),
    Setting("t025", "T 0.25 (closer to top-k)", temperature=0.25),
    Setting("t1", "T 1.0 (closer to uniform)", temperature=1.0),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)


def setting_flags(s: Setting, iters: int) -> list:
    """Trainer flags; the recommended setting's are exactly the study's ``sat`` variant's."""
    if s.dense:
        return []
    flags = sat_flags(Variant(s.name, s.label, RECOMMENDED), iters)
    i = flags.index("--sat-decay-start")
    flags[i + 1] = str(int(iters * s.decay_frac))
    flags[flags.index("--sat-ladder-rungs") + 1] = str(s.rungs)
    if s.temperature != 0.5:
        flags += ["--sat-temperature", str(s.temperature)]
    return flags + list(s.extra)


def summarise(runs: list) -> list:
    """Per setting: final validation loss, its per-seed gap to dense, speed, equal time."""
    dense = {r["seed"]: r["curves"] for r in runs if r["setting"] == "dense"}
    rows = []
    for s in SETTINGS:
        mine = [r for r in runs if r["setting"] == s.name]
        if not mine:
            continue
        final, gaps, cpu_sp, eq = [], [], [], []
        for r in mine:
            c = r["curves"]
            final.append(c["valid_loss"][-1])
            d = dense.get(r["seed"])
            if d is None:
                continue
            gaps.append(c["valid_loss"][-1] - d["valid_loss"][-1])
            if c["cpu_ms_per_iter"] and d["cpu_ms_per_iter"]:
                cpu_sp.append(d["cpu_ms_per_iter"] / c["cpu_ms_per_iter"])
            # Equal wall time on the CPU-time clock: dense's loss when it had used as much
            # CPU time as this setting needed for every step (machine-load independent).
            t_end = c["cpu_ms_per_iter"] * len(c["iteration"])
            d_t = [n * d["cpu_ms_per_iter"] for n in d["valid_iter"]]
            dense_then = _interp(t_end, d_t, d["valid_loss"])
            eq.append(c["valid_loss"][-1] - dense_then)
        rows.append({"setting": s.name, "label": s.label, "seeds": len(mine),
                     "final_valid_loss": _ms(final), "gap_to_dense": _ms(gaps),
                     "ppl_ratio_to_dense": math.exp(_ms(gaps)[0]) if gaps else float("nan"),
                     "cpu_time_speedup": statistics.median(cpu_sp) if cpu_sp else float("nan"),
                     "equal_time_gap": _ms(eq), "flags": mine[0]["flags"]})
    return rows


def _f(ms, d=4, sign=False):
    m, s = ms
    if not math.isfinite(m):
        return "n/a"
    fmt = f"{'+' if sign else ''}.{d}f"
    return format(m, fmt) + (f" ± {s:.{d}f}" if math.isfinite(s) else "")


def markdown(res: dict) -> str:
    p = res["preset_spec"]
    lines = [f"## SAT schedule sweep on the training split, preset `{res['preset']}`", "",
             f"Command: `{res['command']}`", "",
             "Run: {date}, {device}, OMP threads {threads}, torch {torch}.".format(
                 **res["machine"]), "",
             f"Model: {p['note']}; CPT {p['cpt_iters']} iterations from the study's extended "
             f"checkpoint; validation: {res['eval_iters']} batches of the trainer's own "
             f"validation split (documents of the training file), never the held-out text.",
             "", "| setting | seeds | final val loss | Δ loss vs dense (paired) | ppl ratio | "
             "CPU-time speedup | Δ loss vs dense at equal CPU time |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        dense = r["setting"] == "dense"
        lines.append(f"| {r['label']} | {r['seeds']} | {_f(r['final_valid_loss'])} | "
                     f"{'' if dense else _f(r['gap_to_dense'], sign=True)} | "
                     f"{'' if dense else format(r['ppl_ratio_to_dense'], '.3f')} | "
                     f"{'' if dense else format(r['cpu_time_speedup'], '.2f') + 'x'} | "
                     f"{'' if dense else _f(r['equal_time_gap'], sign=True)} |")
    lines += ["", "Δ loss: mean ± sd over seeds of (setting − dense) for the same seed (same "
              "data order); ppl ratio = exp(mean Δ loss); equal CPU time: dense's validation "
              "loss, interpolated, after the process CPU time the setting needed for all its "
              "steps (negative = the setting is ahead)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks", "out", "quality"),
                   help="the quality study's output folder (its cached stages are reused)")
    p.add_argument("--settings", default=None,
                   help="comma-separated subset of " + ", ".join(SETTING_NAMES))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-iters-scale", type=int, default=4,
                   help="validation batches = the preset's --eval-iters times this")
    p.add_argument("--english", action="store_true", help="as for quality_study.py")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    names = [n.strip() for n in (a.settings or ",".join(SETTING_NAMES)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTING_NAMES]
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)}; choose from "
                f"{', '.join(SETTING_NAMES)}")
    if "dense" not in names:
        names.insert(0, "dense")  # every comparison is paired against dense
    out = os.path.abspath(a.output_dir)
    cmd = ["python", "benchmarks/quality_sweep.py", "--preset", a.preset]
    if out != os.path.join(REPO, "benchmarks", "out", "quality"):
        cmd += ["--output-dir", a.output_dir]
    for flag, v, default in (("--settings", a.settings, None), ("--seeds", a.seeds, 2),
                             ("--eval-iters-scale", a.eval_iters_scale, 4)):
        if v != default:
            cmd += [flag, str(v)]
    cmd += ["--english"] if a.english else []
    cmd = shlex.join(cmd)
    print(f"SAT schedule sweep, preset {a.preset}; rerun with:\n  {cmd}", flush=True)

    preset = PRESETS[a.preset]  # the study's own sizes, so its cached stages are reused
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    run = Runner(work, verbose=not a.quiet)
    say = (lambda m: None) if a.quiet else (lambda m: print(f"==> {m}", flush=True))
    eval_iters = preset.eval_iters * a.eval_iters_scale
    t0 = time.time()
    try:
        prep = prepare(a, preset, run, say)
        settings = [s for s in SETTINGS if s.name in names]
        jobs = [(s, seed) for seed in range(a.seeds) for s in settings]
        runs = []
        for k, (s, seed) in enumerate(jobs, 1):
            flags = setting_flags(s, preset.cpt_iters)
            st = cpt_stage(work, f"sweep-{s.name}-s{seed}", prep, flags, seed, preset,
                           eval_iters)
            if st.done:
                say(f"[{k}/{len(jobs)}] {s.name} seed {seed}: cached")
            else:
                say(f"[{k}/{len(jobs)}] {s.name} seed {seed}: {preset.cpt_iters} iterations")
                st.start()
                train_cpt(run, st, prep, preset, flags, seed, eval_iters)
                shutil.rmtree(st.path("ckpt"), ignore_errors=True)  # only the curves count
                st.finish({})
            runs.append({"setting": s.name, "seed": seed, "flags": flags,
                         "curves": read_curves(st.path("metrics.jsonl"))})
    except StudyError as e:
        print(f"quality_sweep.py: error: {e}", file=sys.stderr)
        return 1
    res = {"preset": a.preset, "preset_spec": dataclasses.asdict(preset), "command": cmd,
           "machine": machine(), "eval_iters": eval_iters, "runs": runs,
           "rows": summarise(runs), "seconds": time.time() - t0}
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    md = markdown(res)
    with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print("\n" + md + f"\nwrote {out}/sweep.json, {out}/sweep.md\nrerun with:\n  {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
