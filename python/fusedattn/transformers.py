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

``FusedCache(model.config, cache_dtype=torch.int8)`` is a ``transformers.Cache`` for
``model.generate(..., cache=...)`` whose full-attention layers keep their keys and values in
``fusedattn.KVCache`` storage (the model's dtype, bfloat16, float16 or int8 with a scale per
row): the attention function hands each step's new keys and values to
``kv_cache_attention``, which stores them and attends in one call, reading the stored form
block by block (no full-precision copy of the cache). Sliding-window layers keep transformers'
own window cache.

This module imports ``transformers``; ``import fusedattn`` does not import it.
"""
try:
    import transformers as _hf
    from transformers import cache_utils as _cache_utils
    from transformers import masking_utils as _masking
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "fusedattn.transformers needs the 'transformers' package (pip install transformers, or "
        "pip install fusedattn[transformers])") from e

import torch

from . import _C
from ._ops import attention, attention_varlen
from .kv_cache import KVCache

__all__ = ["register", "attention_forward", "attention_mask", "FusedCache", "FusedCacheLayer"]

# The names register() gave attention_forward: a FusedCache defers its appends to the
# attention function only for a model that runs under one of them.
_REGISTERED_NAMES = set()
# The key under which a FusedCacheLayer's update hands itself to the attention function, in
# the keyword arguments the model passes to both (``cache.update(..., kwargs=kwargs)``).
_PENDING_KEY = "fusedattn_cache_layer"

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

    layer = kwargs.pop(_PENDING_KEY, None)
    if layer is not None:
        # A FusedCache layer whose new keys and values wait in it (key and value are them).
        if (window is None and softcap is None and sinks is None and position_bias is None
                and not dropout and (attention_mask is None or attention_mask.dim() == 2)):
            return layer.attend(query, attention_mask, causal=causal, scale=scaling,
                                output_attentions=output_attentions)
        # Options kv_cache_attention does not take: the stored keys and values, read back.
        key, value = layer.store_pending()

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


class FusedCacheLayer(_cache_utils.CacheLayerMixin):
    """One full-attention layer's cache: a ``fusedattn.KVCache`` of ``cache_dtype`` (the
    model's dtype when None) for the batch of the first update, ``max_cache_len`` positions
    (fixed), or growing by doubling when ``max_cache_len`` is None.

    Under fusedattn's attention function ``update`` only holds the new keys and values and
    hands the layer to the attention function, whose ``kv_cache_attention`` call stores and
    attends at once; under any other attention function ``update`` stores them and returns
    the cached keys and values read back in the model's dtype (correct, not faster)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    # Capacity of a growing layer's first allocation (positions); doubled when full.
    _FIRST_CAPACITY = 256

    def __init__(self, cache_dtype=None, max_cache_len=None, config=None):
        super().__init__()
        self.cache_dtype = cache_dtype
        self.max_cache_len = max_cache_len
        self.config = config
        self.kv = None
        self.length = 0  # positions cached, the held new ones included
        self._held = None  # (key, value) waiting for the attention function

    def lazy_initialization(self, key_states, value_states):
        b, hk, t, e = key_states.shape
        capacity = self.max_cache_len or max(self._FIRST_CAPACITY, t)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.kv = KVCache(b, capacity, hk, e, value_states.shape[-1], dtype=key_states.dtype,
                          device=key_states.device, cache_dtype=self.cache_dtype)
        self.keys, self.values = self.kv.key_cache, self.kv.value_cache
        self.is_initialized = True

    @property
    def batch_size(self):
        return self.kv.batch if self.kv is not None else -1

    def _under_fusedattn(self):
        return getattr(self.config, "_attn_implementation", None) in _REGISTERED_NAMES

    def _rebuild(self, index=None, capacity=None):
        # A new KVCache with the rows `index` (all when None) and `capacity` positions, the
        # cached positions copied.
        old = self.kv
        used = self.length - (0 if self._held is None else self._held[0].shape[2])
        n = old.batch if index is None else index.shape[0]
        capacity = old.max_len if capacity is None else capacity
        self.kv = KVCache(n, capacity, old.key_cache.shape[1], old.key_cache.shape[3],
                          old.value_cache.shape[3], dtype=self.dtype, device=self.device,
                          cache_dtype=old.cache_dtype)
        for name in old._row_tensors():
            src = getattr(old, name)[: old.batch, :, :used]
            if index is not None:
                src = src.index_select(0, index)
            getattr(self.kv, name)[:, :, :used].copy_(src)
        self.kv.lengths = (old.lengths.clone() if index is None
                           else old.lengths.index_select(0, index))
        self.keys, self.values = self.kv.key_cache, self.kv.value_cache

    def update(self, key_states, value_states, *args, kwargs=None, **extra):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise RuntimeError("FusedCache: gradients do not flow through a cache's stored "
                               "keys and values; run under torch.no_grad() (generation) or "
                               "use transformers' DynamicCache for training")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._held is not None:  # an attention function that did not take them
            self.store_pending()
        t = key_states.shape[2]
        if key_states.shape[0] != self.kv.batch:
            raise ValueError(f"FusedCache: the cache holds {self.kv.batch} sequences, the new "
                             f"keys {key_states.shape[0]}")
        if self.length + t > self.kv.max_len:
            if self.max_cache_len is not None:
                raise ValueError(f"FusedCache: max_cache_len = {self.max_cache_len} positions "
                                 f"are full ({self.length} cached, {t} new)")
            self._rebuild(capacity=max(2 * self.kv.max_len, self.length + t))
        self.length += t
        self._held = (key_states, value_states)
        if isinstance(kwargs, dict) and self._under_fusedattn():
            kwargs[_PENDING_KEY] = self
            return key_states, value_states
        return self.store_pending()

    def store_pending(self):
        """Stores the held new keys and values; -> the cached keys and values of the rows in
        use, ``(batch, Hk, length, E|Ev)``, read back in the model's dtype."""
        if self._held is not None:
            key, value = self._held
            self._held = None
            self.kv.append(key, value)
        n, kv = self.length, self.kv
        scales = (None, None) if kv.key_scales is None else (
            kv.key_scales[: kv.batch, :, :n], kv.value_scales[: kv.batch, :, :n])
        return (_C._dequantize_cache(kv.key_cache[: kv.batch, :, :n], scales[0], self.dtype),
                _C._dequantize_cache(kv.value_cache[: kv.batch, :, :n], scales[1], self.dtype))

    def attend(self, query, attention_mask, *, causal, scale, output_attentions):
        """The held new keys and values stored and attended in one ``kv_cache_attention``
        call; ``attention_mask`` the 2D padding mask ``(B, <= length)`` (True = a real token)
        or None. -> (out (B, L, H, Ev), weights (B, H, L, length) or None)."""
        if torch.is_grad_enabled() and any(
                t.requires_grad for t in (query, *self._held)):
            raise RuntimeError("FusedCache: gradients do not flow through a cache's stored "
                               "keys and values; run under torch.no_grad() (generation) or "
                               "use transformers' DynamicCache for training")
        key, value = self._held
        self._held = None
        kpm = None if attention_mask is None else ~attention_mask.bool()
        out, _, weights = self.kv.attend(query, key, value, is_causal=causal,
                                         key_padding_mask=kpm, scale=scale,
                                         enable_gqa=key.shape[1] != query.shape[1],
                                         return_weights=output_attentions)
        if weights is not None:
            weights = weights[..., : self.length]
        return out.transpose(1, 2), weights

    def get_mask_sizes(self, query_length):
        return self.length + query_length, 0

    def get_seq_length(self):
        return self.length

    def get_max_length(self):
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self):
        self.kv, self.keys, self.values, self._held = None, None, None, None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove):
        if tokens_to_remove > 0:
            raise ValueError(f"FusedCache.crop: pass minus the number of tokens to remove, got "
                             f"{tokens_to_remove}")
        n = min(-tokens_to_remove, self.length)
        if n and self.is_initialized:
            self.store_pending()
            self.length -= n
            self.kv.lengths.sub_(n)

    def reorder_cache(self, beam_idx):
        if self.is_initialized:
            self.store_pending()
            self.kv.reorder(beam_idx.to(self.device))

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.store_pending()
            self._rebuild(index=torch.as_tensor(indices, device=self.device).reshape(-1))

    def batch_repeat_interleave(self, repeats):
        if self.is_initialized:
            self.store_pending()
            index = torch.arange(self.kv.batch, device=self.device).repeat_interleave(repeats)
            self._rebuild(index=index)

    def offload(self):
        raise NotImplementedError("FusedCache does not offload; its int8 or 16-bit storage is "
                                  "the way it saves memory")

    prefetch = offload


