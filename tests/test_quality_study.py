"""The quality study (benchmarks/quality_study.py, issue 10) keeps working.

Suite budget: the full ``--preset smoke`` (all 9 variants, each a trainer and an eval_ppl
process of ~10 s start-up) takes several minutes on 2 cores, more than this suite's 90 s.
So the suite runs a subset and covers every variant's code path another, cheaper way:

- ``test_smoke_pipeline_end_to_end`` runs ``--preset smoke --variants sat`` as a real
  subprocess: data split, base pre-training, HF conversion, HF-trip check, unigram
  baseline, vocabulary extension with checkpoint resize, conversion back, continual
  pre-training with the recommended SAT, eval_ppl on both domains, report and plots;
  then reruns it and checks that every stage comes from the cache.
- ``test_every_variant_trains_through_the_trainer`` covers every variant's code path
  cheaply: each variant's exact flags (``quality_plan.sat_flags``) go through the
  trainer's documented entry point ``megatron_sat.training.main.main`` in this process,
  on a tiny model and synthetic data, and must end with a finite validation loss and
  the schedule the variant asks for (omission rate in the log).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from test_train_common import TINY, make_data, read_metrics
from tools_helpers import demo_data  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from quality_plan import VARIANTS, sat_flags  # noqa: E402


def _study(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "quality_study.py"),
                           "--preset", "smoke", "--variants", "sat", "--output-dir", str(out),
                           *extra], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=600)


def test_smoke_pipeline_end_to_end(tmp_path, demo_data):
    out = tmp_path / "quality"
    proc = _study(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    # the base checkpoint survives the HF trip (megatron-core vs HF transformers logits)
    assert res["base"]["hf_trip_max_abs_logit_diff"] <= 1e-4
    assert math.isfinite(res["base"]["unigram_ppl_A"]) and res["base"]["unigram_ppl_A"] > 1
    assert res["extended_start"]["vocab_size"] > 32000  # the tokenizer really grew
    assert [r["variant"] for r in res["runs"]] == ["sat"]
    for r in [res["base"], res["extended_start"], *res["runs"]]:
        for domain in ("B_news", "A_reviews"):
            assert math.isfinite(r["ppl"][domain]["ppl"]) and r["ppl"][domain]["tokens"] > 0
    curves = res["runs"][0]["curves"]
    assert len(curves["iteration"]) == res["preset_spec"]["cpt_iters"]  # one record per step
    assert max(curves["mlp_rate"]) == 0.5 and curves["mlp_rate"][-1] == 0.0  # LORS ends dense
    assert all(math.isfinite(x) for x in curves["valid_loss"])
    for name in ("val_loss_vs_step.png", "val_loss_vs_time.png", "omission_rate_vs_step.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "unigram baseline" in md and "| SAT maxip+sampling+LORS" in md
    assert "python benchmarks/quality_study.py --preset smoke" in proc.stdout
    # a rerun redoes nothing: every stage is cached
    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "base model: cached" in again.stdout and "vocabulary extension: cached" in \
        again.stdout and "CPT sat seed 0: cached" in again.stdout
    assert "pretrain_llama.py" not in again.stdout.replace("rerun", "")
    assert json.loads((out / "results.json").read_text())["runs"][0]["ppl"] == \
        res["runs"][0]["ppl"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    return make_data(str(d / "data")), d


def test_every_variant_trains_through_the_trainer(tiny_data, monkeypatch):
    from megatron_sat.training.main import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prefix, d = tiny_data
    iters = 8
    for v in VARIANTS:
        metrics = d / f"{v.name}.jsonl"
        argv = TINY + ["--data-path", prefix, "--split", "90,10,0", "--data-cache-path",
                       str(d / "cache"), "--train-iters", str(iters), "--lr", "1e-3",
                       "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
                       "--zero-stage", "0", "--metrics-file", str(metrics)]
        assert main(argv + sat_flags(v, iters)) == 0, v.name
        rows = read_metrics(str(metrics))
        train = [r for r in rows if r["kind"] == "train"]
        valid = [r["lm_loss"] for r in rows if r["kind"] == "valid"]
        assert len(train) == iters and valid and all(math.isfinite(x) for x in valid), v.name
        rates = [r["mlp_omission_rate"] for r in train]
        rho = v.sat["rho"] if v.sat else 0.0
        assert rates[0] == pytest.approx(rho), v.name
        if v.sat and v.sat["schedule"] == "ladder":
            assert rates[-1] == 0.0, v.name  # LORS ends dense
        else:
            assert set(rates) == {rho}, v.name


def test_sweep_settings_change_one_thing_and_pair_with_dense():
    """quality_sweep.py: each setting's flags give the SATConfig it names (through the
    trainer's own parser), the recommended one equals the study's ``sat`` variant, and
    the paired gaps and the equal-CPU-time comparison match a hand computation."""
    from quality_sweep import SETTINGS, setting_flags, summarise

    from megatron_sat.training.arguments import build_parser
    from megatron_sat.training.feature_arguments import sat_config_from_args

    iters = 200
    sat = next(v for v in VARIANTS if v.name == "sat")
    by = {s.name: s for s in SETTINGS}
    assert setting_flags(by["recommended"], iters) == sat_flags(sat, iters)
    assert setting_flags(by["dense"], iters) == []
    for s in SETTINGS:
        if s.dense:
            continue
        cfg = sat_config_from_args(build_parser().parse_args(
            TINY + ["--train-iters", str(iters)] + setting_flags(s, iters)), iters, 0)
        assert (cfg.metric, cfg.selection, cfg.schedule) == ("maxip", "sampling", "ladder")
        assert (cfg.decay_start, cfg.ladder_rungs, cfg.temperature) == \
            (int(iters * s.decay_frac), s.rungs, s.temperature), s.name

    def curves(losses, ms):  # validation every 10 steps, 20 steps, ms CPU per step
        return {"iteration": list(range(1, 21)), "valid_iter": [10, 20],
                "valid_loss": losses, "cpu_ms_per_iter": ms}

    runs = [{"setting": "dense", "seed": 0, "flags": [], "curves": curves([5.0, 4.0], 100.0)},
            {"setting": "recommended", "seed": 0, "flags": ["--sat"],
             "curves": curves([5.5, 4.2], 80.0)}]
    rows = {r["setting"]: r for r in summarise(runs)}
    rec = rows["recommended"]
    assert rec["gap_to_dense"][0] == pytest.approx(0.2)
    assert rec["cpu_time_speedup"] == pytest.approx(1.25)
    # the setting used 1600 ms; dense had then done 16 steps: loss 5 - 0.6 = 4.4
    assert rec["equal_time_gap"][0] == pytest.approx(4.2 - 4.4)
