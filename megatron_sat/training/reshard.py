"""Resume at another data-parallel size or ZeRO stage: full optimizer state, re-sharded.

Why: DeepSpeed's own checkpoint stores the optimizer state partitioned by DP rank, so a
run saved on 16 GPUs cannot resume on 8 (``ZeRORuntimeException``). Besides DeepSpeed's
files, every checkpoint therefore holds, per TP rank, the *full* fp32 master weights and
Adam moments by parameter name (``optim/mp_rank_XX.pt``, written by DP rank 0). When the
DP size or ZeRO stage of a resumed run differs from the checkpoint's, the engine is built
fresh and these tensors are written into whatever partitions the new layout gives this
rank, through DeepSpeed's fragment mappings (``_hp_mapping``); the result is the state
an uninterrupted run would have, so the loss curve continues (Megatron-DeepSpeed reaches
the same with ``ds_to_universal`` plus ``--universal-checkpoint``).

Supported: ZeRO stages 0-3, fp32 and bf16, in any combination (ZeRO-3 goes through
DeepSpeed's ``safe_get/set_full_*`` API, which all-gathers its parameter partitions).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_sat.training.configs import ConfigError

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def optim_file(ckpt: str, tp_rank: int) -> str:
    return os.path.join(ckpt, "optim", f"mp_rank_{tp_rank:02d}.pt")


def _flat_partitions(zero_opt) -> Optional[list]:
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zero_opt, name):
            return getattr(zero_opt, name)
    return None


def _step_value(optimizer) -> float:
    for st in optimizer.state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def _base_optimizer(engine):
    """The torch optimizer: DeepSpeed's ZeRO/bf16 wrappers keep it as ``.optimizer``."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def gather_full_state(engine) -> dict:
    """Collective over DP: this TP rank's full fp32 params and Adam moments, on CPU.

    Each DP rank contributes the fragment of every parameter its partition owns (zeros
    elsewhere) and one all-reduce per parameter assembles it; every rank takes part in
    every all-reduce, also for parameters it owns no fragment of.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    optimizer = _base_optimizer(engine)
    flats = _flat_partitions(engine.optimizer)
    out = {"step": _step_value(optimizer), "params": {}}
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 3:
            full = _gather_zero3(engine.optimizer, optimizer, p)
        elif flats is None:  # ZeRO-0 fp32: the torch optimizer holds the parameters
            st = optimizer.state.get(p, {})
            full = [p.detach().float()] + [st.get(k, torch.zeros_like(p, dtype=torch.float32))
                                           for k in ADAM_KEYS]
        else:
            buf = torch.zeros(1 + len(ADAM_KEYS), p.numel(), dtype=torch.float32,
                              device=p.device)
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                flat = flats[m.param_group_index]
                st = optimizer.state.get(flat, {})
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                for i, src in enumerate([flat] + [st.get(k) for k in ADAM_KEYS]):
                    if src is not None:
                        buf[i].narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start,
                                                                              hp.numel))
            dist.all_reduce(buf, group=ps.get_data_parallel_group())
            full = [row.view_as(p) for row in buf]
        out["params"][name] = {k: v.detach().float().cpu().clone()
                               for k, v in zip(("fp32",) + ADAM_KEYS, full)}
    return out


def _gather_zero3(z3, optimizer, p) -> list:
    """ZeRO-3: every rank all-gathers each tensor (the partitions hold no whole parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    group = z3.grad_position[z3.get_param_id(p)][0]
    stepped = z3.fp32_partitioned_groups_flat[group] in optimizer.state
    full = [safe_get_full_fp32_param(p)]
    for key in ADAM_KEYS:
        full.append(safe_get_full_optimizer_state(p, key) if stepped
                    else torch.zeros(p.ds_shape, dtype=torch.float32))
    return full


def _load_zero3(z3, optimizer, named: dict, state: dict, step: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for flat in z3.fp32_partitioned_groups_flat:
        optimizer.state[flat] = {"step": step.clone(),
                                 **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
    for name, p in named.items():
        src = state["params"][name]
        safe_set_full_fp32_param(p, src["fp32"].to(p.ds_tensor.device))
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(p, src[key].to(p.ds_tensor.device), key)


def save_full_state(engine, ckpt: str, tp_rank: int, dp_rank: int) -> None:
    """Collective: every rank gathers, DP rank 0 of each TP rank writes."""
    state = gather_full_state(engine)
    if dp_rank == 0 and state:
        os.makedirs(os.path.join(ckpt, "optim"), exist_ok=True)
        path = optim_file(ckpt, tp_rank)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)


def needs_reshard(head: dict, dp: int, zero_stage: int) -> bool:
    """True when the checkpoint's DP size or ZeRO stage differs from this run's."""
    saved_dp = int(head.get("world_size", 0)) // max(int(head.get("tp", 1)), 1)
    saved_zero = head.get("zero_stage")
    return saved_dp != dp or (saved_zero is not None and int(saved_zero) != zero_stage)


def load_full_state(engine, ckpt: str, tp_rank: int, head: dict) -> None:
    """Write the checkpoint's full state into this run's partitions (no collectives)."""
    path = optim_file(ckpt, tp_rank)
    if not os.path.isfile(path):
        raise ConfigError(f"--load {ckpt} has no {path} (saved by an older version), so it "
                          f"can only resume at its own DP size {head['world_size'] // head['tp']}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - set(state["params"]))
    if missing:
        raise ConfigError(f"{path} lacks {missing[0]} (and {len(missing) - 1} more); it does not "
                          f"match this model")
    zero_opt, optimizer = engine.optimizer, _base_optimizer(engine)
    flats = _flat_partitions(zero_opt)
    step = torch.tensor(state["step"], dtype=torch.float32)
    with torch.no_grad():
        if engine.zero_optimization_stage() == 3:
            _load_zero3(zero_opt, optimizer, named, state, step)
        elif flats is not None:  # ZeRO-1/2 or bf16: flat fp32 partitions own the state
            base = optimizer
            for flat in flats:
                base.state[flat] = {"step": step.clone(),
                                    **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
            for name, p in named.items():
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    continue  # no fragment of this parameter on this DP rank
                flat = flats[m.param_group_index]
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                src = state["params"][name]
                for key, dst in (("fp32", flat), *((k, base.state[flat][k]) for k in ADAM_KEYS)):
                    value = src[key].to(dst.device).flatten().narrow(0, lp.start, lp.numel)
                    dst.narrow(0, hp.start, hp.numel).copy_(value)
                p.data.copy_(src["fp32"].to(p.device, p.dtype))
            if hasattr(zero_opt, "_hp_optimizer_states_linked"):
                zero_opt._hp_optimizer_states_linked = False  # re-link to the new state
        else:  # ZeRO-0 fp32: the torch optimizer holds the parameters themselves
            for name, p in named.items():
                src = state["params"][name]
                p.data.copy_(src["fp32"].to(p.device, p.dtype))
                optimizer.state[p] = {"step": step.clone(),
                                      **{k: src[k].to(p.device) for k in ADAM_KEYS}}


def state_from_header(head: dict) -> dict:
    """Iteration, consumed samples and skipped iterations recorded in ``meta.json``."""
    return {"iteration": int(head.get("iteration", 0)),
            "consumed_samples": int(head.get("consumed_samples", 0)),
            "skipped_iters": int(head.get("skipped_iters", 0))}
