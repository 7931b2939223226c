"""fusedattn as a transformers attention backend: tiny random models of each family (built from
configs, nothing downloaded) against transformers' "eager" attention on the same weights:
logits and every parameter's gradient, padded batches, greedy generation with dynamic and
static caches, packed sequences, torch.compile. And the attention sinks option of the op
against a formula written from its definition."""
import copy
import subprocess
import sys

import pytest
import torch

import fusedattn

transformers = pytest.importorskip("transformers")
from fusedattn import transformers as fa_hf  # noqa: E402

NAME = fa_hf.register()
VOCAB = 97


def test_import_fusedattn_does_not_import_transformers():
    code = "import sys, fusedattn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_register_is_idempotent_and_returns_the_name():
    assert fa_hf.register() == NAME == "fusedattn"
    assert fa_hf.register("fusedattn_other") == "fusedattn_other"
    assert "fusedattn" in transformers.AttentionInterface._global_mapping


# ---- Attention sinks on the op -------------------------------------------------------------

def _sink_reference(q, k, v, sinks, scale, mask=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    sink = sinks.double().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return p @ v.double(), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_match_the_definition(dtype, causal):
    torch.manual_seed(0)
    b, h, l, s, e = 2, 3, 7, 11, 13
    q, k, v = (torch.randn(b, h, n, e, dtype=dtype) for n in (l, s, s))
    sinks = torch.randn(h, dtype=dtype) * 2
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, :4] = True
    out, w, lse = fusedattn.attention(q, k, v, is_causal=causal, causal_alignment="bottom_right",
                                      key_padding_mask=kpm, sinks=sinks, return_weights=True,
                                      return_lse=True)
    mask = ~kpm[:, None, None, :].expand(b, h, l, s)
    if causal:
        mask = mask & torch.ones(l, s, dtype=torch.bool).tril(s - l)
    ref, p = _sink_reference(q, k, v, sinks, e ** -0.5, mask)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(w.double(), p, atol=tol, rtol=tol)
    assert (w.sum(-1) < 1).all()
    # The lse includes the sink: the weights are exp(scores - lse).
    s_full = (q.double() @ k.double().transpose(-1, -2)) * e ** -0.5
    ref_lse = torch.logsumexp(torch.cat([s_full.masked_fill(~mask, float("-inf")),
                                         sinks.double().view(1, -1, 1, 1).expand(b, h, l, 1)], -1), -1)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_sinks_gradcheck():
    torch.manual_seed(1)
    b, h, l, s, e = 1, 2, 5, 6, 3
    q, k, v = (torch.randn(b, h, n, e, dtype=torch.float64, requires_grad=True)
               for n in (l, s, s))
    sinks = torch.randn(h, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, sk: fusedattn.attention(q, k, v, is_causal=True, sinks=sk,  # noqa: E731
                                                causal_alignment="bottom_right")
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_sinks_gradients_match_the_formula_in_bf16_and_fp32():
    torch.manual_seed(2)
    b, h, l, e = 2, 4, 33, 16
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        base = [torch.randn(b, h, l, e) for _ in range(3)]
        sinks0 = torch.randn(h)
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
        sinks = sinks0.detach().to(dtype).requires_grad_()
        out = fusedattn.attention(q, k, v, is_causal=True, sinks=sinks)
        g = torch.randn_like(out, dtype=torch.float32)
        out.float().backward(g)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in base)
        s64 = sinks0.detach().double().requires_grad_()
        mask = torch.ones(l, l, dtype=torch.bool).tril()
        ref, _ = _sink_reference(q64, k64, v64, s64, e ** -0.5, mask)
        ref.backward(g.double())
        for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad),
                             (sinks.grad, s64.grad)):
            scale = theirs.abs().max().item()
            assert (ours.double() - theirs).abs().max().item() <= tol * max(scale, 1.0)


