"""fusedattn as a Hugging Face ``transformers`` attention backend.

``register()`` adds an attention function to ``transformers.AttentionInterface`` and a mask
function to ``AttentionMaskInterface`` under one name; a model then runs on fusedattn with
``attn_implementation="fusedattn"`` (``from_pretrained``, ``from_config``) or
``model.set_attn_implementation("fusedattn")``.

The mask function hands the attention function the compact form of the usual patterns (causal,
bidirectional, sliding windows, packed sequences): nothing, or the 2D padding mask
``(B, keys)``; the attention function turns it into ``key_padding_mask`` with the queries at
the end of the keys (bottom-right), and the module's ``sliding_window``, ``softcap``, attention
sinks (``s_aux``) and T5's ``position_bias`` into the op's options. No ``L x S`` tensor is formed
for them. A pattern it does not know (a model's own ``or``/``and`` mask functions) gets
transformers' full boolean mask, which the op honours as ``attn_mask``: never a different
result.

This module imports ``transformers``; ``import fusedattn`` does not import it.
"""
try:
    import transformers as _hf
    from transformers import masking_utils as _masking
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "fusedattn.transformers needs the 'transformers' package (pip install transformers, or "
        "pip install fusedattn[transformers])") from e

import torch

from ._ops import attention, attention_varlen

__all__ = ["register", "attention_forward", "attention_mask"]

# Mask functions of masking_utils whose pattern the attention function reproduces from the
# module's own attributes (is_causal, sliding_window) and the packed sequences' position ids.
_COMPACT_PATTERNS = {
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
    "packed_sequence_mask_function.<locals>.inner_mask",
    "remap_positions_for_packed_sequence.<locals>.inner_mask",
    "and_masks.<locals>.and_mask",
}


def _pattern_leaves(fn, seen=None):
    """The functions a mask function is composed of (through and_masks / or_masks and the
    overlays' closures)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return
    seen.add(id(fn))
    yield fn
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            item = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for sub in (item if isinstance(item, (tuple, list)) else (item,)):
            if callable(sub) and hasattr(sub, "__code__"):
                yield from _pattern_leaves(sub, seen)


def _is_compact(mask_function):
    return all(f.__qualname__ in _COMPACT_PATTERNS for f in _pattern_leaves(mask_function))


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                   mask_function=_masking.causal_mask_function, attention_mask=None, **kwargs):
    """The ``AttentionMaskInterface`` function: ``None`` when no key is padding, the 2D padding
    mask ``(B, keys)`` (True = a real token) otherwise or when it is shorter than the keys (a
    static cache's unfilled tail); transformers' boolean ``(B, 1, L, S)`` mask for a pattern
    the attention function cannot rebuild from the module (a model's own mask functions)."""
    if mask_function is not None and not _is_compact(mask_function):
        kwargs.pop("allow_is_causal_skip", None)
        return _masking.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                  q_offset=q_offset, kv_offset=kv_offset,
                                  mask_function=mask_function, attention_mask=attention_mask,
                                  allow_is_causal_skip=False, **kwargs)
    if attention_mask is None:
        return None
    # Keys beyond a sliding layer's cache are not in it: the mask's last kv_length columns.
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling() \
            and bool(attention_mask.all()):
        return None
    return attention_mask


def _packed_offsets(position_ids, batch, length):
    """int32 offsets of the sequences packed in (batch, length) rows whose position ids
    restart, or None when each row holds one sequence."""
    if position_ids is None or length == 1 or torch.compiler.is_compiling():
        return None
    pos = position_ids.expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if int(starts.sum()) == batch:
        return None
    idx = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([batch * length], device=idx.device, dtype=idx.dtype)
    return torch.cat([idx, total]).to(torch.int32)


def _window(sliding_window, causal):
    # transformers' kwarg counts the query's own position (flash-attention's convention):
    # causal: keys j > i - W; bidirectional: |i - j| <= W - 1.
    if sliding_window is None:
        return None
    w = int(sliding_window) - 1
    return (w, 0) if causal else (w, w)


def _varlen(query, key, value, offsets, max_q, max_k, offsets_k=None, max_k_given=None, *,
            causal, dropout, scaling, window, softcap, sinks):
    b, h, _, _ = query.shape
    q = query.transpose(1, 2).reshape(-1, h, query.shape[-1])
    k = key.transpose(1, 2).reshape(-1, key.shape[1], key.shape[-1])
    v = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[-1])
    out = attention_varlen(q, k, v, offsets, offsets if offsets_k is None else offsets_k,
                           int(max_q), int(max_k if max_k_given is None else max_k_given),
                           dropout_p=dropout, is_causal=causal,
                           causal_alignment="bottom_right", scale=scaling,
                           enable_gqa=k.shape[1] != h, window=window, softcap=softcap,
                           sinks=sinks)
    return out.view(b, -1, h, value.shape[-1])


