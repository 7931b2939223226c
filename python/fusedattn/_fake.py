"""Fake (meta) kernels: output shapes for torch.compile and opcheck. The C++ kernels check the
arguments; these only describe what they return (contiguous tensors)."""
import torch


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedattn::_attention_forward")
def _attention_forward_fake(query, key, value, attn_mask, key_padding_mask, dropout_seed,
                            dropout_p, is_causal, bottom_right, scale, enable_gqa,
                            return_weights, average_weights=False):
    torch._check(query.dim() >= 3, lambda: "attention: query must have at least 3 dims")
    *batch, heads, q_len, _ = query.shape
    kv_len, v_dim = key.shape[-2], value.shape[-1]
    out = query.new_empty((*batch, heads, q_len, v_dim))
    lse = query.new_empty((*batch, heads, q_len), dtype=_accumulate_dtype(query.dtype))
    if not return_weights:
        weights = query.new_empty((0,))
    elif average_weights:
        weights = query.new_empty((*batch, q_len, kv_len))
    else:
        weights = query.new_empty((*batch, heads, q_len, kv_len))
    return out, lse, weights


@torch.library.register_fake("fusedattn::_attention_backward")
def _attention_backward_fake(grad_out, grad_weights, grad_lse, query, key, value, out, lse,
                             attn_mask, key_padding_mask, dropout_seed, dropout_p, is_causal,
                             bottom_right, scale, enable_gqa, attn_mask_grad,
                             key_padding_mask_grad):
    def grad_of(mask, wanted):
        if wanted and mask is not None and mask.is_floating_point():
            return mask.new_empty(mask.shape)
        return query.new_empty((0,))

    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            grad_of(attn_mask, attn_mask_grad), grad_of(key_padding_mask, key_padding_mask_grad))


@torch.library.register_fake("fusedattn::_attention_qkv_forward")
def _attention_qkv_forward_fake(qkv, num_heads, seq_first, attn_mask, key_padding_mask,
                                dropout_seed, dropout_p, is_causal, return_weights,
                                average_weights):
    torch._check(qkv.dim() == 3, lambda: "attention_qkv: qkv must be 3-D")
    a, b, three_e = qkv.shape
    n, seq = (b, a) if seq_first else (a, b)
    out = qkv.new_empty((a, b, three_e // 3))
    lse = qkv.new_empty((n, num_heads, seq), dtype=_accumulate_dtype(qkv.dtype))
    if not return_weights:
        weights = qkv.new_empty((0,))
    elif average_weights:
        weights = qkv.new_empty((n, seq, seq))
    else:
        weights = qkv.new_empty((n, num_heads, seq, seq))
    return out, lse, weights


@torch.library.register_fake("fusedattn::_attention_qkv_backward")
def _attention_qkv_backward_fake(grad_out, grad_weights, grad_lse, qkv, out, lse, num_heads,
                                 seq_first, attn_mask, key_padding_mask, dropout_seed, dropout_p,
                                 is_causal, attn_mask_grad, key_padding_mask_grad):
    def grad_of(mask, wanted):
        if wanted and mask is not None and mask.is_floating_point():
            return mask.new_empty(mask.shape)
        return qkv.new_empty((0,))

    return (qkv.new_empty(qkv.shape), grad_of(attn_mask, attn_mask_grad),
            grad_of(key_padding_mask, key_padding_mask_grad))
