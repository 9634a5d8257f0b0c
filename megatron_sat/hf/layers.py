"""SAT versions of Hugging Face Llama-layout attention and SwiGLU MLP modules.

SAT_SPEC §2 (heads and channels as units, GQA), §3 (one selection per iteration) and §4
(compute on the kept slices).  Why subclasses of the *stock* classes, swapped in per
instance by :mod:`megatron_sat.hf.apply`: the module keeps its own parameters, hooks and
names (``q_proj``, ``gate_proj``, ...), so ``state_dict`` keys, ``save_pretrained``,
DeepSpeed ZeRO-3's partitioning hooks and PEFT wrapping are untouched; the dense path is
the stock ``forward`` itself (bit-identical at ``ρ = 0``, in evaluation and in
generation), and only a training forward at ``ρ > 0`` runs the sparse code below.

The selection pipeline is :mod:`megatron_sat.unit_selection`, the same one the
megatron-core layers call: this file only says how HF's separate ``q/k/v_proj`` and
``gate/up_proj`` weights map to the ``[ng, q + 2]`` head sums and ``[2f]`` channel scores.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sat import ops
from megatron_sat.importance import scores_from_stats
from megatron_sat.sat_state import SATLayerState
from megatron_sat.unit_selection import select_heads, select_channels


class TokenMask:
    """The current batch's 2-D padding mask, shared by every SAT layer of one model.

    Why: HF hands attention a 4-D mask and the MLP nothing, but the input statistics of
    SAT_SPEC §3 should describe real tokens, not padding.  A forward pre-hook on the
    decoder stack (installed by ``apply_sat``) stores ``attention_mask`` ``[b, s]`` here.
    """

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[b, s, h]`` → the rows of real (unpadded) tokens ``[n, h]``."""
        m = self.mask
        if m is None or m.dim() != 2 or tuple(m.shape) != tuple(x.shape[:2]) or bool(m.all()):
            return x
        return x[m.to(device=x.device, dtype=torch.bool)]


def _amp_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when ``x``'s device runs under ``torch.autocast`` (HF ``--bf16``
    without DeepSpeed), else ``None``."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _param(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]):
    """``t`` in the compute dtype (a differentiable cast, as autocast itself makes)."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def _autocast_off(fn):
    """Run a sparse forward with autocast's casts made explicitly, then autocast off.

    Why: the sliced ops are autograd Functions; under autocast their forward would run in
    the autocast dtype while their backward (outside autocast) would meet fp32 weights.
    Casting input and weights first (exactly what autocast does for ``F.linear``) keeps
    forward and backward in one dtype; the casts' backward returns fp32 gradients.
    """
    def wrapper(self, x, *args):
        dtype = _amp_dtype(x)
        if dtype is None:
            return fn(self, x, *args, dtype=None)
        with torch.autocast(x.device.type, enabled=False):
            return fn(self, x.to(dtype), *args, dtype=dtype)
    return wrapper


def _world_group():
    """HF runs replicate the whole model on every rank (DDP / ZeRO): DP = the world."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


class _SATModuleMixin:
    """What both SAT module kinds add to a stock module: state and token mask."""

    sat_state: SATLayerState
    sat_token_mask: TokenMask

    def _sat_attach(self, config, kind: str, layer_number: int, num_units: int,
                    token_mask: TokenMask) -> None:
        # No tensor parallelism inside HF modules: TP rank 0, as a TP=1 megatron run.
        self.sat_state = SATLayerState(config, kind, layer_number, None, num_units)
        self.sat_token_mask = token_mask

    def _sat_stats_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.sat_state.data_parallel_group is None:
            self.sat_state.data_parallel_group = _world_group()
        return self.sat_token_mask.real_tokens(x)

    def _sat_check_linears(self, names) -> None:
        """The sparse path reads the projections' weights itself: adapters (e.g. LoRA
        wrappers) on them would be silently skipped, so they are refused."""
        bad = [n for n in names if type(getattr(self, n)) is not torch.nn.Linear]
        if bad:
            raise ValueError(f"SAT needs plain nn.Linear projections, but {', '.join(bad)} "
                             f"of {type(self).__name__} are {type(getattr(self, bad[0])).__name__}; "
                             f"SAT speeds up full fine-tuning: do not add adapters to a SAT model")

    def _sat_detach(self) -> None:
        del self.sat_state, self.sat_token_mask


