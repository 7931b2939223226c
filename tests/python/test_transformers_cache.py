"""fusedattn.transformers.FusedCache: a transformers Cache whose full-attention layers store
keys and values in fusedattn's KV cache (the model's dtype, bfloat16, float16 or int8) and
attend through kv_cache_attention. Tiny random models (nothing downloaded) against
transformers' eager attention with its DynamicCache on the same weights."""
import collections

import pytest
import torch

transformers = pytest.importorskip("transformers")
from fusedattn import transformers as fa_hf  # noqa: E402
from test_transformers import DECODERS, VOCAB, _build, _left_padded  # noqa: E402

STORAGES = [None, torch.bfloat16, torch.int8]
GENERATE = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.fixture
def calls(monkeypatch):
    """Counts how the FusedCache layers' new keys and values were consumed: ("fused", rows)
    for kv_cache_attention's store-and-attend, ("read back",) for the fallback."""
    counts = collections.Counter()
    attend, store = fa_hf.FusedCacheLayer.attend, fa_hf.FusedCacheLayer.store_pending

    def counting_attend(self, query, *args, **kwargs):
        counts["fused", "decode" if query.shape[2] == 1 else "prefill"] += 1
        return attend(self, query, *args, **kwargs)

    def counting_store(self):
        if self._held is not None:
            counts["read back"] += 1
        return store(self)

    monkeypatch.setattr(fa_hf.FusedCacheLayer, "attend", counting_attend)
    monkeypatch.setattr(fa_hf.FusedCacheLayer, "store_pending", counting_store)
    return counts


def _teacher_forced_logits(model, ids, mask, cache, new):
    """Prefill ids[:, :-new], then one step per token of ids[:, -new:]; the logits of each
    step's last position (B, new + 1, V)."""
    prompt = ids.shape[1] - new
    out = model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], cache=cache,
                use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                    use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_generate_with_a_fused_cache_matches_eager(family, storage, calls):
    """Greedy generation: identical tokens with the model's dtype; with bfloat16 or int8
    storage, each step's logits (teacher-forced on eager's tokens) within the storage's
    rounding of eager's, and the greedy tokens the same in >= 90% of positions."""
    eager, ours = _build(family)
    eager.eval(), ours.eval()
    ids, mask = _left_padded(length=9, seed=1)
    with torch.no_grad():
        ref = eager.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        cache = fa_hf.FusedCache(ours.config, cache_dtype=storage)
        got = ours.generate(input_ids=ids, attention_mask=mask, cache=cache, **GENERATE)
        new = ref.shape[1] - ids.shape[1]
        full_mask = torch.cat([mask, torch.ones(ids.shape[0], new, dtype=mask.dtype)], 1)
        want = _teacher_forced_logits(eager, ref, full_mask,
                                      transformers.DynamicCache(config=eager.config), new)
        have = _teacher_forced_logits(ours, ref, full_mask,
                                      fa_hf.FusedCache(ours.config, cache_dtype=storage), new)
    tol = {None: 1e-5, torch.bfloat16: 2e-2, torch.int8: 5e-2}[storage]
    rows = mask.bool().any(1)
    scale = want.abs().max().item()
    err = (have - want)[rows].abs().max().item()
    assert err <= tol * scale, (err, scale)
    if storage is None:
        assert torch.equal(got, ref)
    else:
        assert (got == ref).float().mean().item() >= 0.9
    fused_layers = sum(isinstance(layer, fa_hf.FusedCacheLayer) for layer in cache.layers)
    if family in ("llama", "qwen3"):  # nothing kv_cache_attention lacks: every step fused
        assert calls["fused", "prefill"] > 0 and calls["fused", "decode"] > 0
        assert calls["read back"] == 0
    elif fused_layers:  # softcap (gemma2), sinks (gpt_oss) on the full layers: read back
        assert calls["read back"] > 0
    assert fused_layers == {"llama": 2, "qwen3": 2, "mistral": 0}.get(family, 1)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_another_attention_function_reads_the_stored_rows(storage, calls):
    """Under eager attention the layer stores and returns its rows read back: the same
    generation as eager with its own cache for the model's dtype."""
    eager, _ = _build("llama")
    eager.eval()
    ids, mask = _left_padded(length=9, seed=1)
    with torch.no_grad():
        ref = eager.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        cache = fa_hf.FusedCache(eager.config, cache_dtype=storage)
        got = eager.generate(input_ids=ids, attention_mask=mask, cache=cache, **GENERATE)
    assert calls["fused", "decode"] == 0 and calls["read back"] > 0
    if storage is None:
        assert torch.equal(got, ref)
    else:
        assert (got == ref).float().mean().item() >= 0.9
    layer = cache.layers[0]
    assert layer.get_seq_length() == got.shape[1] - 1  # the last token is not fed back
    assert layer.kv.key_cache.dtype == (storage or torch.float32)


def test_bf16_model_with_an_int8_cache():
    _, ours = _build("qwen3", dtype=torch.bfloat16)
    ours.eval()
    ids, mask = _left_padded(length=9, seed=2)
    with torch.no_grad():
        a = ours.generate(input_ids=ids, attention_mask=mask,
                          cache=fa_hf.FusedCache(ours.config), **GENERATE)
        cache = fa_hf.FusedCache(ours.config, cache_dtype=torch.int8)
        b = ours.generate(input_ids=ids, attention_mask=mask, cache=cache, **GENERATE)
    assert cache.layers[0].kv.key_cache.dtype == torch.int8
    assert cache.layers[0].kv.key_scales.dtype == torch.float32
    assert (a == b).float().mean().item() >= 0.9


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_beam_search_reorders_the_cache(storage):
    eager, ours = _build("llama")
    eager.eval(), ours.eval()
    ids, mask = _left_padded(batch=2, length=7, seed=3)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        ref = eager.generate(input_ids=ids, attention_mask=mask, **kwargs)
        got = ours.generate(input_ids=ids, attention_mask=mask,
                            cache=fa_hf.FusedCache(ours.config, cache_dtype=storage), **kwargs)
    if storage is None:
        assert torch.equal(got, ref)
    else:
        assert (got == ref).float().mean().item() >= 0.9


