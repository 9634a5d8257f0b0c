"""Float64 masked-dense references for SAT layers (SAT_SPEC §4), written from scratch.

The reference multiplies the full weights by 0/1 masks, so omitted rows/columns are
zero in the forward and their gradients are exactly zero, and everything else is the
plain dense Llama computation (fused QKV layout per query group, rotate-half RoPE,
causal softmax attention, SwiGLU).
"""

import torch


def rope_rotate_half(t, freqs):
    """t: [s, b, n, d]; freqs: [s, 1, 1, d] (megatron's RotaryEmbedding output)."""
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos + rotated * sin


def masked_attention(x, w_qkv, w_proj, row_mask, col_mask, ng, q, d, freqs):
    """x [s, b, h] -> [s, b, h] with masked weights; causal attention, GQA by group."""
    s, b, _ = x.shape
    qkv = x @ (w_qkv * row_mask[:, None]).t()  # [s, b, ng*(q+2)*d]
    qkv = qkv.view(s, b, ng, q + 2, d)
    query = qkv[:, :, :, :q].reshape(s, b, ng * q, d)
    key = qkv[:, :, :, q]  # [s, b, ng, d]
    value = qkv[:, :, :, q + 1]
    query = rope_rotate_half(query, freqs)
    key = rope_rotate_half(key, freqs)
    key = key.repeat_interleave(q, dim=2)  # query head g*q+j uses group g
    value = value.repeat_interleave(q, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", query, key) / d ** 0.5
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.einsum("bnst,tbnd->sbnd", probs, value).reshape(s, b, ng * q * d)
    return ctx @ (w_proj * col_mask[None, :]).t()


def masked_swiglu(x, w_fc1, w_fc2, channel_mask):
    """x [s, b, h]; w_fc1 [2f, h] = [gate; up]; w_fc2 [h, f]; channel_mask [f]."""
    f = w_fc2.shape[1]
    m = torch.cat([channel_mask, channel_mask])
    fc1 = x @ (w_fc1 * m[:, None]).t()
    gate, up = fc1[..., :f], fc1[..., f:]
    return (torch.nn.functional.silu(gate) * up) @ (w_fc2 * channel_mask[None, :]).t()


def masks_from_kept(ng, q, d, kept_groups, kept_q, dtype=torch.float64):
    """Masks for kept query heads ``kept_q[i]`` of group ``kept_groups[i]``.

    For MHA (q == 1) a dropped group loses its Q, K and V rows; for GQA every group is
    kept, so K and V rows always stay and only Q rows of dropped query heads go.
    """
    row = torch.zeros(ng, q + 2, d, dtype=dtype)
    col = torch.zeros(ng, q, d, dtype=dtype)
    for g, heads in zip(kept_groups.tolist(), kept_q.tolist()):
        for j in heads:
            row[g, j] = 1
            col[g, j] = 1
        row[g, q] = 1
        row[g, q + 1] = 1
    return row.reshape(-1), col.reshape(-1)