def test_sinks_varlen_equal_each_sequence_alone():
    torch.manual_seed(3)
    lens, h, e = [5, 1, 9], 4, 8
    q, k, v = (torch.randn(sum(lens), h, e) for _ in range(3))
    sinks = torch.randn(h)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    out = fusedattn.attention_varlen(q, k, v, cu, cu, 9, 9, is_causal=True, sinks=sinks)
    for a, z in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = fusedattn.attention(*(t[a:z].transpose(0, 1)[None] for t in (q, k, v)),
                                  is_causal=True, sinks=sinks)
        torch.testing.assert_close(out[a:z], one[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_sinks_bad_shape_is_a_named_error():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(RuntimeError, match=r"sinks must have shape \(H,\) = \(3,\)"):
        fusedattn.attention(q, q, q, sinks=torch.zeros(4))
    with pytest.raises(RuntimeError, match="sinks must be 1-D"):
        fusedattn.attention(q, q, q, sinks=torch.zeros(3, 1))
    with pytest.raises(RuntimeError, match="sinks must be a floating-point"):
        fusedattn.attention(q, q, q, sinks=torch.zeros(3, dtype=torch.long))


def test_sinks_with_a_fully_masked_row_give_zero():
    q = torch.randn(1, 2, 3, 4)
    kpm = torch.ones(1, 3, dtype=torch.bool)
    out = fusedattn.attention(q, q, q, key_padding_mask=kpm, sinks=torch.zeros(2))
    assert torch.equal(out, torch.zeros_like(out))


# ---- Tiny models of each family ------------------------------------------------------------

def _decoder_configs():
    C = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0)
    return {
        "llama": (C.LlamaForCausalLM, C.LlamaConfig(**common)),
        "mistral": (C.MistralForCausalLM, C.MistralConfig(**common, sliding_window=5)),
        "qwen3": (C.Qwen3ForCausalLM, C.Qwen3Config(**common, head_dim=16)),
        "gemma2": (C.Gemma2ForCausalLM, C.Gemma2Config(
            **common, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
        "gpt_oss": (C.GptOssForCausalLM, C.GptOssConfig(
            **{**common, "intermediate_size": 32}, head_dim=16, sliding_window=5,
            num_local_experts=4, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"])),
    }


DECODERS = list(_decoder_configs())


def _build(family, dtype=torch.float32, seed=0):
    cls, cfg = _decoder_configs()[family]
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    eager = cls(cfg).to(dtype)
    if family == "gpt_oss":  # sinks start at zero; make them matter
        for m in eager.modules():
            if hasattr(m, "sinks"):
                torch.nn.init.normal_(m.sinks, std=1.0)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    return eager, ours


def _left_padded(batch=3, length=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):
        mask[i, : 2 * i + 1] = 0
    ids[mask == 0] = 0
    return ids, mask


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_rel(a, b, tol, what):
    scale = b.abs().max().item()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(scale, 1e-3), f"{what}: max error {err:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_logits_and_gradients_match_eager_with_left_padding(family):
    eager, ours = _build(family)
    eager.train(), ours.train()  # dropout is 0 in these configs; training keeps every path
    ids, mask = _left_padded()
    valid = mask.bool()
    results = []
    for model in (eager, ours):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[valid].float().pow(2).mean().backward()
        results.append((logits.detach(), _grads(model)))
    (le, ge), (lo, go) = results
    _assert_close_rel(lo[valid], le[valid], 1e-5, "logits")
    assert ge.keys() == go.keys()
    for n in ge:
        _assert_close_rel(go[n], ge[n], 1e-4, f"grad {n}")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_decoder_bf16_within_twice_eagers_error(family):
    eager, ours = _build(family, torch.bfloat16)
    ref = copy.deepcopy(eager).float()  # the same (bf16-rounded) weights, fp32 eager
    ids, mask = _left_padded(length=17)
    valid = mask.bool()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask).logits[valid]
        e = eager(input_ids=ids, attention_mask=mask).logits[valid].double()
        o = ours(input_ids=ids, attention_mask=mask).logits[valid].double()
    err_e, err_o = (e - r).abs().max().item(), (o - r).abs().max().item()
    assert err_o <= 2 * err_e + 1e-3, (err_o, err_e)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_equals_eager(family, cache):
    eager, ours = _build(family)
    eager.eval(), ours.eval()
    ids, mask = _left_padded(length=9, seed=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        a = eager.generate(input_ids=ids, attention_mask=mask, **kwargs)
        b = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert a.shape[1] > ids.shape[1] + 5  # the windows (5) are shorter than the sequence
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_packed_sequences_equal_each_sequence_alone(family):
    _, ours = _build(family)
    ours.eval()
    lens = [6, 3, 8]
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in lens]
    packed = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        out = ours(input_ids=packed, position_ids=pos).logits[0]
        cu = torch.tensor([0, 6, 9, 17], dtype=torch.int32)
        out_cu = ours(input_ids=packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=8, max_length_k=8).logits[0]
        start = 0
        for s in seqs:
            alone = ours(input_ids=s[None]).logits[0]
            torch.testing.assert_close(out[start:start + len(s)], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out_cu[start:start + len(s)], alone, atol=1e-5, rtol=1e-5)
            start += len(s)


def test_output_attentions_returns_the_weights():
    eager, ours = _build("llama")
    ids, mask = _left_padded()
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        b = ours(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()
    for wa, wb in zip(a, b):
        assert wb.shape == wa.shape
        # rows of real queries, columns of real keys (eager spreads a padded row's weight)
        for i in range(ids.shape[0]):
            r = valid[i]
            torch.testing.assert_close(wb[i][:, r][:, :, r], wa[i][:, r][:, :, r], atol=1e-5,
                                       rtol=1e-5)


def test_explicit_4d_mask_is_honoured():
    eager, ours = _build("llama")
    ids, _ = _left_padded(batch=2, length=7)
    m = torch.rand(2, 1, 7, 7) > 0.3
    m |= torch.eye(7, dtype=torch.bool)
    m &= torch.ones(7, 7, dtype=torch.bool).tril()
    float_mask = torch.zeros(2, 1, 7, 7).masked_fill(~m, torch.finfo(torch.float32).min)
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=float_mask).logits
        b = ours(input_ids=ids, attention_mask=float_mask).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_forward_and_decode_step():
    _, ours = _build("llama")
    ours.eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        ref = ours(input_ids=ids).logits
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        cache = transformers.DynamicCache(config=ours.config)
        first = ours(input_ids=ids, past_key_values=cache, use_cache=True)
        step_ids = first.logits[:, -1:].argmax(-1)
        pos = torch.full((2, 1), 7)
        full = ours(input_ids=torch.cat([ids, step_ids], 1)).logits[:, -1]
        step = compiled(input_ids=step_ids, past_key_values=cache, position_ids=pos,
                        use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


# ---- Encoders and encoder-decoders ---------------------------------------------------------

def _right_padded(batch=3, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):
        mask[i, length - 2 * i:] = 0
    return ids, mask


def _pair(model):
    model.set_attn_implementation("eager")
    ours = copy.deepcopy(model)
    ours.set_attn_implementation(NAME)
    return model, ours


def _compare(eager, ours, loss_of, tol_out=1e-5, tol_grad=1e-4):
    results = []
    for model in (eager, ours):
        model.zero_grad()
        out = loss_of(model)
        out[1].backward()
        results.append((out[0].detach(), _grads(model)))
    (oe, ge), (oo, go) = results
    _assert_close_rel(oo, oe, tol_out, "output")
    for n in ge:
        _assert_close_rel(go[n], ge[n], tol_grad, f"grad {n}")


def _compare_encoder(model, ids, mask):
    """An encoder's unpadded hidden states and their gradients, eager against ours."""
    eager, ours = _pair(model)
    valid = mask.bool()

    def loss(m):
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
        return h, h.pow(2).mean()
    _compare(eager, ours, loss)


def test_bert_with_right_padding():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _compare_encoder(transformers.BertModel(cfg), *_right_padded())


def test_modernbert_local_and_global_layers():
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=3, num_attention_heads=4,
                                        local_attention=6, global_attn_every_n_layers=3,
                                        pad_token_id=0, attention_dropout=0.0)
    _compare_encoder(transformers.ModernBertModel(cfg), *_right_padded(length=23))


def test_t5_position_bias_and_cross_attention():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0)
    eager, ours = _pair(transformers.T5ForConditionalGeneration(cfg))
    ids, mask = _right_padded(length=13)
    labels = torch.randint(1, VOCAB, (3, 9))

    def loss(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.logits, out.loss
    _compare(eager, ours, loss)
    eager.eval(), ours.eval()
    with torch.no_grad():
        a = eager.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        b = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_whisper_cross_attention():
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=96,
                                     decoder_ffn_dim=96, num_mel_bins=16,
                                     max_source_positions=16, max_target_positions=32,
                                     pad_token_id=0, decoder_start_token_id=1,
                                     eos_token_id=2, bos_token_id=1)
    eager, ours = _pair(transformers.WhisperForConditionalGeneration(cfg))
    feats = torch.randn(2, 16, 32)
    dec = torch.randint(3, VOCAB, (2, 7))

    def loss(m):
        out = m(input_features=feats, decoder_input_ids=dec, labels=dec)
        return out.logits, out.loss
    _compare(eager, ours, loss)
