"""The key/value cache of incremental decoding (``fusedattn::KVCache`` in C++, same methods).

A plain Python object holding tensors, so that ``torch.compile`` traces a decode step through
it: the op ``torch.ops.fusedattn.kv_cache_attention`` writes the new keys and values into the
preallocated storage and advances ``lengths`` in place, and the lengths stay tensors (the
compiled step does not specialise on them).
"""
import operator

import torch

from . import _C

# The overload itself: skips the packet's overload resolution on every call (a decode step
# makes one call per layer and token).
_kv_cache_attention = torch.ops.fusedattn.kv_cache_attention.default


_STORAGES = (torch.bfloat16, torch.float16, torch.int8)


def _check_cache_dtype(where, cache_dtype, model_dtype):
    if cache_dtype is None or cache_dtype == model_dtype:
        return
    if not isinstance(cache_dtype, torch.dtype):
        raise TypeError(f"{where}: cache_dtype must be a torch.dtype, got "
                        f"{type(cache_dtype).__name__} {cache_dtype!r}")
    if cache_dtype not in _STORAGES or model_dtype not in (torch.float32, torch.bfloat16,
                                                          torch.float16):
        raise ValueError(f"{where}: cache_dtype must be the model's dtype ({model_dtype}) or, for a "
                         f"float32, bfloat16 or float16 model, torch.bfloat16, torch.float16 or "
                         f"torch.int8; got {cache_dtype}")


def _positive_int(name, value):
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"KVCache: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if v <= 0:
        raise ValueError(f"KVCache: {name} must be positive, got {v}")
    return v


