"""``apply_sat`` / ``remove_sat``: turn SAT on and off in a Hugging Face Llama-layout model.

Why a per-instance class swap: each decoder layer's ``self_attn`` and ``mlp`` become
instances of ``SAT<StockClass>`` (a subclass, :mod:`megatron_sat.hf.layers`) with the
same ``__dict__``: parameters, buffers, child modules, hooks and names stay exactly what
they were.  ``state_dict`` keys do not change, ``save_pretrained`` writes a plain HF
checkpoint, and modules already partitioned by DeepSpeed ZeRO-3 (``from_pretrained``
under ``HfDeepSpeedConfig``) are not re-allocated.  No global is patched: other models
in the process are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sat.config import SATConfig
from megatron_sat.hf.layers import SATAttentionMixin, SATMLPMixin, TokenMask, sat_class

# model_type -> (attention class, MLP class) in transformers.models.<type>.modeling_<type>.
# These share Llama's attention (separate q/k/v/o projections, RoPE, GQA via repeat_kv)
# and SwiGLU MLP (gate/up/down).  Mistral and Qwen2 add sliding windows, which live in
# the mask HF builds, and Qwen2 adds Q/K/V biases, which follow their rows (§4).
SUPPORTED = {
    "llama": ("LlamaAttention", "LlamaMLP"),
    "mistral": ("MistralAttention", "MistralMLP"),
    "qwen2": ("Qwen2Attention", "Qwen2MLP"),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
ACTIVATIONS = ("silu", "swish")


class SATError(ValueError):
    """A model or setting SAT cannot run on; the message says what to change."""


@dataclass
class SATHandle:
    """What ``apply_sat`` leaves on the decoder stack (``model.model.sat_handle``)."""

    config: SATConfig
    token_mask: TokenMask
    hook: torch.utils.hooks.RemovableHandle


def _stock_classes(model_type: str):
    import importlib

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    attn_name, mlp_name = SUPPORTED[model_type]
    return getattr(module, attn_name), getattr(module, mlp_name)


def _decoder(model):
    """The module holding ``layers`` (``LlamaModel``) of a ``*ForCausalLM`` or bare model."""
    base = getattr(model, "base_model", model)
    if not hasattr(base, "layers") and hasattr(base, "model"):
        base = base.model  # e.g. a PEFT wrapper around a *ForCausalLM
    if not isinstance(getattr(base, "layers", None), torch.nn.ModuleList):
        raise SATError(f"{type(model).__name__} has no decoder layer list; pass a Llama-layout "
                       f"transformers model such as LlamaForCausalLM")
    return base


def _check(model, config: SATConfig) -> None:
    hf = getattr(model, "config", None)
    model_type = getattr(hf, "model_type", None)
    problems = []
    if model_type not in SUPPORTED:
        raise SATError(f"apply_sat supports model types {', '.join(SUPPORTED)}, not "
                       f"{model_type!r} ({type(model).__name__})")
    if getattr(hf, "hidden_act", "silu") not in ACTIVATIONS:
        problems.append(f"hidden_act={hf.hidden_act!r} is not SwiGLU (needs 'silu')")
    impl = getattr(hf, "_attn_implementation", None) or "eager"
    if impl not in ATTN_IMPLEMENTATIONS:
        problems.append(f"attn_implementation={impl!r}: load the model with "
                        f"attn_implementation='sdpa' (flash kernels on GPU) or 'eager'")
    if not isinstance(config, SATConfig):
        problems.append(f"config must be a megatron_sat.SATConfig, got {type(config).__name__}")
    if problems:
        raise SATError("apply_sat: " + "; ".join(problems))


def apply_sat(model, config: SATConfig):
    """Swap every decoder layer's attention and MLP for its SAT version; returns ``model``.

    Layer ``i`` (0-based) is megatron's layer number ``i + 1``, so a selection draws from
    the same ``(seed, t, l)`` stream as the megatron-core integration (SAT_SPEC §3).
    Call :func:`megatron_sat.set_sat_iteration` (or use :class:`SATCallback`) before
    each training step; evaluation and generation always run the stock dense layers.
    """
    _check(model, config)
    decoder = _decoder(model)
    if getattr(decoder, "sat_handle", None) is not None:
        raise SATError("apply_sat was already applied to this model; call remove_sat first")
    attn_cls, mlp_cls = _stock_classes(model.config.model_type)
    token_mask = TokenMask()
    swapped = []
    try:
        for i, layer in enumerate(decoder.layers):
            for name, stock, mixin in (("self_attn", attn_cls, SATAttentionMixin),
                                       ("mlp", mlp_cls, SATMLPMixin)):
                module = getattr(layer, name)
                if type(module) is not stock:
                    raise SATError(f"apply_sat: layer {i}.{name} is a {type(module).__name__}, "
                                   f"not {stock.__name__}; apply SAT to an unwrapped "
                                   f"{model.config.model_type} model")
                module.__class__ = sat_class(stock, mixin)
                swapped.append(module)
                module.sat_setup(config, i + 1, token_mask)
    except (SATError, ValueError) as exc:
        for module in swapped:  # all or nothing
            module.__dict__.pop("sat_state", None)
            module.__class__ = module._sat_stock_class
        raise SATError(str(exc) if isinstance(exc, SATError) else f"apply_sat: {exc}") from None
    hook = decoder.register_forward_pre_hook(_capture_padding(token_mask), with_kwargs=True)
    decoder.sat_handle = SATHandle(config, token_mask, hook)
    return model


def _capture_padding(token_mask: TokenMask):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        token_mask.mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
    return hook


def remove_sat(model):
    """Restore the stock attention and MLP classes; returns ``model``."""
    decoder = _decoder(model)
    handle: Optional[SATHandle] = getattr(decoder, "sat_handle", None)
    if handle is None:
        raise SATError("remove_sat: this model has no SAT layers (apply_sat was not called)")
    for layer in decoder.layers:
        for name in ("self_attn", "mlp"):
            module = getattr(layer, name)
            stock = getattr(type(module), "_sat_stock_class", None)
            if stock is not None:
                module.sat_teardown()
                module.__class__ = stock
    handle.hook.remove()
    del decoder.sat_handle
    return model


def sat_config_of(model) -> Optional[SATConfig]:
    """The ``SATConfig`` applied to ``model``, or ``None``."""
    handle = getattr(_decoder(model), "sat_handle", None)
    return handle.config if handle is not None else None
