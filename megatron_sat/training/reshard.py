"""Resume at another data-parallel size or ZeRO stage: the optimizer state, re-sharded.

Why: DeepSpeed's own loader needs the DP size and ZeRO stage the checkpoint was saved
with (else ``ZeRORuntimeException``), so a run saved on 16 GPUs could not resume on 8.
Megatron-DeepSpeed solves it with ``ds_to_universal`` plus ``--universal-checkpoint``;
we read the same DeepSpeed files directly, so every tensor is stored once
(see :mod:`megatron_sat.tools.ckpt_format`):

* ZeRO 1-2 (and bf16 at any stage but 3): each ``zero_pp_rank_D_mp_rank_XX_optim_states.pt``
  holds DP rank D's slice of the flat fp32 master weights and Adam moments, and
  ``param_slice_mappings`` says where each parameter's fragment lies in it; the fragments,
  taken in DP-rank order, are the parameter (flattened).
* ZeRO-0 fp32: ``mp_rank_XX_model_states.pt`` holds the full weights (``module``) and
  the torch optimizer's state (``optimizer``), indexed in our optimizer's group order.
* ZeRO-3: DeepSpeed's files hold per-parameter padded partitions; for these the full fp32
  weights and moments are written once more at save time as ``optim/mp_rank_XX.pt``
  (the one layout that still stores a second copy; see ckpt_format).

When the DP size or ZeRO stage of a resumed run differs from the checkpoint's, the engine
is built fresh and the full tensors are written into whatever partitions the new layout
gives this rank, through DeepSpeed's fragment mappings (``_hp_mapping``) or, at ZeRO-3,
its ``safe_set_full_*`` API; the result is the state an uninterrupted run would have, so
the loss curve continues.
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


def needs_full_copy(engine) -> bool:
    """Whether DeepSpeed's own files cannot be re-sharded (ZeRO-3): see the module doc."""
    return engine.zero_optimization_stage() == 3


def save_full_state(engine, ckpt, tp_rank: int, dp_rank: int, write: bool = True) -> None:
    """Collective: every rank gathers, DP rank 0 of each TP rank writes (unless ``write`` is
    False: a rank that already failed still joins the collectives, then writes nothing).

    Written into the checkpoint's temporary folder; ``checkpointing.save_checkpoint``
    fsyncs and renames it with the rest, so it is complete whenever ``latest`` names it.
    """
    state = gather_full_state(engine)
    if write and dp_rank == 0 and state:
        os.makedirs(os.path.join(ckpt, "optim"), exist_ok=True)
        torch.save(state, optim_file(str(ckpt), tp_rank))


def needs_reshard(head: dict, dp: int, zero_stage: int) -> bool:
    """True when the checkpoint's DP size or ZeRO stage differs from this run's."""
    saved_dp = int(head.get("world_size", 0)) // max(int(head.get("tp", 1)), 1)
    saved_zero = head.get("zero_stage")
    return saved_dp != dp or (saved_zero is not None and int(saved_zero) != zero_stage)


def _load(path, deepspeed: bool = True):
    from megatron_sat.tools.cli import ToolError
    from megatron_sat.tools.file_checks import load_torch_file

    try:  # weights_only (DeepSpeed's plain-data classes only): no code runs
        return load_torch_file(path, "checkpoint file", "the checkpoint is truncated or "
                               "corrupt; load another one, or resume at its own DP size",
                               mmap=False, deepspeed=deepspeed)
    except ToolError as exc:
        raise ConfigError(str(exc)) from None


def _from_zero_shards(ckpt: str, tp_rank: int, dp: int) -> dict:
    """Full fp32 weights and moments from DeepSpeed's ZeRO-1/2 (or bf16) optimizer shards."""
    pieces: dict = {}
    step = 0.0
    for d in range(dp):
        path = os.path.join(ckpt, f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt")
        if not os.path.isfile(path):
            raise ConfigError(f"--load {ckpt} lacks {os.path.basename(path)}; the checkpoint "
                              f"is incomplete")
        osd = _load(path)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            fp32 = osd["single_partition_of_fp32_groups"][g]
            st = states.get(g, {})
            if "step" in st:
                step = float(st["step"])
            for name, addr in mapping.items():
                sl = [fp32.narrow(0, addr.start, addr.numel)]
                for k in ADAM_KEYS:
                    sl.append(st[k].narrow(0, addr.start, addr.numel) if k in st
                              else torch.zeros(addr.numel))
                pieces.setdefault(name, []).append(sl)
    params = {name: {k: torch.cat([sl[i] for sl in frags]).float()
                     for i, k in enumerate(("fp32",) + ADAM_KEYS)}
              for name, frags in pieces.items()}
    return {"step": step, "params": params}


def _from_zero0(ckpt: str, tp_rank: int, engine) -> dict:
    """ZeRO-0 fp32: full weights and the torch optimizer's state from the model-state file.

    The torch state is indexed by position in our optimizer's groups: decayed (>= 2-D)
    parameters, then the others, each in ``named_parameters`` order (engine.build_optimizer).
    """
    sd = _load(os.path.join(ckpt, f"mp_rank_{tp_rank:02d}_model_states.pt"))
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    order = [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]
    opt = (sd.get("optimizer") or {}).get("state", {})
    step, params = 0.0, {}
    for i, name in enumerate(order):
        st = opt.get(i, {})
        if "step" in st:
            step = float(st["step"])
        w = sd["module"][name].float()
        params[name] = {"fp32": w, **{k: st[k].float() if k in st else torch.zeros_like(w)
                                      for k in ADAM_KEYS}}
    return {"step": step, "params": params}


def full_state(engine, ckpt, tp_rank: int, head: dict) -> dict:
    """This TP rank's full optimizer state from the checkpoint, whatever its DP layout."""
    ckpt = str(ckpt)
    path = optim_file(ckpt, tp_rank)
    if os.path.isfile(path):
        return _load(path, deepspeed=False)
    dp = int(head["world_size"]) // int(head["tp"])
    if int(head.get("zero_stage") or 0) == 3:
        raise ConfigError(f"--load {ckpt} (ZeRO-3) has no {path}, so it can only resume at its "
                          f"own DP size {dp} and ZeRO stage 3")
    if not os.path.isfile(os.path.join(ckpt, f"zero_pp_rank_0_mp_rank_{tp_rank:02d}"
                                             f"_optim_states.pt")):
        return _from_zero0(ckpt, tp_rank, engine)
    state = _from_zero_shards(ckpt, tp_rank, dp)
    for name, p in engine.module.named_parameters():  # flat fragments -> parameter shapes
        shape = getattr(p, "ds_shape", p.shape)
        if name in state["params"]:
            state["params"][name] = {k: v.view(shape)
                                     for k, v in state["params"][name].items()}
    return state


def load_full_state(engine, ckpt, tp_rank: int, head: dict) -> None:
    """Write the checkpoint's full state into this run's partitions (no collectives)."""
    path = str(ckpt)
    state = full_state(engine, ckpt, tp_rank, head)
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
