"""Measure the sampling temperature's effect on SAT training, to justify its default.

Trains the same tiny Llama on real Chinese news (fetched by tools/fetch_demo_data.py)
dense, with SAT ``topk``, and with SAT ``sampling`` at several temperatures, all with the
LORS schedule, several seeds each, and reports the median final validation loss.
Run: ``python benchmarks/temperature_sweep.py [--steps 160 --seeds 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import sentencepiece as spm
import torch

from megatron_sat.config import SATConfig
from megatron_sat.control import set_sat_iteration
from megatron_sat.model import LlamaShape, build_gpt_model
from megatron_sat.parallel import initialize_parallel
from megatron_sat.tools.fetch_demo_data import fetch_demo_data


def load_tokens(seq: int, max_chars: int = 1_500_000):
    data = fetch_demo_data(log=lambda s: None)
    sp = spm.SentencePieceProcessor(model_file=str(data.tokenizer_model))
    text = data.zh_news.read_text(encoding="utf-8")[:max_chars]
    ids = []
    for line in text.splitlines():
        if line.strip():
            ids.extend(sp.encode(line) + [sp.eos_id()])
    n = len(ids) // (seq + 1)
    chunks = torch.tensor(ids[: n * (seq + 1)]).view(n, seq + 1)
    n_val = max(16, n // 20)
    return chunks[n_val:], chunks[:n_val], sp.get_piece_size()


def run(variant, seed, train, val, vocab, steps, args):
    torch.manual_seed(seed)
    shape = LlamaShape(2, 256, 704, 8, 8, vocab_size=vocab, max_position_embeddings=args.seq)
    sat = None
    if variant != "dense":
        selection, temperature = ("topk", 1.0) if variant == "topk" else ("sampling", variant)
        sat = SATConfig(selection=selection, temperature=float(temperature), schedule="ladder",
                        total_iters=steps, decay_start=0, ladder_rungs=4, seed=seed)
    model = build_gpt_model(shape, sat, seq_length=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(args.seq).expand(args.batch, -1)
    model.train()
    for it in range(steps):
        set_sat_iteration(model, it)
        batch = train[torch.randint(0, len(train), (args.batch,), generator=g)]
        loss = model(batch[:, :-1], pos, None, labels=batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        vpos = torch.arange(args.seq).expand(len(val), -1)
        return model(val[:, :-1], vpos, None, labels=val[:, 1:]).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--temperatures", default="0.25,0.5,1,2,4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="write results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    initialize_parallel(1)
    train, val, vocab = load_tokens(args.seq)
    val = val[:32]
    variants = ["dense", "topk"] + args.temperatures.split(",")
    results = {v: [] for v in variants}
    for seed in range(args.seeds):
        for v in variants:
            t0 = time.time()
            results[v].append(run(v, 1000 + seed, train, val, vocab, args.steps, args))
            print(f"seed {seed} {v:>6}: val loss {results[v][-1]:.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    print("\n| variant | median val loss | runs |\n|---|---|---|")
    for v in variants:
        name = v if v in ("dense", "topk") else f"sampling T={v}"
        print(f"| {name} | {statistics.median(results[v]):.4f} | "
              f"{', '.join(f'{x:.4f}' for x in results[v])} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
