"""Shared helpers for the tools tests: demo data, tiny HF Llama models, TP forward workers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_data():
    """The real demo files, fetched once into ``$MEGATRON_SAT_CACHE`` (or the default)."""
    from megatron_sat.tools.fetch_demo_data import fetch_demo_data

    return fetch_demo_data(os.environ.get("MEGATRON_SAT_CACHE"), log=lambda s: None)


def make_tiny_hf_llama(folder, *, heads=4, kv_heads=4, hidden=64, ffn=96, layers=2, vocab=300,
                       seed=0, dtype=torch.float32, max_pos=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0):
    """Save a tiny random ``LlamaForCausalLM`` with ``save_pretrained``; returns the model.

    Weights are re-drawn with a larger std than HF's default 0.02 and norm weights are
    randomised, so a wrong layout (swapped heads, gate/up, rows) changes logits visibly.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                         rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
                         tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model = model.to(dtype).eval()
    model.save_pretrained(str(folder))
    return model


def hf_logits(folder, ids):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def megatron_logits_tp(rank, world_size, jobs, ids):
    """Worker: TP forward of converted checkpoints; rank 0 saves the gathered logits.

    ``jobs`` is a list of ``(checkpoint_dir, output_file)``: one process start serves all.
    """
    import torch.distributed as dist

    from megatron_sat.model import build_gpt_model
    from megatron_sat.parallel import destroy_parallel, initialize_parallel
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint, load_state_dict_into

    initialize_parallel(tensor_model_parallel_size=world_size)
    try:
        for ckpt_dir, out_file in jobs:
            ckpt = load_megatron_checkpoint(ckpt_dir, tp_rank=rank)
            assert ckpt.tp == world_size
            model = build_gpt_model(ckpt.shape, tp=world_size)
            load_state_dict_into(model, ckpt.model(rank))
            model.eval()
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            with torch.no_grad():
                local = model(ids, pos, None).contiguous()  # [b, s, padded/tp]
            parts = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(parts, local)
            if rank == 0:
                full = torch.cat(parts, dim=-1)[..., : ckpt.shape.vocab_size]  # [b, s, vocab]
                torch.save(full, out_file)
    finally:
        destroy_parallel()


def run_tool(script, *args, env=None):
    """Run ``tools/<script>`` as a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=str(REPO))


def assert_one_line_error(rc, stderr, *needles):
    """CLI contract: non-zero exit, ``error: ...`` on stderr, no traceback."""
    assert rc != 0
    lines = [l for l in stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], lines[0]
