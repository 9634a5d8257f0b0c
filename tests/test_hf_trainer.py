"""sft_llama.py on transformers' Trainer with SATCallback: 2 processes on DeepSpeed ZeRO-2
and ZeRO-3 (CPU, gloo), resume makes the uninterrupted run's selections, options, errors."""

import json
import shutil

import pytest
import torch

from hf_helpers import make_model, make_tokenizer, run_sft, sentiment_files
from tools_helpers import demo_data  # noqa: F401

SAT = ["--sat", "--sat-metric", "maxip", "--sat-selection", "sampling",
       "--sat-decay-start", "2", "--sat-ladder-rungs", "2"]


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = make_tokenizer(demo_data, root / "tok")
    model = make_model(root / "model", tok)
    train, held = sentiment_files(demo_data, root / "data")
    return root, model, train, held


def common(model, train, out, steps):
    return ["--model_name_or_path", model, "--train_file", train, "--output_dir", out,
            "--max_steps", steps, "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3,
            "--logging_steps", 1, "--report_to", "none", "--seed", 3,
            "--dataloader_num_workers", 0]


def selections(path):
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def ok(res):
    assert res.returncode == 0, (res.stdout[-3000:] + res.stderr[-5000:])


def test_zero2_two_processes_resume_same_selections(setup):
    root, model, train, _ = setup
    full, resumed = root / "z2_full", root / "z2_resumed"
    args = common(model, train, full, 4) + SAT + [
        "--deepspeed", "examples/sft/ds_zero2.json", "--save_strategy", "steps",
        "--save_steps", 2, "--sat-selections-file", str(full) + "_sel{rank}.jsonl"]
    ok(run_sft(args, nproc=2))
    sel0, sel1 = (selections(root / f"z2_full_sel{r}.jsonl") for r in (0, 1))
    assert sorted(sel0) == [0, 1, 2, 3]
    assert sel0 == sel1  # statistics reduced over DP: every replica trains one sub-network
    assert sel0[0]["mlp"][0] is not None and len(sel0[0]["mlp"][0]) == 24  # ρ = 0.5 of 48
    assert sel0[3]["mlp"] == [None, None]  # the last LORS rung is dense
    # resume from step 2 in a fresh output folder: same selections for steps 2 and 3
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args = common(model, train, resumed, 4) + SAT + [
        "--deepspeed", "examples/sft/ds_zero2.json", "--save_strategy", "no",
        "--resume_from_checkpoint", resumed / "checkpoint-2",
        "--sat-selections-file", str(resumed) + "_sel{rank}.jsonl"]
    ok(run_sft(args, nproc=2))
    again = selections(root / "z2_resumed_sel0.jsonl")
    assert sorted(again) == [2, 3] and all(again[t] == sel0[t] for t in (2, 3))
    # the first LORS rung (t = 2) has ρ = 0.25: 36 of the 48 channels
    assert len(sel0[2]["mlp"][0]) == 36


def test_zero3_two_processes(setup):
    root, model, train, held = setup
    out = root / "z3"
    args = common(model, train, out, 2) + SAT + [
        "--eval_file", held, "--deepspeed", "examples/sft/ds_zero3.json",
        "--save_strategy", "no", "--sat-selections-file", str(out) + "_sel{rank}.jsonl"]
    res = run_sft(args, nproc=2)
    ok(res)
    sel0, sel1 = (selections(root / f"z3_sel{r}.jsonl") for r in (0, 1))
    assert sel0 == sel1 and sel0[0]["attn"][0] is not None  # sparse under ZeRO-3
    assert "eval_loss" in res.stdout
    # the saved folder is a plain HF checkpoint (gathered from the ZeRO-3 partitions)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out))
    start = AutoModelForCausalLM.from_pretrained(str(model))
    assert set(m.state_dict()) == set(start.state_dict())
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight,
                           start.model.layers[0].mlp.up_proj.weight)  # it trained


def test_single_process_packing_checkpointing_bf16(setup):
    root, model, train, _ = setup
    out = root / "single"
    args = common(model, train, out, 2) + SAT + [
        "--packing", "--max_seq_length", 64, "--activation_checkpointing", "--bf16", "--use_cpu",
        "--save_strategy", "no", "--sat-selections-file", str(out) + "_sel.jsonl",
        "--report_to", "tensorboard"]
    res = run_sft(args, env_extra={"TENSORBOARD_LOGGING_DIR": str(out / "tb")})
    ok(res)
    assert "64 lines -> 64 examples" in res.stdout
    assert selections(root / "single_sel.jsonl")[0]["mlp"][0] is not None
    # the SAT values reach the report_to integration (SATCallback runs ahead of it)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tb")).Reload()
    tags = ev.Tags()["scalars"]
    assert "train/sat/mlp_omission_rate" in tags and "train/sat/attn_kept_fraction" in tags
    assert ev.Scalars("train/sat/mlp_omission_rate")[0].value == 0.5


def test_one_line_errors(setup, tmp_path, capsys):
    from megatron_sat.hf.sft_main import main

    root, model, train, _ = setup
    cases = [
        (["--train_file", train], "required: --model_name_or_path"),
        (common(model, train, tmp_path / "o", 2) + ["--no-such-flag"], "--no-such-flag"),
        (common(model, tmp_path / "missing.jsonl", tmp_path / "o", 2), "does not exist"),
        (common(tmp_path, train, tmp_path / "o", 2), "no config.json"),
        (common(model, train, tmp_path / "o", 2) + ["--sat-metric", "wanda"], "without --sat"),
        (common(model, train, tmp_path / "o", 2) + ["--sat", "--sat-attn-omission-rate", "1.5"],
         "attn_omission_rate"),
    ]
    for args, needle in cases:  # in-process: every one fails before training starts
        code = main([str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
        assert err[0].startswith("sft_llama.py: error:")
    res = run_sft(cases[2][0])  # and through the script: exit code 2, no traceback
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