def _decode_step(query, key, value, key_padding_mask, scaling, window):
    """One new token per sequence, no gradient: the decode kernel, which reads each block of
    keys once for all the query heads of a key/value head (GQA as one row block). The new
    token sees every key (or the window's last ones: a view of them)."""
    if window is not None:
        first = max(key.shape[2] - 1 - window[0], 0)
        key, value = key[:, :, first:], value[:, :, first:]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, first:]
    lengths = torch.full((query.shape[0],), key.shape[2], dtype=torch.long, device=query.device)
    out, _, _ = torch.ops.fusedattn.kv_cache_attention(
        query, None, None, key, value, lengths, scale=scaling,
        key_padding_mask=key_padding_mask, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, sliding_window=None, softcap=None, s_aux=None,
                      position_bias=None, output_attentions=False, position_ids=None,
                      cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                      max_length_k=None, **kwargs):
    """The ``AttentionInterface`` function. query ``(B, H, L, E)``, key ``(B, Hk, S, E)``,
    value ``(B, Hk, S, Ev)``; returns ``(out (B, L, H, Ev), weights (B, H, L, S) or None)``."""
    for name in ("block_table", "k_cache", "v_cache"):
        if kwargs.get(name) is not None:
            raise ValueError(f"fusedattn: {name} (paged attention, continuous batching) is not "
                             "supported; use a dynamic or static cache")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, h, length, _ = query.shape
    window = _window(sliding_window, causal)
    sinks = s_aux
    if sinks is not None and sinks.dim() != 1:
        raise ValueError(f"fusedattn: s_aux (attention sinks) must have shape (H,) = ({h},), "
                         f"got {tuple(sinks.shape)}")

    # Packed sequences (padding-free training): offsets given, or position ids that restart.
    if attention_mask is None and position_bias is None and not output_attentions:
        offsets = max_q = max_k = offsets_k = None
        if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
            offsets, offsets_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
            max_q, max_k = max_length_q, max_length_k
            if max_q is None or max_k is None:
                lq, lk = offsets.diff(), offsets_k.diff()
                max_q, max_k = int(lq.max()), int(lk.max())
        elif key.shape[2] == length:
            offsets = _packed_offsets(position_ids, b, length)
            if offsets is not None:
                max_q = max_k = int(offsets.diff().max())
        if offsets is not None:
            return _varlen(query, key, value, offsets, max_q, None, offsets_k, max_k,
                           causal=causal, dropout=dropout, scaling=scaling, window=window,
                           softcap=softcap, sinks=sinks), None

    attn_mask = key_padding_mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        # The padding mask (B, M), True = a real token; M < S: a static cache's filled part.
        m = attention_mask.shape[-1]
        if m < key.shape[2]:
            key, value = key[:, :, :m], value[:, :, :m]
            if position_bias is not None:
                position_bias = position_bias[..., :m]
        key_padding_mask = ~attention_mask.bool()
    elif attention_mask is not None:
        # A 4D mask (given by the caller, or transformers' own for a pattern of the model's):
        # it holds the causal part, and may be longer than the keys' filled part.
        attn_mask = attention_mask[..., : key.shape[2]]
        if attn_mask.shape[-1] < key.shape[2]:
            key, value = key[:, :, : attn_mask.shape[-1]], value[:, :, : attn_mask.shape[-1]]
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(query.dtype)
        causal = False
    if (length == 1 and attn_mask is None and position_bias is None and softcap is None
            and sinks is None and not output_attentions and not dropout
            and not (torch.is_grad_enabled()
                     and (query.requires_grad or key.requires_grad or value.requires_grad))):
        return _decode_step(query, key, value, key_padding_mask, scaling, window), None
    if position_bias is not None:
        # T5: a learnable (1 or B, H, L, S) bias added to the scores; the op reads it through
        # its strides and returns its gradient.
        bias = position_bias[..., : key.shape[2]].to(query.dtype)
        if attn_mask is None:
            attn_mask = bias
        elif attn_mask.dtype == torch.bool:
            attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            attn_mask = bias + attn_mask

    options = dict(attn_mask=attn_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
                   enable_gqa=key.shape[1] != h, key_padding_mask=key_padding_mask,
                   causal_alignment="bottom_right", window=window, softcap=softcap, sinks=sinks)
    if output_attentions:
        out, weights, _ = attention(query, key, value, return_weights=True, **options)
    else:
        out, weights = attention(query, key, value, **options), None
    return out.transpose(1, 2), weights


def register(name="fusedattn"):
    """Registers fusedattn in ``transformers.AttentionInterface`` (the attention function) and
    ``AttentionMaskInterface`` (its mask function) under ``name``; idempotent. Returns ``name``,
    for ``attn_implementation=``."""
    _hf.AttentionInterface.register(name, attention_forward)
    _masking.AttentionMaskInterface.register(name, attention_mask)
    return name
