"""Turn the quality study's runs into results.json, results.md and PNG plots.

Why a separate file: the study (``quality_study.py``) only runs CLIs; everything computed
from their outputs (per-seed statistics, the equal-wall-time comparison, plots) lives
here, as pure functions of the trainer's JSONL metrics and eval_ppl's JSON.

Wall time is the sum of the trainer's logged per-iteration times (``--log-interval 1``
makes every iteration one JSONL record): it excludes process start, checkpoint loading
and evaluation, which are the same for every variant. The first iteration of a process
carries one-off warm-up work, so it is counted at the median iteration time of its run.
"""

from __future__ import annotations

import json
import math
import os
import statistics


def read_curves(metrics_file: str) -> dict:
    """Per-iteration train records, validation points and the summary of one run."""
    train, valid, summary = [], [], None
    with open(metrics_file) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r["kind"] == "train":
                train.append(r)
            elif r["kind"] == "valid":
                valid.append(r)
            elif r["kind"] == "summary":
                summary = r
    secs = [r["seconds"] for r in train]
    if secs:
        secs[0] = statistics.median(secs[1:] or secs)  # warm-up step at the median
    wall, t = [], 0.0
    for s in secs:
        t += s
        wall.append(t)
    at = {r["iteration"]: w for r, w in zip(train, wall)}
    cpu = [r["time_cpu_ms"] for r in train[1:] if r.get("time_cpu_ms") is not None]
    return {"iteration": [r["iteration"] for r in train], "wall": wall,
            "train_loss": [r["lm_loss"] for r in train],
            "attn_rate": [r["attn_omission_rate"] for r in train],
            "mlp_rate": [r["mlp_omission_rate"] for r in train],
            "valid_iter": [r["iteration"] for r in valid],
            "valid_wall": [at.get(r["iteration"], float("nan")) for r in valid],
            "valid_loss": [r["lm_loss"] for r in valid],
            "tokens_per_sec": (summary or {}).get("overall", {}).get("tokens_per_sec"),
            "cpu_ms_per_iter": statistics.mean(cpu) if cpu else None,
            "tokens_per_iter": train[0]["tokens"] // max(train[0]["iterations"], 1)
            if train else 0}


def _interp(x: float, xs: list, ys: list) -> float:
    """Linear interpolation of ``ys`` at ``x``; NaN outside ``xs``."""
    for i in range(1, len(xs)):
        if xs[i - 1] <= x <= xs[i]:
            f = (x - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-12)
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    return ys[0] if xs and x == xs[0] else float("nan")


def _time_to(loss: float, xs: list, ys: list) -> float:
    """First wall time at which the (interpolated) curve reaches ``loss``."""
    for i in range(len(ys)):
        if ys[i] <= loss:
            if i == 0:
                return xs[0]
            f = (ys[i - 1] - loss) / max(ys[i - 1] - ys[i], 1e-12)
            return xs[i - 1] + f * (xs[i] - xs[i - 1])
    return float("nan")


def equal_time(dense: dict, sat: dict) -> dict:
    """Dense vs SAT of one seed at equal wall-clock (validation loss).

    - at the time SAT needed for all N steps: the loss dense had reached by then;
    - for each validation point of dense at step n: the loss SAT had reached at the time
      dense took for n steps (while SAT was still running);
    - the time dense needs to reach SAT's final loss, over SAT's time.
    """
    d_t, d_l = dense["valid_wall"], dense["valid_loss"]
    s_t, s_l = sat["valid_wall"], sat["valid_loss"]
    t_sat = sat["wall"][-1]
    points = [{"dense_step": n, "seconds": t, "dense_loss": lo,
               "sat_loss": _interp(t, s_t, s_l)}
              for n, t, lo in zip(dense["valid_iter"], d_t, d_l) if t <= s_t[-1]]
    t_dense_to_sat_loss = _time_to(s_l[-1], d_t, d_l)
    return {"sat_seconds": t_sat, "dense_seconds": dense["wall"][-1],
            "dense_step_at_sat_end": _interp(t_sat, dense["wall"], dense["iteration"]),
            "dense_loss_at_sat_end": _interp(t_sat, d_t, d_l), "sat_final_loss": s_l[-1],
            "dense_final_loss": d_l[-1], "points": points,
            "dense_seconds_to_sat_final_loss": t_dense_to_sat_loss,
            "time_to_loss_speedup": t_dense_to_sat_loss / t_sat if t_sat else float("nan")}


