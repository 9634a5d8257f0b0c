"""Crash safety of checkpoints with real trainer processes (issue 12).

* chaos: a 12-iteration run with ``--save-interval 1`` is SIGKILLed at 5 seeded moments
  (some inside a save), restarted each time with the same command line, and ends
  bit-equal (weights and Adam states) to an uninterrupted run; no folder under a final
  ``iter_*`` name is ever incomplete; ``--keep-last-n-checkpoints 2`` keeps exactly two;
* the checkpoint holds each tensor once (bytes on disk against the parameter count), and
  the tools still convert it;
* a full disk (ENOSPC injected into ``torch.save``) keeps the previous checkpoint
  loadable and ends with one line saying the disk is full.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from test_train_common import REPO, TINY, make_data, run_trainer

ITERS = 12


def _args(tmp_path, save):
    return TINY + ["--data-path", str(tmp_path / "data"), "--split", "90,10,0",
                   "--data-cache-path", str(tmp_path / "cache"), "--global-batch-size", "2",
                   "--train-iters", str(ITERS), "--lr", "5e-3", "--eval-iters", "0",
                   "--log-interval", "1", "--save-interval", "1",
                   "--keep-last-n-checkpoints", "2", "--save", str(save), "--load", str(save)]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _latest(save):
    p = os.path.join(save, "latest")
    return int(open(p).read().strip()[5:]) if os.path.isfile(p) else 0


def _assert_final_names_complete(save):
    from megatron_sat.tools.file_checks import load_torch_file

    for name in os.listdir(save) if os.path.isdir(save) else []:
        if name.startswith("iter_"):
            d = os.path.join(save, name)
            assert os.path.isfile(os.path.join(d, "meta.json")), d
            for f in ("mp_rank_00_model_states.pt", "rng/rank_00000.pt"):
                load_torch_file(os.path.join(d, f), "checkpoint file", "")  # complete


def _kill_once(cmd, save, rng, in_save):
    """Start the run; SIGKILL it inside a save of a seeded iteration, or a seeded delay
    after its first new checkpoint. Returns a description of the moment."""
    start = _latest(save)
    target = min(ITERS, start + rng.randint(1, 3))
    delay = rng.uniform(0.0, 0.03 if in_save else 0.08)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tmp = os.path.join(save, f".iter_{target:07d}.tmp")
    deadline = time.time() + 120
    seen = False
    while proc.poll() is None and time.time() < deadline:
        if (in_save and os.path.isdir(tmp)) or (not in_save and _latest(save) > start):
            seen = True
            time.sleep(delay)
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and seen  # killed mid-run, at the chosen moment
    return ("in save of" if in_save else "after a save past") + f" {target}, +{delay:.3f}s"


def _state(save):
    sd = torch.load(os.path.join(save, f"iter_{ITERS:07d}", "mp_rank_00_model_states.pt"),
                    weights_only=True)
    opt = sd["optimizer"]["state"]
    return sd["module"], {k: opt[k] for k in sorted(opt)}


def test_sigkill_chaos_resumes_bit_exact(tmp_path):
    make_data(str(tmp_path / "data"), n_docs=100)
    ref, chaos = tmp_path / "ref", tmp_path / "chaos"
    run_trainer(_args(tmp_path, ref))
    rng = random.Random(12)
    cmd = [sys.executable, os.path.join(REPO, "pretrain_llama.py")] + _args(tmp_path, chaos)
    moments = []
    for k in range(5):  # 3 kills inside a save, 2 at random moments of training
        moments.append(_kill_once(cmd, str(chaos), rng, in_save=k % 2 == 0))
        _assert_final_names_complete(str(chaos))
    assert sum(m.startswith("in save") for m in moments) >= 2, moments
    print("SIGKILL moments:", moments)
    proc = run_trainer(_args(tmp_path, chaos))
    assert "resumed from" in proc.stdout, moments
    (m_ref, o_ref), (m_chaos, o_chaos) = _state(ref), _state(chaos)
    assert m_ref.keys() == m_chaos.keys() and o_ref.keys() == o_chaos.keys()
    for k in m_ref:
        if torch.is_tensor(m_ref[k]):
            assert torch.equal(m_ref[k], m_chaos[k]), (k, moments)
    for k in o_ref:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(o_ref[k][name]),
                               torch.as_tensor(o_chaos[k][name])), (k, name, moments)
    for save in (ref, chaos):  # --keep-last-n-checkpoints 2 through 12 saves
        assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == \
            ["iter_0000011", "iter_0000012"]
        assert not [n for n in os.listdir(save) if n.startswith(".iter_")]
    _check_one_copy_and_tools(ref, tmp_path)


def _check_one_copy_and_tools(save, tmp_path):
    """Bytes on disk = weights once + Adam's two moments (fp32), plus small overhead."""
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint
    from megatron_sat.tools.convert_checkpoint import convert_megatron_to_hf
    from megatron_sat.tools.hf_llama import load_hf_state_dict

    it = os.path.join(save, f"iter_{ITERS:07d}")
    module, _ = _state(save)
    params = sum(v.numel() for v in module.values() if torch.is_tensor(v))
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(it) for f in fs)
    assert 12 * params <= on_disk < 12 * params * 1.05 + 200_000, (on_disk, params)
    ckpt = load_megatron_checkpoint(save)  # the tools read the trainer's DeepSpeed file
    assert ckpt.iteration == ITERS
    convert_megatron_to_hf(save, tmp_path / "hf_out")
    hf = load_hf_state_dict(tmp_path / "hf_out")
    assert torch.equal(hf["model.embed_tokens.weight"],
                       module["embedding.word_embeddings.weight"][:512])


SITECUSTOMIZE = '''
import errno, os
_tag = os.environ.get("MSAT_TEST_ENOSPC_IN")
if _tag:
    import torch
    _orig = torch.save
    def _save(obj, f, *a, **k):
        if _tag in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return _orig(obj, f, *a, **k)
    torch.save = _save
'''


def test_disk_full_keeps_previous_checkpoint(tmp_path):
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint
    from megatron_sat.training.resume import _check_files

    make_data(str(tmp_path / "data"), n_docs=60)
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    save = tmp_path / "ckpt"
    args = _args(tmp_path, save)
    args[args.index("--train-iters") + 1] = "4"
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{REPO}",
           "MSAT_TEST_ENOSPC_IN": ".iter_0000003.tmp"}
    proc = run_trainer(args, check=False, env_extra=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "disk full" in err[0] and "iteration 3" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert not [n for n in os.listdir(save) if n.startswith(".iter_")]
    note = json.loads((save / "save_failed.json").read_text())
    assert note["iteration"] == 3 and note["latest_complete"] == "iter_0000002"
    _check_files(save / "iter_0000002")  # every file loads
    assert load_megatron_checkpoint(save).iteration == 2
    # space is back: an explicit --ckpt-step resumes from an older complete checkpoint
    proc = run_trainer(args + ["--ckpt-step", "1"])
    assert f"resumed from {save / 'iter_0000001'} at iteration 1" in proc.stdout
    assert (save / "latest").read_text().strip() == "iter_0000004"
    assert not (save / "save_failed.json").exists()
