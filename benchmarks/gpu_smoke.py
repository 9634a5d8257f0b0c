"""bf16 smoke of the SAT training path on one device (part of ``gpu_check.sh``).

A tiny megatron-core GPTModel with SAT layers, in bf16, with the run's attention backend
(``auto``: flash when installed, else SDPA):

1. trains 50 steps at ρ = 0.5 (maxip + sampling) and its loss falls;
2. at rate 0 it equals the stock dense model bit for bit (loss and every gradient);
3. full activation recomputation gives bit-equal gradients at ρ = 0.5 (where the
   backward kernels are deterministic; otherwise within their own run-to-run spread).

Writes ``gpu_smoke.json`` / ``.md`` in ``--output-dir``; exits 1 if a check fails.
Runs on CPU too (``--device cpu``), which is how it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _model(shape, sat, backend, device, **settings):
    from megatron_sat.model import build_gpt_model

    torch.manual_seed(0)
    return build_gpt_model(shape, sat, attention_backend=backend, params_dtype=torch.bfloat16,
                           **settings).to(device=device, dtype=torch.bfloat16).train()


def _batch(device, vocab, seq, b=4):
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(3, vocab, (b, 9), generator=g)
    tokens = motif.repeat(1, seq // 9 + 2)[:, :seq + 1].to(device)  # learnable repeats
    return tokens[:, :-1], tokens[:, 1:], torch.arange(seq, device=device).expand(b, seq)


def _step(model, batch, it):
    from megatron_sat.control import set_sat_iteration

    set_sat_iteration(model, it)
    ids, labels, pos = batch
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    return loss.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--output-dir", default="benchmarks/out")
    args = p.parse_args(argv)

    from megatron_sat.config import SATConfig
    from megatron_sat.core_attention import resolve_attention_backend
    from megatron_sat.model import LlamaShape
    from megatron_sat.parallel import initialize_parallel

    device = torch.device(args.device)
    initialize_parallel(1, seed=0)
    backend = resolve_attention_backend(args.attention, device.type, torch.bfloat16)
    shape = LlamaShape(2, 256, 704, 8, 4, vocab_size=512, max_position_embeddings=256)
    seq = 256
    batch = _batch(device, shape.vocab_size, seq)
    checks, t0 = {}, time.perf_counter()

    sat = SATConfig(schedule="constant", attn_omission_rate=0.5, mlp_omission_rate=0.5,
                    total_iters=10 ** 6)
    model = _model(shape, sat, backend, device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for it in range(args.steps):
        opt.zero_grad(set_to_none=True)
        losses.append(float(_step(model, batch, it)))
        opt.step()
    checks["loss_falls"] = bool(losses[-1] < 0.5 * losses[0] and
                                all(map(lambda v: v == v, losses)))

    dense = _model(shape, None, backend, device)
    rate0 = _model(shape, sat.replace(attn_omission_rate=0.0, mlp_omission_rate=0.0),
                   backend, device)
    rate0.load_state_dict(dense.state_dict())
    same = torch.equal(_step(dense, batch, 0), _step(rate0, batch, 0))
    grads = dict(rate0.named_parameters())
    same &= all(torch.equal(q.grad, grads[n].grad) for n, q in dense.named_parameters())
    checks["rate0_equals_dense"] = bool(same)

    plain = _model(shape, sat, backend, device)
    full = _model(shape, sat, backend, device, recompute_granularity="full",
                  recompute_method="uniform", recompute_num_layers=1)
    full.load_state_dict(plain.state_dict())

    def grads(m):
        m.zero_grad(set_to_none=True)
        _step(m, batch, 7)
        return {n: q.grad.clone() for n, q in m.named_parameters()}

    def max_diff(a, b):
        return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)

    g_plain, g_again, g_full = grads(plain), grads(plain), grads(full)
    # GPU attention backward kernels may accumulate with atomics: measure that first.
    deterministic = max_diff(g_plain, g_again) == 0.0
    diff = max_diff(g_plain, g_full)
    checks["recompute_grads_bit_equal"] = diff == 0.0 if deterministic \
        else diff <= 4 * max(max_diff(g_plain, g_again), 1e-6)

    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "attention_backend": backend, "dtype": "bf16",
           "shape": shape.to_dict(), "seq_length": seq, "steps": args.steps,
           "loss_first": losses[0], "loss_last": losses[-1], "checks": checks,
           "backward_deterministic": deterministic, "recompute_max_abs_grad_diff": diff,
           "seconds": time.perf_counter() - t0}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(res, indent=2))
    md = (f"**bf16 smoke** — {res['device']}, torch {res['torch']}, attention {backend}: "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f} over {args.steps} SAT steps (ρ = 0.5); "
          + ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    (out / "gpu_smoke.md").write_text(md + "\n")
    print(md)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