def _ms(xs: list) -> tuple:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarise(results: dict) -> dict:
    """Per-variant statistics over seeds; speed relative to dense, quality gap to dense."""
    by = {}
    for r in results["runs"]:
        by.setdefault(r["variant"], []).append(r)
    rows = []
    for name in results["variants"]:
        runs = by.get(name, [])
        if not runs:
            continue
        tgt = [r["ppl"]["B_news"]["ppl"] for r in runs]
        src = [r["ppl"]["A_reviews"]["ppl"] for r in runs]
        tps = [r["curves"]["tokens_per_sec"] for r in runs if r["curves"]["tokens_per_sec"]]
        cpu = [r["curves"]["cpu_ms_per_iter"] for r in runs if r["curves"]["cpu_ms_per_iter"]]
        rows.append({"variant": name, "label": runs[0]["label"], "seeds": len(runs),
                     "target_ppl": _ms(tgt), "source_ppl": _ms(src),
                     "target_ppl_runs": tgt, "source_ppl_runs": src,
                     "tokens_per_sec": statistics.median(tps) if tps else float("nan"),
                     "cpu_ms_per_iter": statistics.median(cpu) if cpu else float("nan"),
                     "final_valid_loss": _ms([r["curves"]["valid_loss"][-1] for r in runs
                                              if r["curves"]["valid_loss"]])})
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        r["gap_to_dense"] = (r["target_ppl"][0] / dense["target_ppl"][0] - 1.0) if dense \
            else float("nan")
        r["speedup"] = (r["tokens_per_sec"] / dense["tokens_per_sec"]) if dense \
            else float("nan")
        r["cpu_time_speedup"] = (dense["cpu_ms_per_iter"] / r["cpu_ms_per_iter"]) if dense \
            else float("nan")
    pairs = []
    for d in by.get("dense", []):
        s = next((x for x in by.get("sat", []) if x["seed"] == d["seed"]), None)
        if s and d["curves"]["valid_loss"] and s["curves"]["valid_loss"]:
            pairs.append({"seed": d["seed"], **equal_time(d["curves"], s["curves"])})
    return {"rows": rows, "equal_time": pairs}


def _fmt(mean_sd: tuple, digits: int = 2) -> str:
    m, s = mean_sd
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if math.isfinite(s) else "")


def _num(x, fmt: str) -> str:
    return format(x, fmt) if x is not None and math.isfinite(x) else "n/a"