class KVCache:
    """Preallocated keys and values for ``max_batch`` sequences of up to ``max_len`` positions.

    ``key_cache`` ``(max_batch, num_heads, max_len, head_dim)`` and ``value_cache`` (last dim
    ``value_dim``) never reallocate while the cache fills. ``lengths`` (int64 ``(batch,)``)
    counts the cached positions per sequence; sequences may differ (prompts of different
    lengths: after a padded prefill set ``lengths`` to the real ones, and the next tokens
    overwrite the padding). ``batch`` is the number of rows in use: ``max_batch`` at first,
    changed by ``reset(batch)`` and ``reorder(index)``.

    A module fills it through ``mha(x, x, x, cache=cache, is_causal=True)``;
    ``mha.memory_cache(encoder_out)`` makes a read-only one for cross-attention, and
    ``attend`` runs the op on it directly.

    ``dtype`` is the model's (queries, new keys and values); ``cache_dtype`` how the cache
    stores keys and values: ``dtype`` by default, or in fewer bytes for a float32, bfloat16 or
    float16 model: ``torch.bfloat16`` / ``torch.float16`` (rounded), or ``torch.int8`` (a
    quarter of float32's bytes; one float scale per stored row of keys and of values,
    ``key_scales`` / ``value_scales`` ``(max_batch, num_heads, max_len)``). The append stores
    in that form and the decode kernel reads it back block by block, so a decode step streams
    the stored bytes only.
    """

    def __init__(self, max_batch, max_len, num_heads, head_dim, value_dim=None, dtype=None,
                 device=None, cache_dtype=None):
        max_batch = _positive_int("max_batch", max_batch)
        max_len = _positive_int("max_len", max_len)
        num_heads = _positive_int("num_heads", num_heads)
        head_dim = _positive_int("head_dim", head_dim)
        value_dim = head_dim if value_dim is None else _positive_int("value_dim", value_dim)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"KVCache: dtype must be a floating-point dtype, got {dtype}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        _check_cache_dtype("KVCache", cache_dtype, dtype)
        stored = dtype if cache_dtype is None else cache_dtype
        self.key_cache = torch.zeros(max_batch, num_heads, max_len, head_dim, dtype=stored,
                                     device=device)
        self.value_cache = torch.zeros(max_batch, num_heads, max_len, value_dim, dtype=stored,
                                       device=device)
        self.key_scales = self.value_scales = None
        if stored == torch.int8:
            self.key_scales = torch.zeros(max_batch, num_heads, max_len, device=device)
            self.value_scales = torch.zeros(max_batch, num_heads, max_len, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.key_padding_mask = None
        self.read_only = False

    @classmethod
    def from_tensors(cls, keys, values, lengths=None, key_padding_mask=None, read_only=True,
                     cache_dtype=None):
        """A cache over given ``keys (B, H, S, E)`` and ``values (B, H, S, Ev)`` (used in
        place, not copied; with a ``cache_dtype`` other than theirs, stored in it), full by
        default (``lengths`` = S each), read-only by default (a cross-attention memory);
        ``key_padding_mask (B, S)`` applies to every query."""
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"KVCache.from_tensors: {name} must be a 4-D tensor (B, H, S, E)")
        _check_cache_dtype("KVCache.from_tensors", cache_dtype, keys.dtype)
        self = cls.__new__(cls)
        if cache_dtype is None or cache_dtype == keys.dtype:
            self.key_cache, self.value_cache = keys, values
            self.key_scales = self.value_scales = None
        else:
            self.key_cache, self.key_scales = _C._quantize_for_cache(keys, cache_dtype)
            self.value_cache, self.value_scales = _C._quantize_for_cache(values, cache_dtype)
        b, s = keys.shape[0], keys.shape[2]
        self.lengths = (torch.full((b,), s, dtype=torch.long, device=keys.device) if lengths is None
                        else lengths)
        self.key_padding_mask = key_padding_mask
        self.read_only = read_only
        return self

    @property
    def cache_dtype(self):
        """How keys and values are stored (the model's dtype unless a smaller one was chosen)."""
        return self.key_cache.dtype

    def _row_tensors(self):
        # The tensors indexed by (batch, head, position): the caches and int8's scales.
        rows = ["key_cache", "value_cache"]
        return rows + (["key_scales", "value_scales"] if self.key_scales is not None else [])

    @property
    def max_batch(self):
        return self.key_cache.shape[0]

    @property
    def max_len(self):
        return self.key_cache.shape[2]

    @property
    def batch(self):
        return self.lengths.shape[0]

    def keys(self):
        """The cached keys of the rows in use, a view ``(batch, H, max_len, E)``."""
        return self.key_cache[: self.batch]

    def values(self):
        return self.value_cache[: self.batch]

    def reset(self, batch=None):
        """Empties the cache for ``batch`` sequences (default ``max_batch``)."""
        batch = self.max_batch if batch is None else _positive_int("batch", batch)
        if batch > self.max_batch:
            raise ValueError(f"KVCache.reset: batch {batch} exceeds max_batch = {self.max_batch}")
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.lengths.device)

    def reorder(self, index):
        """Keeps or duplicates rows of the batch, in place: row i becomes old row index[i]
        (beam search). ``index`` is an int tensor ``(new_batch,)``, new_batch <= max_batch.
        A read-only cache (a memory) is gathered into new tensors instead, of any new_batch."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("KVCache.reorder: index must be a 1-D int64 or int32 tensor")
        n = index.shape[0]
        if n > self.max_batch and not self.read_only:
            raise ValueError(f"KVCache.reorder: index has {n} rows, more than max_batch = {self.max_batch}")
        index = index.to(device=self.lengths.device, dtype=torch.long)
        if n > 0 and (int(index.min()) < 0 or int(index.max()) >= self.batch):
            raise ValueError(f"KVCache.reorder: index values must be in [0, batch = {self.batch}), "
                             f"got {index.tolist()}")
        if self.read_only:
            for name in self._row_tensors():
                setattr(self, name, getattr(self, name)[: self.batch].index_select(0, index))
        else:
            # Only the filled positions move (beam search reorders every step).
            used = int(self.lengths.max()) if self.batch > 0 else 0
            for name in self._row_tensors():
                t = getattr(self, name)
                src = t[: self.batch, :, :used].index_select(0, index)
                t[:n, :, :used].copy_(src)
        if self.key_padding_mask is not None:
            self.key_padding_mask = self.key_padding_mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    def append(self, key, value):
        """Stores ``key (batch, Hk, T, E)`` and ``value (batch, Hk, T, Ev)`` after each
        sequence's cached positions (in the cache's storage form) and advances ``lengths`` by
        T, without attending (not traced as an op by ``torch.compile``)."""
        if self.read_only:
            raise ValueError("KVCache: this cache is read-only (a cross-attention memory); "
                             "append needs a writable cache")
        _C._kv_cache_append(key, value, self.key_cache, self.value_cache, self.lengths,
                            self.key_scales, self.value_scales)

    def attend(self, query, key=None, value=None, *, is_causal=False, key_padding_mask=None,
               scale=None, enable_gqa=False, return_lse=False, return_weights=False):
        """``kv_cache_attention`` on this cache: query ``(batch, H, T, E)``; key and value
        ``(batch, Hk, T, E|Ev)`` appended first (not for a read-only cache).
        -> (out, lse or None, weights or None)."""
        if key is not None and self.read_only:
            raise ValueError("KVCache: this cache is read-only (a cross-attention memory); "
                             "attend with key=None and value=None")
        if key_padding_mask is None:
            key_padding_mask = self.key_padding_mask
        elif self.key_padding_mask is not None:
            raise ValueError("KVCache: this cache has its own key_padding_mask; pass none")
        out, lse, weights = _kv_cache_attention(
            query, key, value, self.key_cache, self.value_cache, self.lengths, scale=scale,
            is_causal=is_causal, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa,
            return_lse=return_lse, return_weights=return_weights, key_scales=self.key_scales,
            value_scales=self.value_scales)
        return out, (lse if return_lse else None), (weights if return_weights else None)

    def __repr__(self):
        return (f"KVCache(batch={self.batch}, max_batch={self.max_batch}, max_len={self.max_len}, "
                f"heads={self.key_cache.shape[1]}, head_dim={self.key_cache.shape[3]}, "
                f"value_dim={self.value_cache.shape[3]}, cache_dtype={self.key_cache.dtype}, "
                f"read_only={self.read_only})")