class FusedCache(_cache_utils.Cache):
    """A ``transformers.Cache`` for ``generate`` whose full-attention layers store keys and
    values in fusedattn's KV cache: ``cache_dtype`` None (the model's dtype), or for a
    float32, bfloat16 or float16 model ``torch.bfloat16``, ``torch.float16`` or
    ``torch.int8`` (one float scale per stored row; a quarter of float32's bytes).
    ``max_cache_len`` fixes each layer's capacity (an error past it); None grows it by
    doubling. Sliding-window and chunked layers keep transformers' window cache in the
    model's dtype; other layer kinds (linear attention, ...) are refused.

    ``model.generate(..., cache=FusedCache(model.config, cache_dtype=torch.int8))``; the
    model runs under ``attn_implementation="fusedattn"`` to attend through the decode
    kernel (under another attention function the cached rows are read back for it)."""

    def __init__(self, config, cache_dtype=None, max_cache_len=None):
        if cache_dtype is not None and cache_dtype not in (torch.float32, torch.float64,
                                                           torch.bfloat16, torch.float16,
                                                           torch.int8):
            raise ValueError(f"FusedCache: cache_dtype must be None (the model's dtype), "
                             f"torch.bfloat16, torch.float16 or torch.int8; got {cache_dtype}")
        if max_cache_len is not None and (not isinstance(max_cache_len, int)
                                          or max_cache_len <= 0):
            raise ValueError(f"FusedCache: max_cache_len must be a positive int or None, got "
                             f"{max_cache_len!r}")
        text = config.get_text_config(decoder=True)
        layer_types, per_layer_kwargs = _cache_utils.get_layer_types_and_kwargs(text)
        layers = []
        for kind, layer_kwargs in zip(layer_types, per_layer_kwargs):
            if kind == "full_attention":
                layers.append(FusedCacheLayer(cache_dtype, max_cache_len, text))
            elif kind in ("sliding_attention", "chunked_attention", "dummy"):
                layers.append(_cache_utils.DYNAMIC_LAYER_TYPE_MAPPING[kind](**layer_kwargs))
            else:
                raise ValueError(f"FusedCache: layers of type {kind!r} are not supported (full "
                                 "attention, sliding or chunked windows are)")
        self.cache_dtype = cache_dtype
        super().__init__(layers=layers)


def register(name="fusedattn"):
    """Registers fusedattn in ``transformers.AttentionInterface`` (the attention function) and
    ``AttentionMaskInterface`` (its mask function) under ``name``; idempotent. Returns ``name``,
    for ``attn_implementation=``."""
    _hf.AttentionInterface.register(name, attention_forward)
    _masking.AttentionMaskInterface.register(name, attention_mask)
    _REGISTERED_NAMES.add(name)
    return name