class SATAttentionMixin(_SATModuleMixin):
    """Self-attention that, in training at ``ρ > 0``, runs on the selected heads only.

    MHA (``q = 1``): whole heads are units; a kept head keeps its Q, K, V rows and its
    ``o_proj`` columns.  GQA: query heads are units, every group keeps the same ``k_q``
    of them and all K/V heads stay (SAT_SPEC §2).  HF's query head ``h`` belongs to
    K/V group ``h // q`` (``repeat_kv``), the same grouping as megatron's fused layout.
    """

    def sat_setup(self, config, layer_number: int, token_mask: TokenMask) -> None:
        self._sat_check_linears(("q_proj", "k_proj", "v_proj", "o_proj"))
        # ``out_features``, not ``weight.shape``: under ZeRO-3 the weight may be partitioned.
        self.sat_groups = self.k_proj.out_features // self.head_dim  # ng
        self.sat_q_per_group = self.q_proj.out_features // self.head_dim // self.sat_groups
        units = self.sat_groups if self.sat_q_per_group == 1 else self.sat_groups * self.sat_q_per_group
        self._sat_attach(config, "attn", layer_number, units, token_mask)

    def sat_teardown(self) -> None:
        self._sat_detach()
        del self.sat_groups, self.sat_q_per_group

    # ------------------------------------------------------------------ selection
    def sat_head_sums(self, stats: Optional[torch.Tensor]) -> torch.Tensor:
        """``[ng, q + 2]``: per group, ``S^Q`` of its query heads, then ``S^K``, ``S^V``."""
        metric, ng, q, d = (self.sat_state.config.metric, self.sat_groups,
                            self.sat_q_per_group, self.head_dim)
        s_q = scores_from_stats(metric, self.q_proj.weight, stats).view(ng, q, d).sum(-1)
        s_k = scores_from_stats(metric, self.k_proj.weight, stats).view(ng, 1, d).sum(-1)
        s_v = scores_from_stats(metric, self.v_proj.weight, stats).view(ng, 1, d).sum(-1)
        return torch.cat([s_q, s_k, s_v], dim=1)

    @torch.no_grad()
    def sat_select(self, hidden_states: torch.Tensor):
        """``(kept_groups [g'], kept_q [g', k_q])`` of this iteration (SAT_SPEC §1–§3)."""
        if self.sat_state.cached_selection() is None:  # once per iteration
            self._sat_check_linears(("q_proj", "k_proj", "v_proj", "o_proj"))
        return select_heads(self.sat_state, self._sat_stats_input(hidden_states),
                            self.sat_head_sums, self.sat_groups, self.sat_q_per_group)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states, *args, **kwargs):
        if not self.sat_state.active(self.training):
            if self.training:
                self.sat_state.mark_dense()
            return super().forward(hidden_states, *args, **kwargs)
        position_embeddings = kwargs.get("position_embeddings", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return self._sat_forward(hidden_states, position_embeddings, attention_mask)

    def _sat_q_rows(self, selection) -> torch.Tensor:
        """Rows of q_proj (and columns of o_proj) of the kept query heads, ``[g' * k_q * d]``."""
        kept_groups, kept_q = selection
        d = self.head_dim
        q_heads = kept_groups[:, None] * self.sat_q_per_group + kept_q  # [g', k_q] head ids
        return (q_heads[:, :, None] * d + torch.arange(d, device=kept_q.device)).reshape(-1)

    @_autocast_off
    def _sat_forward(self, hidden_states, position_embeddings, attention_mask, dtype=None):
        # hidden_states: [b, s, h], the normalised input of q/k/v_proj.
        # A KV cache passed in training is left untouched: it only serves generation,
        # which runs in eval mode, where this layer is the stock layer.
        selection = self.sat_select(hidden_states)
        kept_groups, kept_q = selection
        g, k_q = kept_q.shape
        q, d = self.sat_q_per_group, self.head_dim
        b, s = hidden_states.shape[:2]
        q_rows = self.sat_state.derived_indices(selection, self._sat_q_rows)  # [g' * k_q * d]
        w = {n: (_param(m.weight, dtype), _param(m.bias, dtype)) for n, m in (
            ("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj), ("o", self.o_proj))}
        query = ops.linear_rows(hidden_states, w["q"][0], q_rows, w["q"][1])
        if q == 1:  # MHA: a dropped head drops its K and V rows too
            key = ops.linear_rows(hidden_states, w["k"][0], q_rows, w["k"][1])
            value = ops.linear_rows(hidden_states, w["v"][0], q_rows, w["v"][1])
        else:  # GQA: every group and its K/V head stay
            key, value = F.linear(hidden_states, *w["k"]), F.linear(hidden_states, *w["v"])
        query = query.view(b, s, g * k_q, d).transpose(1, 2)  # [b, g'*k_q, s, d]
        key = key.view(b, s, g, d).transpose(1, 2)  # [b, g', s, d]
        value = value.view(b, s, g, d).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._sat_rotary(query, key, _param(cos, dtype), _param(sin, dtype))
        context = self._sat_sdpa(query, key, value, attention_mask)  # [b, g'*k_q, s, d]
        context = context.transpose(1, 2).reshape(b, s, g * k_q * d)  # [b, s, g'*k_q*d]
        out = ops.linear_cols(context, w["o"][0], q_rows)  # [b, s, h]
        if w["o"][1] is not None:
            out = out + w["o"][1]
        return out, None

    def _sat_rotary(self, query, key, cos, sin):
        """The model family's own RoPE function (from its modeling module)."""
        rope = getattr(sys.modules[_stock_class(type(self)).__module__], "apply_rotary_pos_emb")
        return rope(query, key, cos, sin)

    def _sat_sdpa(self, query, key, value, attention_mask):
        """SDPA over the kept heads, honouring the mask HF built for this batch.

        ``attention_mask`` is what ``create_causal_mask`` made for the configured
        implementation: ``None`` (plain causal), a boolean ``[b, 1, s, kv]`` mask (``sdpa``:
        True = attend; padding, packed sequences and sliding windows are in it) or an
        additive float mask (``eager``).  Both are SDPA's own ``attn_mask`` conventions.
        """
        causal = attention_mask is None and query.shape[2] > 1 and getattr(self, "is_causal", True)
        mask = None
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or attention_mask.dim() != 4:
                raise ValueError("SAT attention needs the 4-D mask of attn_implementation "
                                 "'sdpa' or 'eager'; load the model with one of them")
            mask = attention_mask[:, :, :, : key.shape[-2]]
            if mask.dtype != torch.bool:
                mask = mask.to(query.dtype)  # additive mask (eager)
        p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=p, is_causal=causal,
            scale=self.scaling, enable_gqa=query.shape[1] != key.shape[1])

    def sat_external_parameters(self):
        """Weights the sparse path reads without calling the child's forward (ZeRO-3)."""
        mods = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return [p for m in mods for p in (m.weight, m.bias) if p is not None]


class SATMLPMixin(_SATModuleMixin):
    """SwiGLU MLP that, in training at ``ρ > 0``, runs on the selected channels only.

    Channel ``c`` is row ``c`` of ``gate_proj`` and ``up_proj`` and column ``c`` of
    ``down_proj`` (SAT_SPEC §2).
    """

    def sat_setup(self, config, layer_number: int, token_mask: TokenMask) -> None:
        self._sat_check_linears(("gate_proj", "up_proj", "down_proj"))
        self.sat_channels = self.down_proj.in_features  # f
        self._sat_attach(config, "mlp", layer_number, self.sat_channels, token_mask)

    def sat_teardown(self) -> None:
        self._sat_detach()
        del self.sat_channels

    def sat_fc1_scores(self, stats: Optional[torch.Tensor]) -> torch.Tensor:
        """``[2f]`` neuron scores: gate rows, then up rows (megatron's ``linear_fc1`` order)."""
        metric = self.sat_state.config.metric
        return torch.cat([scores_from_stats(metric, self.gate_proj.weight, stats),
                          scores_from_stats(metric, self.up_proj.weight, stats)])

    @torch.no_grad()
    def sat_select(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Kept channels ``[k]`` of this iteration (SAT_SPEC §1–§3), cached."""
        if self.sat_state.cached_selection() is None:
            self._sat_check_linears(("gate_proj", "up_proj", "down_proj"))
        return select_channels(self.sat_state, self._sat_stats_input(hidden_states),
                               self.sat_fc1_scores, self.sat_channels)

    def forward(self, x, *args, **kwargs):
        if not self.sat_state.active(self.training):
            if self.training:
                self.sat_state.mark_dense()
            return super().forward(x, *args, **kwargs)
        return self._sat_forward(x)

    @_autocast_off
    def _sat_forward(self, x, dtype=None):
        # x: [b, s, h], the normalised input of gate/up_proj.
        kept = self.sat_select(x)  # [k]
        gate = ops.linear_rows(x, _param(self.gate_proj.weight, dtype), kept,
                               _param(self.gate_proj.bias, dtype))  # [b, s, k]
        up = ops.linear_rows(x, _param(self.up_proj.weight, dtype), kept,
                             _param(self.up_proj.bias, dtype))  # [b, s, k]
        out = ops.linear_cols(self.act_fn(gate) * up, _param(self.down_proj.weight, dtype),
                              kept)  # [b, s, h]
        if self.down_proj.bias is not None:
            out = out + _param(self.down_proj.bias, dtype)
        return out

    def sat_external_parameters(self):
        mods = (self.gate_proj, self.up_proj, self.down_proj)
        return [p for m in mods for p in (m.weight, m.bias) if p is not None]


_SAT_CLASSES: dict = {}


def sat_class(stock_cls: type, mixin: type) -> type:
    """``SAT<Stock>``: the stock class with the SAT mixin in front, made once per class."""
    key = (stock_cls, mixin)
    if key not in _SAT_CLASSES:
        name = "SAT" + stock_cls.__name__
        cls = type(name, (mixin, stock_cls), {"__module__": __name__, "__qualname__": name,
                                              "_sat_stock_class": stock_cls})
        globals()[name] = cls  # importable by name, so a SAT model can be pickled
        _SAT_CLASSES[key] = cls
    return _SAT_CLASSES[key]


def _stock_class(cls: type) -> type:
    return cls._sat_stock_class