def test_a_growing_cache_and_a_fixed_one(monkeypatch):
    """Growth by doubling past the first allocation keeps every row; a fixed max_cache_len
    holds exactly that many positions and refuses one more by name."""
    monkeypatch.setattr(fa_hf.FusedCacheLayer, "_FIRST_CAPACITY", 4)
    eager, ours = _build("llama")
    eager.eval(), ours.eval()
    ids, mask = _left_padded(length=9, seed=1)
    with torch.no_grad():
        ref = eager.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        grown = fa_hf.FusedCache(ours.config, cache_dtype=torch.int8)
        ours.generate(input_ids=ids, attention_mask=mask, cache=grown, **GENERATE)
        assert grown.layers[0].kv.max_len >= ref.shape[1] - 1
        fixed = fa_hf.FusedCache(ours.config, max_cache_len=ref.shape[1] - 1)
        got = ours.generate(input_ids=ids, attention_mask=mask, cache=fixed, **GENERATE)
        assert torch.equal(got, ref)
        assert fixed.layers[0].kv.max_len == ref.shape[1] - 1
        assert fixed.get_max_length() == ref.shape[1] - 1
        with pytest.raises(ValueError, match="max_cache_len = 20 positions are full"):
            ours(input_ids=ids[:, :1], cache=fixed, use_cache=True)


def test_crop_select_and_repeat_keep_the_right_rows():
    _, ours = _build("llama")
    ours.eval()
    ids, mask = _left_padded(batch=3, length=9, seed=4)
    with torch.no_grad():
        def last_logits(cache, n, rows=slice(None), repeat=1):
            step = ids[rows, n:n + 1].repeat_interleave(repeat, 0)
            m = mask[rows, :n + 1].repeat_interleave(repeat, 0)
            return ours(input_ids=step, attention_mask=m, cache=cache, use_cache=True).logits

        def prefilled(n, storage=torch.int8):
            cache = fa_hf.FusedCache(ours.config, cache_dtype=storage)
            ours(input_ids=ids[:, :n], attention_mask=mask[:, :n], cache=cache, use_cache=True)
            return cache

        cropped = prefilled(8)
        cropped.crop(-2)
        assert cropped.get_seq_length() == 6
        torch.testing.assert_close(last_logits(cropped, 6), last_logits(prefilled(6), 6))

        chosen = prefilled(6)
        chosen.batch_select_indices(torch.tensor([2, 0]))
        torch.testing.assert_close(last_logits(chosen, 6, rows=[2, 0]),
                                   last_logits(prefilled(6), 6)[[2, 0]])

        repeated = prefilled(6)
        repeated.batch_repeat_interleave(2)
        torch.testing.assert_close(last_logits(repeated, 6, repeat=2),
                                   last_logits(prefilled(6), 6).repeat_interleave(2, 0))
        repeated.reset()
        assert repeated.get_seq_length() == 0 and not repeated.layers[0].is_initialized


def test_output_attentions_through_a_fused_cache():
    eager, ours = _build("llama")
    eager.eval(), ours.eval()
    ids, mask = _left_padded(length=8, seed=5)
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask, output_attentions=True,
                  cache=transformers.DynamicCache(config=eager.config), use_cache=True)
        b = ours(input_ids=ids, attention_mask=mask, output_attentions=True,
                 cache=fa_hf.FusedCache(ours.config), use_cache=True)
    valid = mask.bool()
    for wa, wb in zip(a.attentions, b.attentions):
        assert wb.shape == wa.shape
        for i in range(ids.shape[0]):
            r = valid[i]
            torch.testing.assert_close(wb[i][:, r][:, :, r], wa[i][:, r][:, :, r], atol=1e-5,
                                       rtol=1e-5)


def test_misuse_is_a_named_error():
    _, ours = _build("llama")
    with pytest.raises(ValueError, match="cache_dtype must be None"):
        fa_hf.FusedCache(ours.config, cache_dtype=torch.int32)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        fa_hf.FusedCache(ours.config, max_cache_len=0)
    ids = torch.randint(1, VOCAB, (2, 5))
    ours.train()
    with pytest.raises(RuntimeError, match="FusedCache: gradients do not flow"):
        ours(input_ids=ids, cache=fa_hf.FusedCache(ours.config), use_cache=True)
    _, gemma = _build("gemma2")  # softcap: the layer's rows read back, refused the same way
    gemma.train()
    with pytest.raises(RuntimeError, match="FusedCache: gradients do not flow"):
        gemma(input_ids=ids, cache=fa_hf.FusedCache(gemma.config), use_cache=True)
    ours.eval()
    with torch.no_grad():
        cache = fa_hf.FusedCache(ours.config)
        ours(input_ids=ids, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="the cache holds 2 sequences, the new keys 3"):
            ours(input_ids=torch.randint(1, VOCAB, (3, 1)), cache=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="FusedCache does not offload"):
            cache.layers[0].offload()
        with pytest.raises(ValueError, match="minus the number of tokens"):
            cache.crop(1)