def markdown(results: dict, summary: dict) -> str:
    b, e, p = results["base"], results["extended_start"], results["preset_spec"]
    lines = [f"## Quality study, preset `{results['preset']}`", "",
             f"Command: `{results['command']}`", "",
             "Run: {date}, {device}, OMP threads {threads}, torch {torch}.".format(
                 **results["machine"]), "",
             f"Model: {p['note']}; CPT {p['cpt_iters']} iterations of "
             f"{p['global_batch_size'] * p['seq_length']} tokens, LR {p['cpt_lr']} cosine.", "",
             f"Base model on held-out domain A: ppl **{b['ppl']['A_reviews']['ppl']:.2f}** "
             f"beside a unigram baseline of **{b['unigram_ppl_A']:.2f}** (base tokenizer); "
             f"HF round trip max |Δlogit| {b['hf_trip_max_abs_logit_diff']:.1e}.",
             f"After vocabulary extension (vocabulary {e['vocab_size']}), before CPT: "
             f"B ppl {e['ppl']['B_news']['ppl']:.2f}, A ppl {e['ppl']['A_reviews']['ppl']:.2f}.",
             "", "| variant | seeds | target ppl (B news) | source ppl (A reviews) | "
             "gap to dense | tokens/s | speedup | speedup (CPU time) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        gap = r["gap_to_dense"]
        lines.append(f"| {r['label']} | {r['seeds']} | {_fmt(r['target_ppl'])} | "
                     f"{_fmt(r['source_ppl'])} | "
                     f"{'' if r['variant'] == 'dense' else f'{100 * gap:+.2f}%'} | "
                     f"{r['tokens_per_sec']:.1f} | {r['speedup']:.2f}x | "
                     f"{_num(r['cpu_time_speedup'], '.2f')}x |")
    lines += ["", "ppl: tools/eval_ppl.py on held-out lines never trained on, extended "
              "tokenizer (mean ± sd over seeds); gap to dense: relative difference of the mean "
              "target ppl; tokens/s: median over seeds of the trainer's whole-run tokens/s "
              "(first step excluded); speedup (CPU time): dense's process CPU time per iteration over "
              "the variant's (the trainer's time_cpu_ms; unlike wall time it does not change "
              "when other jobs share the machine); seed k of every variant trains on the same "
              "data order."]
    if summary["equal_time"]:
        lines += ["", "### Equal wall-time (dense vs recommended SAT, validation loss)", "",
                  "| seed | SAT time for all steps (s) | dense step then | dense loss then | "
                  "SAT final loss | dense time to SAT's final loss (s) | time-to-loss speedup |",
                  "|---|---|---|---|---|---|---|"]
        for q in summary["equal_time"]:
            lines.append(f"| {q['seed']} | {_num(q['sat_seconds'], '.1f')} | "
                         f"{_num(q['dense_step_at_sat_end'], '.0f')} | "
                         f"{_num(q['dense_loss_at_sat_end'], '.4f')} | "
                         f"{_num(q['sat_final_loss'], '.4f')} | "
                         f"{_num(q['dense_seconds_to_sat_final_loss'], '.1f')} | "
                         f"{_num(q['time_to_loss_speedup'], '.2f')}x |")
        lines += ["", "Wall time: the sum of the trainer's logged per-iteration times (process "
                  "start, checkpoint loading and evaluation excluded). \"dense loss then\": "
                  "dense's validation loss, interpolated, at the time SAT finished all steps "
                  "(n/a before dense's first validation point)."]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    paths = {}
    colours = {"dense": "tab:blue", "sat": "tab:red"}
    for axis, fname in (("valid_iter", "val_loss_vs_step.png"),
                        ("valid_wall", "val_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            if r["variant"] in colours and r["curves"]["valid_loss"]:
                ax.plot(r["curves"][axis], r["curves"]["valid_loss"], color=colours[r["variant"]],
                        alpha=0.8, marker=".", label=f"{r['variant']} seed {r['seed']}")
        ax.set_xlabel("iteration" if axis == "valid_iter" else "training wall time (s)")
        ax.set_ylabel("validation loss (domain B)")
        ax.legend(fontsize=7)
        ax.set_title("dense vs recommended SAT")
        fig.tight_layout()
        paths[fname] = os.path.join(out, fname)
        fig.savefig(paths[fname], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r["seed"] == 0 and r["variant"] != "dense":
            ax.plot(r["curves"]["iteration"], r["curves"]["mlp_rate"], label=r["variant"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("MLP omission rate (attention is equal)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["omission_rate_vs_step.png"] = os.path.join(out, "omission_rate_vs_step.png")
    fig.savefig(paths["omission_rate_vs_step.png"], dpi=110)
    plt.close(fig)
    return paths


def write_report(results: dict, out: str) -> dict:
    for r in results["runs"]:
        r["curves"] = read_curves(r["metrics"])
    summary = summarise(results)
    results["summary"] = summary
    paths = {"json": os.path.join(out, "results.json"),
             "markdown": os.path.join(out, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(results, summary))
    paths.update(plots(results, out))
    return paths
