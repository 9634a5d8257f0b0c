"""``SATCallback``: drive SAT from ``transformers.Trainer``.

Why ``state.global_step``: it counts completed optimizer steps, which is exactly the
``t`` of SAT_SPEC §3/§5.  It is the same for every gradient-accumulation micro-batch of a
step (so the layers' per-iteration selection cache is reused) and it is restored by
``resume_from_checkpoint`` (so a resumed run draws the selections and rates an
uninterrupted one draws: the draw depends on ``(seed, t, l, r)`` alone).
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from megatron_sat.control import set_sat_iteration
from megatron_sat.hf.apply import SATError, sat_config_of
from megatron_sat.schedule import omission_rates
from megatron_sat.selection import num_kept


def kept_fractions(model, iteration: int) -> dict:
    """Scheduled kept fractions at ``t``, averaged over layers (SAT_SPEC §2–§3, §5).

    Computed from the schedule and layer shapes rather than read back from the last
    forward, so an evaluation pass (always dense) does not distort the logged values.
    """
    config = sat_config_of(model)
    rho_attn, rho_mlp = omission_rates(config, iteration)
    q_frac, mlp_frac = [], []
    for module in model.modules():
        st = getattr(module, "sat_state", None)
        if st is None or not hasattr(module, "sat_setup"):
            continue
        if st.kind == "mlp":
            mlp_frac.append(num_kept(module.sat_channels, rho_mlp) / module.sat_channels)
        elif module.sat_q_per_group == 1:
            q_frac.append(num_kept(module.sat_groups, rho_attn) / module.sat_groups)
        else:
            q = module.sat_q_per_group
            q_frac.append(num_kept(q, rho_attn) / q)

    def mean(v):
        return sum(v) / len(v) if v else 1.0

    return {"attn": mean(q_frac), "mlp": mean(mlp_frac)}


class SATCallback(TrainerCallback):
    """Sets the SAT iteration before every step and logs the rates in force.

    Args:
        selections_file: append, after every optimizer step, the kept heads and channels
            of every layer as one JSON line ``{"step": t, "attn": [...], "mlp": [...]}``
            (``{rank}`` in the name is replaced by the process rank): to audit what SAT
            trained, or to compare runs (a resumed run must match an uninterrupted one).
        total_iters_from_trainer: check that the model's ``SATConfig.total_iters`` (the
            LORS ``t_end``) equals the Trainer's ``max_steps`` and refuse to train
            otherwise: a mismatch leaves the end of training sparse, or ends the ladder
            early.  Turn off only on purpose.

    Logged keys (through the Trainer's ``report_to`` integrations when this callback is
    ahead of them, see :func:`add_sat_callback`): ``sat/attn_omission_rate``,
    ``sat/mlp_omission_rate``, ``sat/attn_kept_fraction``, ``sat/mlp_kept_fraction``.
    """

    def __init__(self, total_iters_from_trainer: bool = True,
                 selections_file: Optional[str] = None):
        self.check_total = total_iters_from_trainer
        self.selections_file = selections_file

    @staticmethod
    def _model(kwargs):
        model = kwargs.get("model")
        if model is None or sat_config_of(model) is None:
            raise SATError("SATCallback: the Trainer's model has no SAT layers; call "
                           "megatron_sat.hf.apply_sat(model, SATConfig(...)) before Trainer")
        return model

    def on_train_begin(self, args, state, control, **kwargs):
        model = self._model(kwargs)
        config = sat_config_of(model)
        if self.check_total and state.max_steps and config.total_iters != state.max_steps:
            raise SATError(f"SATConfig.total_iters={config.total_iters} but the Trainer runs "
                           f"max_steps={state.max_steps}; build the SATConfig with "
                           f"total_iters={state.max_steps} so LORS ends dense at the last step")
        _register_zero3_external_parameters(model)
        set_sat_iteration(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        set_sat_iteration(self._model(kwargs), state.global_step)

    def on_substep_end(self, args, state, control, **kwargs):
        # Between micro-batches of one step: t is unchanged, so the cache is kept.
        set_sat_iteration(self._model(kwargs), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.selections_file:
            record_selections(self._model(kwargs), state.global_step - 1,
                              self.selections_file.replace("{rank}", str(args.process_index)))

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs):
        if logs is None or not any(k in logs for k in ("loss", "train_loss")):
            return
        model = self._model(kwargs)
        # The logged step has just completed: report the t it trained with.
        t = max(state.global_step - 1, 0)
        rho_attn, rho_mlp = omission_rates(sat_config_of(model), t)
        kept = kept_fractions(model, t)
        logs.update({"sat/attn_omission_rate": rho_attn, "sat/mlp_omission_rate": rho_mlp,
                     "sat/attn_kept_fraction": kept["attn"],
                     "sat/mlp_kept_fraction": kept["mlp"]})


def record_selections(model, step: int, path: str) -> None:
    """Append this step's cached selections (SAT_SPEC §3) of every SAT layer to ``path``."""
    import json

    out = {"step": step, "attn": [], "mlp": []}
    for module in model.modules():
        st = getattr(module, "sat_state", None)
        if st is None or not hasattr(module, "sat_setup"):
            continue
        sel = st.cached_selection()
        if st.iteration != step or sel is None:
            sel = None  # dense this step (ρ = 0 or evaluation only)
        elif isinstance(sel, tuple):
            sel = [t.tolist() for t in sel]
        else:
            sel = sel.tolist()
        out[st.kind].append(sel)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(out) + "\n")


def add_sat_callback(trainer, callback: Optional[SATCallback] = None) -> SATCallback:
    """Put a ``SATCallback`` first in ``trainer``'s callbacks; returns it.

    Why first: the Trainer hands one ``logs`` dict to its callbacks in order, and the
    ``report_to`` integrations (TensorBoard, W&B, ...) come before user callbacks, so a
    callback passed in ``callbacks=[...]`` adds its values after they have been written.
    """
    callback = callback or SATCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def _register_zero3_external_parameters(model) -> None:
    """Under ZeRO-3, let each SAT module's forward gather the weights it reads directly.

    The sparse path slices ``q_proj.weight`` and friends instead of calling the child's
    forward, so ZeRO-3 must gather them with the parent module (and again for its
    backward).  Parameters ZeRO-3 manages carry ``ds_id``; without ZeRO-3 this does nothing.
    """
    pairs = [(m, p) for m in model.modules() if hasattr(m, "sat_external_parameters")
             and getattr(m, "sat_state", None) is not None for p in m.sat_external_parameters()]
    if not pairs or not hasattr(pairs[0][1], "ds_id"):
        return
    import deepspeed

    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)
