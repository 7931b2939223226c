import math

import torch

from . import _C


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, key_padding_mask=None, causal_alignment="top_left",
              return_weights=False, return_lse=False, average_weights=False, window=None,
              alibi_slopes=None, softcap=None, rel_bias=None, sinks=None):
    """Scaled dot-product attention (``torch.ops.fusedattn.attention``).

    Same arguments as ``torch.nn.functional.scaled_dot_product_attention``, plus
    ``key_padding_mask`` ``(..., S)`` (bool True = padding, or float added), ``causal_alignment``
    (``"top_left"`` or ``"bottom_right"``) and the optional outputs. Returns ``out``, or
    ``(out, weights, lse)`` when ``return_weights`` or ``return_lse`` is set, with None for what
    was not asked. ``average_weights`` (with ``return_weights``) returns the weights averaged
    over the heads, ``(..., L, S)``, as ``nn.MultiheadAttention`` does, without storing the
    per-head ones. Rows whose keys are all masked give 0 (torch gives NaN).

    Variants (fused, with gradients), positions relative to query ``i``'s diagonal
    ``i + o`` (``o = S - L`` for ``"bottom_right"``, else 0):

    - ``window=(left, right)``: key ``j`` is visible iff ``i + o - left <= j <= i + o + right``
      (``-1``: unbounded on that side); with ``is_causal`` it only narrows. Key blocks
      outside the window are skipped: the cost is O(L * window).
    - ``alibi_slopes``: fp32 ``(H,)`` or ``(..., H)``: adds ``-slope[h] * |i + o - j|`` (no
      gradient to the slopes).
    - ``softcap``: float > 0: the scaled score ``s`` becomes ``softcap * tanh(s / softcap)``
      before ALiBi and the masks are added.
    - ``rel_bias``: a learnable table ``(H, 2 D + 1)`` (any float dtype): adds
      ``rel_bias[h, clamp(j - (i + o), -D, D) + D]``; its gradient is computed on the fused
      path (no ``L x S`` buffer).
    - ``sinks``: ``(H,)`` learnable attention sinks (gpt-oss's ``s_aux``): head ``h``'s logit
      ``sinks[h]`` joins the softmax's denominator and carries no value (softmax over
      ``[scores, sinks[h]]``, the sink's column dropped); ``out``, the weights and ``lse`` are
      the sink-inclusive ones, and ``sinks`` gets a gradient.

    fp32 inputs follow torch's fp32 matmul precision on the CPU: under
    ``torch.set_float32_matmul_precision("medium")`` (mkldnn ``fp32_precision`` ``"bf16"``) their
    products run in bf16 where torch's own do (CPUs with AMX), softmax, sums and outputs in fp32.
    """
    out, weights, lse = torch.ops.fusedattn.attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        key_padding_mask=key_padding_mask, causal_alignment=causal_alignment,
        return_weights=return_weights, return_lse=return_lse, average_weights=average_weights,
        window=None if window is None else list(window), alibi_slopes=alibi_slopes,
        softcap=softcap, rel_bias=rel_bias, sinks=sinks)
    if not (return_weights or return_lse):
        return out
    return out, (weights if return_weights else None), (lse if return_lse else None)


def explain(query, key=None, value=None, attn_mask=None, dropout_p=0.0, is_causal=False,
            scale=None, enable_gqa=False, *, key_padding_mask=None, causal_alignment="top_left",
            return_weights=False, return_lse=False, average_weights=False, window=None,
            alibi_slopes=None, softcap=None, rel_bias=None, sinks=None):
    """The route :func:`attention` with these arguments takes, and why, as one line:
    ``"torch: ..."`` (``torch.nn.functional.scaled_dot_product_attention``, which picks its
    flash, cuDNN, memory-efficient or math kernel) or ``"fusedattn ...: <reason>"``.

    CUDA calls go to torch unless they ask for what torch's op does not give (returned
    weights, ``lse``, the variants, sinks, a mask's gradient) or ``FUSEDATTN_CUDA_KERNEL=fused``
    opts into fusedattn's CUDA kernels; CPU calls run fusedattn's kernels. ``FUSEDATTN_ROUTE``
    (``auto``, ``torch``, ``own``) overrides this for every device. The decision reads only
    these flags, the device and whether a mask requires grad, never sizes or values.
    """
    variants = any(x is not None for x in (window, alibi_slopes, softcap, rel_bias))
    return _C._explain_attention(query, attn_mask, key_padding_mask, return_weights, return_lse,
                                 variants, sinks is not None)


def t5_rel_bias(bucket_bias, max_distance=128, bidirectional=True):
    """T5's bucketed relative position bias as a ``rel_bias`` table for ``attention``.

    ``bucket_bias``: ``(num_buckets, H)``, the weight of T5's ``relative_attention_bias``
    embedding. Returns ``(H, 2 * max_distance + 1)``: the bucket's bias of every relative
    position ``j - i`` in ``-max_distance .. max_distance`` (positions beyond share the last
    bucket, as the clamp in ``rel_bias`` does), gathered once per call and differentiable, so
    the ``L x S`` bias is never formed.
    """
    num_buckets = bucket_bias.shape[0]
    rel = torch.arange(-max_distance, max_distance + 1, device=bucket_bias.device)  # j - i
    dist = -rel  # T5 measures query minus key
    bucket = torch.zeros_like(dist)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (dist < 0).long() * num_buckets
        dist = dist.abs()
    else:
        dist = dist.clamp(min=0)
    exact = num_buckets // 2
    # Log-spaced buckets from `exact` up to max_distance, the rest in the last one.
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    bucket = bucket + torch.where(dist < exact, dist, far.clamp(max=num_buckets - 1))
    return bucket_bias[bucket].t()


def attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     dropout_p=0.0, is_causal=False, causal_alignment="top_left", scale=None,
                     enable_gqa=False, window=None, alibi_slopes=None, softcap=None,
                     rel_bias=None, sinks=None, return_lse=False):
    """Attention over packed variable-length sequences (``torch.ops.fusedattn.attention_varlen``;
    FlashAttention's ``flash_attn_varlen_func`` layout).

    ``query (total_q, H, E)``, ``key (total_k, Hk, E)``, ``value (total_k, Hk, Ev)``,
    ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``(B + 1,)`` offsets of each sequence; the
    options are ``attention``'s (alignment per sequence; ``alibi_slopes`` ``(H,)`` or
    ``(B, H)``; ``sinks`` ``(H,)``). Returns ``out (total_q, H, Ev)``, or ``(out, lse (H, total_q))`` with
    ``return_lse``. No padding is formed or computed: one fused call per sequence on views, the
    cost the sum over sequences of ``L_b * S_b``; gradients for query, key, value, rel_bias.
    The offsets are read on the host, so ``torch.compile`` breaks the graph here.
    """
    out, lse = torch.ops.fusedattn.attention_varlen(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=dropout_p, is_causal=is_causal, causal_alignment=causal_alignment, scale=scale,
        enable_gqa=enable_gqa, window=None if window is None else list(window),
        alibi_slopes=alibi_slopes, softcap=softcap, rel_bias=rel_bias, return_lse=return_lse,
        sinks=sinks)
    return (out, lse) if return_lse else out
