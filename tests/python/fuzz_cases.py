"""Bad and edge inputs for every public entry point, as data: name -> (code, expectation).

An expectation is "ok" (the code runs; its own asserts check the result: NaN still NaN,
shapes right, nothing left uninitialised) or (error type, [fragments of the message]). The
fragments are what a user needs: the argument's name and what was expected or what came.
fuzz_runner.py executes them; test_bad_inputs.py checks each result.
"""
import itertools

CASES = {}


def case(name, code, expect="ok"):
    assert name not in CASES, name
    CASES[name] = (code, expect)


def err(*fragments, kind="RuntimeError"):
    return (kind, list(fragments))


# ------------------------------------------------------------------ fusedattn.attention
QKV = "q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)\n"
A = "fusedattn.attention"

for name, args, frags in [
    ("q_1d", "torch.randn(8), torch.randn(8), torch.randn(8)", ["query must have shape", "at least 3 dims"]),
    ("q_2d", "torch.randn(5, 8), torch.randn(7, 8), torch.randn(7, 4)", ["at least 3 dims", "[5, 8]"]),
    ("key_fewer_dims", "q, k[0], v", ["same number of dims"]),
    ("value_more_dims", "q, k, v.unsqueeze(0)", ["same number of dims"]),
    ("batch_mismatch", "q, torch.randn(3, 3, 7, 8), torch.randn(3, 3, 7, 4)", ["same batch dims"]),
    ("head_dim_mismatch", "q, torch.randn(2, 3, 7, 6), v", ["key must have shape", "E = 8"]),
    ("value_len_mismatch", "q, k, torch.randn(2, 3, 6, 4)", ["value must have shape", "(3, 7)"]),
    ("value_heads_mismatch", "q, k, torch.randn(2, 2, 7, 4)", ["value must have shape"]),
    ("heads_mismatch", "q, torch.randn(2, 1, 7, 8), torch.randn(2, 1, 7, 4)", ["H = 3", "enable_gqa"]),
    ("gqa_not_divisible", "torch.randn(2, 4, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4), enable_gqa=True",
     ["multiple of the number of key/value heads", "(4)", "(3)"]),
    ("gqa_zero_kv_heads", "torch.randn(2, 4, 5, 8), torch.randn(2, 0, 7, 8), torch.randn(2, 0, 7, 4), enable_gqa=True",
     ["multiple of the number of key/value heads"]),
    ("int_query", "q.long(), k.long(), v.long()", ["float64, float32, bfloat16 or float16", "Long"]),
    ("bool_query", "q > 0, k > 0, v > 0", ["float64, float32, bfloat16 or float16", "Bool"]),
    ("complex_query", "q.cfloat(), k.cfloat(), v.cfloat()", ["float64, float32, bfloat16 or float16"]),
    ("dtype_mismatch_key", "q, k.double(), v", ["same dtype", "Double"]),
    ("dtype_mismatch_value", "q, k, v.half()", ["same dtype", "Half"]),
    ("key_on_meta", "q, k.to('meta'), v", ["same device", "key meta"]),
    ("dropout_negative", "q, k, v, dropout_p=-0.1", ["dropout_p must be in [0, 1]", "-0.1"]),
    ("dropout_above_one", "q, k, v, dropout_p=1.5", ["dropout_p must be in [0, 1]", "1.5"]),
    ("dropout_nan", "q, k, v, dropout_p=float('nan')", ["dropout_p must be in [0, 1]", "nan"]),
    ("scale_nan", "q, k, v, scale=float('nan')", ["scale must be finite"]),
    ("scale_inf", "q, k, v, scale=float('inf')", ["scale must be finite"]),
    ("scale_beyond_float32", "q, k, v, scale=1e300", ["scale must be finite in float32", "Float", "1e+300"]),
    ("bad_alignment", "q, k, v, is_causal=True, causal_alignment='bottom-right'", ["causal_alignment", "bottom-right"]),
    ("head_dim_zero_default_scale", "torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 0), v", ["head dim E", "scale="]),
    ("mask_wrong_last_dim", "q, k, v, torch.ones(5, 6, dtype=torch.bool)", ["attn_mask must broadcast", "[5, 6]"]),
    ("mask_wrong_rows", "q, k, v, torch.ones(4, 7, dtype=torch.bool)", ["attn_mask must broadcast"]),
    ("mask_too_many_dims", "q, k, v, torch.ones(1, 2, 3, 5, 7, dtype=torch.bool)", ["attn_mask must broadcast"]),
    ("mask_wrong_heads", "q, k, v, torch.ones(2, 2, 5, 7, dtype=torch.bool)", ["attn_mask must broadcast"]),
    ("mask_int", "q, k, v, torch.ones(5, 7, dtype=torch.int32)", ["attn_mask must be bool or have query's dtype", "Int"]),
    ("mask_other_float", "q, k, v, torch.zeros(5, 7, dtype=torch.float64)", ["attn_mask must be bool or have query's dtype", "Double"]),
    ("mask_on_meta", "q, k, v, torch.ones(5, 7, dtype=torch.bool, device='meta')", ["attn_mask", "query's device", "meta"]),
    ("kpm_wrong_len", "q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)", ["key_padding_mask must have shape", "[2, 6]"]),
    ("kpm_wrong_batch", "q, k, v, key_padding_mask=torch.zeros(3, 7, dtype=torch.bool)", ["key_padding_mask must have shape"]),
    ("kpm_1d", "q, k, v, key_padding_mask=torch.zeros(7, dtype=torch.bool)", ["key_padding_mask must have shape"]),
    ("kpm_3d", "q, k, v, key_padding_mask=torch.zeros(2, 1, 7, dtype=torch.bool)", ["key_padding_mask must have shape"]),
    ("kpm_int", "q, k, v, key_padding_mask=torch.zeros(2, 7, dtype=torch.int64)", ["key_padding_mask must be bool", "Long"]),
    ("kpm_on_meta", "q, k, v, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device='meta')", ["key_padding_mask", "meta"]),
]:
    case(f"attention/{name}", QKV + f"{A}({args})\n", err(*frags))

# Edge inputs that must work, with what the result must be.
case("attention/zero_queries", QKV + f"""
out = {A}(torch.randn(2, 3, 0, 8), k, v)
assert out.shape == (2, 3, 0, 4)
""")
case("attention/zero_keys", QKV + f"""
out, w, lse = {A}(q, torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 4), return_weights=True, return_lse=True)
assert out.shape == (2, 3, 5, 4) and (out == 0).all() and w.shape == (2, 3, 5, 0)
assert torch.isneginf(lse).all()
""")
case("attention/zero_batch", f"""
out = {A}(torch.randn(0, 3, 5, 8), torch.randn(0, 3, 7, 8), torch.randn(0, 3, 7, 4))
assert out.shape == (0, 3, 5, 4)
""")
case("attention/value_dim_zero", QKV + f"""
out = {A}(q, k, torch.randn(2, 3, 7, 0))
assert out.shape == (2, 3, 5, 0)
""")
case("attention/no_batch_dims", f"""
out = {A}(torch.randn(3, 5, 8), torch.randn(3, 7, 8), torch.randn(3, 7, 4))
assert out.shape == (3, 5, 4)
""")
case("attention/many_batch_dims", f"""
q, k, v = torch.randn(2, 2, 2, 3, 5, 8), torch.randn(2, 2, 2, 3, 7, 8), torch.randn(2, 2, 2, 3, 7, 4)
out = {A}(q, k, v, key_padding_mask=torch.zeros(2, 2, 2, 7, dtype=torch.bool))
torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
""")
for dtype in ("float32", "float64", "bfloat16", "float16"):
    case(f"attention/nan_query_propagates/{dtype}", QKV + f"""
q, k, v = q.to(torch.{dtype}), k.to(torch.{dtype}), v.to(torch.{dtype})
q[0, 1, 2, 3] = float('nan')
out = {A}(q, k, v)
assert out[0, 1, 2].isnan().all(), out[0, 1, 2]
assert not out[1].isnan().any() and not out[0, 0].isnan().any()
""")
    case(f"attention/nan_value_propagates/{dtype}", QKV + f"""
q, k, v = q.to(torch.{dtype}), k.to(torch.{dtype}), v.to(torch.{dtype})
v[1, 2, 4, 0] = float('nan')
out = {A}(q, k, v)
assert out[1, 2, :, 0].isnan().all() and not out[1, 2, :, 1:].isnan().any()
""")
    case(f"attention/nan_in_float_mask_propagates/{dtype}", QKV + f"""
q, k, v = q.to(torch.{dtype}), k.to(torch.{dtype}), v.to(torch.{dtype})
m = torch.zeros(5, 7, dtype=torch.{dtype}); m[3, 2] = float('nan')
out = {A}(q, k, v, m)
assert out[:, :, 3].isnan().all() and not out[:, :, :3].isnan().any()
""")
    case(f"attention/inf_key_gives_nan_not_garbage/{dtype}", QKV + f"""
q, k, v = q.to(torch.{dtype}), k.to(torch.{dtype}), v.to(torch.{dtype})
k[0, 0, 3, 0] = float('inf')
out = {A}(q, k, v)
ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
assert torch.equal(out[0, 0].isnan(), ref[0, 0].isnan()), (out[0, 0], ref[0, 0])
assert not out[1].isnan().any()
""")
    case(f"attention/all_masked_rows_zero/{dtype}", QKV + f"""
q, k, v = q.to(torch.{dtype}), k.to(torch.{dtype}), v.to(torch.{dtype})
m = torch.ones(5, 7, dtype=torch.bool); m[2] = False
out, w, lse = {A}(q, k, v, m, return_weights=True, return_lse=True)
assert (out[:, :, 2] == 0).all() and (w[:, :, 2] == 0).all() and torch.isneginf(lse[:, :, 2]).all()
assert not out.isnan().any()
""")
    case(f"attention/huge_logits_finite/{dtype}", QKV + f"""
big = 60.0 if torch.{dtype} in (torch.float16,) else 1e3
q, k, v = (q * big).to(torch.{dtype}), (k * big).to(torch.{dtype}), v.to(torch.{dtype})
out = {A}(q, k, v)
assert torch.isfinite(out).all()
""")
case("attention/non_contiguous_and_expanded", f"""
q = torch.randn(2, 5, 3, 8).transpose(1, 2)
k = torch.randn(1, 3, 7, 8).expand(2, 3, 7, 8)
v = torch.randn(2, 3, 4, 7).transpose(-1, -2)
m = torch.rand(7) > 0.3
m[0] = True
out = {A}(q, k, v, m)
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, m.expand(5, 7))
torch.testing.assert_close(out, ref)
""")
case("attention/float_key_padding_mask", QKV + f"""
pad = torch.zeros(2, 7); pad[1, 3:] = float('-inf')
out = {A}(q, k, v, key_padding_mask=pad)
ref = {A}(q, k, v, key_padding_mask=torch.isinf(pad))
torch.testing.assert_close(out, ref)
""")
case("attention/dropout_one_gives_zeros", QKV + f"""
out = {A}(q, k, v, dropout_p=1.0)
assert (out == 0).all()
""")
case("attention/meta_inputs_shape_only", f"""
q, k, v = (torch.randn(2, 3, n, 8, device='meta') for n in (5, 7, 7))
out, w, lse = {A}(q, k, v, return_weights=True, return_lse=True)
assert out.device.type == 'meta' and out.shape == (2, 3, 5, 8) and w.shape == (2, 3, 5, 7)
""")
case("attention/meta_head_dim_mismatch", f"""
q = torch.randn(2, 3, 5, 8, device='meta')
{A}(q, torch.randn(2, 3, 7, 6, device='meta'), torch.randn(2, 3, 7, 4, device='meta'))
""", err("key must have shape", "E = 8"))
case("attention/meta_kpm_shape", f"""
q, k, v = (torch.randn(2, 3, n, 8, device='meta') for n in (5, 7, 7))
{A}(q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device='meta'))
""", err("key_padding_mask must have shape"))
case("attention/grad_of_bool_mask_is_none", QKV + f"""
q.requires_grad_(); m = torch.rand(5, 7) > 0.2; m[:, 0] = True
{A}(q, k, v, m).sum().backward()
assert q.grad is not None and torch.isfinite(q.grad).all()
""")
case("attention/float_mask_gradient", QKV + f"""
m = torch.zeros(5, 7, requires_grad=True)
{A}(q, k, v, m).sum().backward()
assert m.grad is not None and m.grad.shape == (5, 7)
""")
case("attention/nan_grad_out_propagates", QKV + f"""
q.requires_grad_()
out = {A}(q, k, v)
g = torch.ones_like(out); g[0, 0, 1, 0] = float('nan')
out.backward(g)
assert q.grad[0, 0, 1].isnan().all() and not q.grad[1].isnan().any()
""")

# Dynamic shapes: the fake kernels check symbolic sizes (one implementation with the real).
case("compile/dynamic_head_dim_mismatch", f"""
f = torch.compile(lambda q, k, v: {A}(q, k, v), fullgraph=True, dynamic=True)
assert f(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)).shape == (2, 3, 5, 4)
f(torch.randn(2, 3, 9, 8), torch.randn(2, 3, 11, 6), torch.randn(2, 3, 11, 4))
""", err("key must have shape (..., Hk, S, E)", kind="torch._dynamo.exc.TorchRuntimeError"))
case("compile/dynamic_kpm_mismatch", f"""
f = torch.compile(lambda q, k, v, m: {A}(q, k, v, key_padding_mask=m), fullgraph=True, dynamic=True)
f(torch.randn(3, 3, 9, 8), torch.randn(3, 3, 11, 8), torch.randn(3, 3, 11, 4), torch.rand(3, 12) > 0.5)
""", err("key_padding_mask must have shape", kind="torch._dynamo.exc.TorchRuntimeError"))
case("compile/dynamic_valid_sizes_recompile_free", f"""
import torch._dynamo.testing
cnt = torch._dynamo.testing.CompileCounter()
f = torch.compile(lambda q, k, v: {A}(q, k, v, is_causal=True), backend=cnt, fullgraph=True, dynamic=True)
for n, l, s in ((2, 5, 7), (3, 9, 4), (4, 6, 13)):
    q, k, v = torch.randn(n, 3, l, 8), torch.randn(n, 3, s, 8), torch.randn(n, 3, s, 4)
    torch.testing.assert_close(f(q, k, v), {A}(q, k, v, is_causal=True))
assert cnt.frame_count == 1, cnt.frame_count
""")
case("export/independent_key_value_lengths_rejected", f"""
from torch.export import Dim
class M(torch.nn.Module):
    def forward(self, q, k, v):
        return {A}(q, k, v)
q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
torch.export.export(M(), (q, k, v), dynamic_shapes=({{2: Dim('L')}}, {{2: Dim('S')}}, {{2: Dim('S2')}}))
""", err("S2", "must always be equal", kind="torch._dynamo.exc.UserError"))
case("export/mismatch_at_run_time_is_caught", f"""
from torch.export import Dim
class M(torch.nn.Module):
    def forward(self, q, k, v):
        return {A}(q, k, v)
q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
S = Dim('S')
ep = torch.export.export(M(), (q, k, v), dynamic_shapes=({{2: Dim('L')}}, {{2: S}}, {{2: S}}))
ep.module()(torch.randn(2, 3, 9, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 4))
""", err("Guard failed", kind="AssertionError"))

# ------------------------------------------------------------------ MultiheadAttention: constructor
M = "fusedattn.MultiheadAttention"
for name, args, kind, frags in [
    ("embed_dim_zero", "0, 2", "RuntimeError", ["embed_dim must be positive"]),
    ("embed_dim_negative", "-8, 2", "RuntimeError", ["embed_dim must be positive"]),
    ("num_heads_zero", "8, 0", "RuntimeError", ["num_heads must be positive"]),
    ("num_heads_negative", "8, -2", "RuntimeError", ["num_heads must be positive"]),
    ("not_divisible", "10, 3", "RuntimeError", ["embed_dim (10) must be divisible by num_heads (3)"]),
    ("num_heads_float", "16, 2.5", "TypeError", ["num_heads must be an int", "2.5"]),
    ("embed_dim_str", "'16', 2", "TypeError", ["embed_dim must be an int", "str"]),
    ("kdim_float", "16, 2, kdim=3.0", "TypeError", ["kdim must be an int"]),
    ("kdim_zero", "16, 2, kdim=0", "RuntimeError", ["kdim and vdim must be positive"]),
    ("vdim_negative", "16, 2, vdim=-1", "RuntimeError", ["kdim and vdim must be positive"]),
    ("head_dim_zero", "16, 2, head_dim=0", "RuntimeError", ["head_dim must be positive"]),
    ("head_dim_float", "16, 2, head_dim=4.5", "TypeError", ["head_dim must be an int"]),
    ("dropout_negative", "16, 2, dropout=-0.5", "RuntimeError", ["dropout must be in"]),
    ("dropout_two", "16, 2, dropout=2.0", "RuntimeError", ["dropout must be in"]),
    ("dtype_int", "16, 2, dtype=torch.int32", "TypeError", ["dtype must be a floating-point dtype", "int32"]),
    ("dtype_bool", "16, 2, dtype=torch.bool", "TypeError", ["dtype must be a floating-point dtype"]),
]:
    case(f"mha_init/{name}", f"{M}({args})\n", err(*frags, kind=kind))
for name, args in [("meta_device", "16, 2, device='meta'"), ("fp16", "16, 2, dtype=torch.float16"),
                   ("head_dim_custom", "10, 5, head_dim=3"), ("all_options", "12, 3, dropout=0.1, bias=False, "
                   "add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=7, batch_first=True")]:
    case(f"mha_init/ok_{name}", f"m = {M}({args})\nassert m.num_heads > 0\n")

# ------------------------------------------------------------------ MultiheadAttention: forward
MHA = f"m = {M}(8, 2)\nx = torch.randn(5, 3, 8)\n"
for name, call, frags in [
    ("query_1d", "m(torch.randn(8), torch.randn(8), torch.randn(8))", ["query must be 3-D", "2-D (L, E) unbatched"]),
    ("query_4d", "m(torch.randn(1, 5, 3, 8), x, x)", ["query must be 3-D"]),
    ("key_dims_differ", "m(x, x[0], x)", ["key and value must have as many dims as query"]),
    ("embed_mismatch", "m(torch.randn(5, 3, 7), x, x)", ["embed_dim = 8"]),
    ("key_embed_mismatch", "m(x, torch.randn(5, 3, 6), torch.randn(5, 3, 6))", ["key and value must have embed_dim = 8"]),
    ("batch_mismatch", "m(x, torch.randn(5, 2, 8), torch.randn(5, 2, 8))", ["same batch size"]),
    ("seq_mismatch", "m(x, x, torch.randn(4, 3, 8))", ["same sequence length"]),
    ("dtype_mismatch", "m(x.double(), x.double(), x.double())", ["parameter dtype (Float)", "got Double"]),
    ("qkv_dtypes_differ", "m(x, x.double(), x)", ["same dtype"]),
    ("kpm_wrong_shape", "m(x, x, x, key_padding_mask=torch.zeros(3, 4, dtype=torch.bool))", ["key_padding_mask must have shape (N, S) = (3, 5)"]),
    ("kpm_1d_batched", "m(x, x, x, key_padding_mask=torch.zeros(5, dtype=torch.bool))", ["key_padding_mask must have shape (N, S)"]),
    ("kpm_int", "m(x, x, x, key_padding_mask=torch.zeros(3, 5, dtype=torch.int64))", ["only bool and float key_padding_mask", "Long"]),
    ("mask_1d", "m(x, x, x, attn_mask=torch.zeros(5, dtype=torch.bool))", ["attn_mask must be 2-D (L, S) or 3-D"]),
    ("mask_4d", "m(x, x, x, attn_mask=torch.zeros(3, 2, 5, 5, dtype=torch.bool))", ["attn_mask must be 2-D (L, S) or 3-D"]),
    ("mask_2d_wrong", "m(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))", ["2-D attn_mask must have shape (L, S) = (5, 5)"]),
    ("mask_3d_wrong_heads", "m(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))", ["3-D attn_mask must have shape (N * num_heads, L, S) = (6, 5, 5)"]),
    ("mask_int", "m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int32))", ["only bool and float attn_mask", "Int"]),
    ("mask_on_meta", "m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool, device='meta'))", ["attn_mask", "meta"]),
    ("kpm_on_meta", "m(x, x, x, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool, device='meta'))", ["key_padding_mask", "meta"]),
    ("wrong_causal_mask_where_read", "m(x, x, x, attn_mask=torch.zeros(2, 2), is_causal=True)", ["2-D attn_mask must have shape"]),
]:
    case(f"mha_forward/{name}", MHA + call + "\n", err(*frags))
case("mha_forward/unbatched_kpm_2d", MHA + """
u = torch.randn(5, 8)
m(u, u, u, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
""", err("for unbatched input key_padding_mask must have shape (S)"))
case("mha_forward/kdim_mismatch", f"""
m = {M}(8, 2, kdim=5, vdim=6)
x = torch.randn(5, 3, 8)
m(x, torch.randn(4, 3, 4), torch.randn(4, 3, 6))
""", err("key must have kdim = 5"))
case("mha_forward/vdim_mismatch", f"""
m = {M}(8, 2, kdim=5, vdim=6)
x = torch.randn(5, 3, 8)
m(x, torch.randn(4, 3, 5), torch.randn(4, 3, 5))
""", err("value must have vdim = 6"))
for flags in itertools.product([False, True], repeat=3):
    bias_kv, zero_attn, batch_first = flags
    tag = "_".join(n for n, f in zip(("bias_kv", "zero_attn", "batch_first"), flags) if f) or "plain"
    case(f"mha_forward/nan_query_propagates/{tag}", f"""
m = {M}(8, 2, add_bias_kv={bias_kv}, add_zero_attn={zero_attn}, batch_first={batch_first})
x = torch.randn(3, 5, 8) if {batch_first} else torch.randn(5, 3, 8)
y = x.clone()
if {batch_first}:
    y[1, 2, 0] = float('nan')
else:
    y[2, 1, 0] = float('nan')
out, w = m(y, x, x)
row = out[1, 2] if {batch_first} else out[2, 1]
assert row.isnan().all(), row
others = out[0] if {batch_first} else out[:, 0]
assert not others.isnan().any()
""")
    case(f"mha_forward/all_keys_padded_gives_zeros/{tag}", f"""
m = {M}(8, 2, add_bias_kv={bias_kv}, add_zero_attn={zero_attn}, batch_first={batch_first}, bias=False)
x = torch.randn(3, 5, 8) if {batch_first} else torch.randn(5, 3, 8)
pad = torch.zeros(3, 5, dtype=torch.bool); pad[1] = True
out, w = m(x, x, x, key_padding_mask=pad)
assert not out.isnan().any() and not w.isnan().any()
if not ({bias_kv} or {zero_attn}):  # no extra key column to attend to
    sample = out[1] if {batch_first} else out[:, 1]
    assert (sample == 0).all()
""")
    case(f"mha_forward/is_causal_alone/{tag}", f"""
m = {M}(8, 2, add_bias_kv={bias_kv}, add_zero_attn={zero_attn}, batch_first={batch_first})
x = torch.randn(3, 5, 8) if {batch_first} else torch.randn(5, 3, 8)
causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
torch.testing.assert_close(m(x, x, x, is_causal=True)[0], m(x, x, x, attn_mask=causal)[0])
""")
case("mha_forward/zero_batch", MHA + """
out, w = m(torch.randn(5, 0, 8), torch.randn(7, 0, 8), torch.randn(7, 0, 8))
assert out.shape == (5, 0, 8) and w.shape == (0, 5, 7)
""")
case("mha_forward/zero_length_query", MHA + """
out, w = m(torch.randn(0, 3, 8), x, x)
assert out.shape == (0, 3, 8) and w.shape == (3, 0, 5)
""")
case("mha_forward/zero_length_keys", MHA + """
out, w = m(x, torch.randn(0, 3, 8), torch.randn(0, 3, 8))
assert out.shape == (5, 3, 8) and not out.isnan().any()
""")
case("mha_forward/float_kpm_and_bool_mask", MHA + """
pad = torch.zeros(3, 5); pad[0, 4] = float('-inf')
out, _ = m(x, x, x, key_padding_mask=pad, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
ref, _ = m(x, x, x, key_padding_mask=torch.isinf(pad))
torch.testing.assert_close(out, ref)
""")
case("mha_forward/requires_grad_params_in_no_grad", MHA + """
with torch.no_grad():
    out, _ = m(x, x, x)
assert not out.requires_grad
""")
case("mha_forward/inference_mode", MHA + """
with torch.inference_mode():
    out, _ = m(x, x, x)
assert out.shape == (5, 3, 8)
""")
for kind in ("fp16", "bf16"):
    case(f"mha_forward/half_module/{kind}", MHA.replace("(8, 2)", "(8, 2, dtype=torch.float16)" if kind == "fp16"
                                                        else "(8, 2, dtype=torch.bfloat16)") + f"""
x = x.to(m.out_proj.weight.dtype)
out, w = m(x, x, x)
assert out.dtype == x.dtype and torch.isfinite(out).all()
""")

# ------------------------------------------------------------------ the single-head layers
for name, code, frags in [
    ("self_attention_in_dim", "m = fusedattn.SelfAttention(6, 4)\nm(torch.randn(2, 5, 7))", ["in_dim = 6"]),
    ("self_attention_kpm", "m = fusedattn.SelfAttention(6, 4)\nm(torch.randn(2, 5, 6), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))",
     ["key_padding_mask"]),
    ("self_attention_dtype", "m = fusedattn.SelfAttention(6, 4)\nm(torch.randn(2, 5, 6).double())", ["parameter dtype (Float)", "Double"]),
    ("self_attention_1d", "m = fusedattn.SelfAttention(6, 4)\nm(torch.randn(6))", ["SelfAttention"]),
    ("self_attention_zero_dims", "fusedattn.SelfAttention(0, 4)", ["must be positive"]),
    ("pooling_score", "fusedattn.AttentionPooling(4, score='dot')", ["luong", "bahdanau"]),
    ("pooling_input_dim", "m = fusedattn.AttentionPooling(4, units=3)\nm(torch.randn(2, 5, 6))", ["AttentionPooling"]),
    ("pooling_kpm", "m = fusedattn.AttentionPooling(4, units=3)\nm(torch.randn(2, 5, 4), torch.zeros(2, 6, dtype=torch.bool))", ["key_padding_mask"]),
    ("pooling_zero_units", "fusedattn.AttentionPooling(4, units=0)", ["must be positive"]),
    ("gaussian_bandwidth_zero", "fusedattn.gaussian_kernel_attention(torch.rand(5), torch.rand(7), torch.rand(7), bandwidth=0.0)",
     ["bandwidth must be positive and finite"]),
    ("gaussian_bandwidth_nan", "fusedattn.gaussian_kernel_attention(torch.rand(5), torch.rand(7), torch.rand(7), bandwidth=float('nan'))",
     ["bandwidth must be positive and finite"]),
    ("gaussian_module_bandwidth", "fusedattn.GaussianKernelAttention(-1.0)", ["bandwidth must be positive"]),
    ("gaussian_int_points", "fusedattn.gaussian_kernel_attention(torch.arange(5), torch.arange(7), torch.arange(7))", ["floating point", "Long"]),
    ("gaussian_key_value_len", "fusedattn.gaussian_kernel_attention(torch.rand(5), torch.rand(7), torch.rand(6))", ["gaussian"]),
    ("gaussian_dim_mismatch", "fusedattn.gaussian_kernel_attention(torch.rand(2, 5, 3), torch.rand(2, 7, 2), torch.rand(2, 7, 4))", ["gaussian"]),
]:
    case(f"layers/{name}", code + "\n", err(*frags))
case("layers/gaussian_far_points_accurate", """
q, k = torch.rand(5) * 0.5 + 1e4, torch.rand(7) * 0.5 + 1e4
v = torch.rand(7)
out = fusedattn.gaussian_kernel_attention(q, k, v, bandwidth=0.5)
w = torch.softmax(-(q.double()[:, None] - k.double()[None]) ** 2 / (2 * 0.25), -1)
torch.testing.assert_close(out.double(), w @ v.double(), atol=1e-5, rtol=1e-5)
""")
case("layers/self_attention_nan_propagates", """
m = fusedattn.SelfAttention(6, 4)
x = torch.randn(2, 5, 6); x[1, 3, 0] = float('nan')
out, w = m(x)
assert out[1].isnan().any() and not out[0].isnan().any()
""")
case("layers/pooling_all_padding_row", """
m = fusedattn.AttentionPooling(4, units=3)
pad = torch.zeros(2, 5, dtype=torch.bool); pad[1] = True
out, w = m(torch.randn(2, 5, 4), pad)
assert not out[0].isnan().any()
""")

# ------------------------------------------------------------------ the ops by name (the schema)
OPS = "torch.ops.fusedattn"
for name, code, kind, frags in [
    ("attention_tensor_as_string", f"{OPS}.attention('q', torch.randn(1, 2, 3), torch.randn(1, 2, 3))", "RuntimeError",
     ["attention", "Expected a value of type 'Tensor'"]),
    ("attention_bad_keyword", f"{OPS}.attention(*(torch.randn(1, 2, 3, 4),) * 3, causal=True)", "RuntimeError",
     ["Unknown keyword argument 'causal'"]),
    ("attention_alignment_type", f"{OPS}.attention(*(torch.randn(1, 2, 3, 4),) * 3, causal_alignment=1)", "RuntimeError",
     ["causal_alignment"]),
    ("mha_zero_heads", f"x = torch.randn(5, 2, 8)\n{OPS}.multihead_attention(x, x, x, 0, torch.randn(24, 8), None, None, None, None, None, None, False, 0.0, torch.randn(8, 8), None)",
     "RuntimeError", ["num_heads must be positive"]),
    ("mha_no_weights", f"x = torch.randn(5, 2, 8)\n{OPS}.multihead_attention(x, x, x, 2, None, None, None, None, None, None, None, False, 0.0, torch.randn(8, 8), None)",
     "RuntimeError", ["needs in_proj_weight, or all of q_proj_weight, k_proj_weight, v_proj_weight"]),
    ("mha_in_proj_not_divisible", f"x = torch.randn(5, 2, 8)\n{OPS}.multihead_attention(x, x, x, 3, torch.randn(24, 8), None, None, None, None, None, None, False, 0.0, torch.randn(8, 8), None)",
     "RuntimeError", ["must be divisible by num_heads = 3"]),
    ("mha_dropout_bad", f"x = torch.randn(5, 2, 8)\n{OPS}.multihead_attention(x, x, x, 2, torch.randn(24, 8), None, None, None, None, None, None, False, 1.5, torch.randn(8, 8), None)",
     "RuntimeError", ["dropout must be in [0, 1]"]),
    ("mha_bias_k_alone", f"x = torch.randn(5, 2, 8)\n{OPS}.multihead_attention(x, x, x, 2, torch.randn(24, 8), None, None, None, None, torch.randn(1, 1, 8), None, False, 0.0, torch.randn(8, 8), None)",
     "RuntimeError", ["bias_k and bias_v come together"]),
    ("cpp_module_zero_heads", "fusedattn._C.cpp.MultiheadAttention(8, 0)", "RuntimeError", ["num_heads must be positive"]),
    ("cpp_module_not_divisible", "fusedattn._C.cpp.MultiheadAttention(10, 4)", "RuntimeError", ["must be divisible by num_heads (4)"]),
    ("cpp_self_attention_zero", "fusedattn._C.cpp.SelfAttention(0, 4)", "RuntimeError", ["must be positive"]),
    ("cpp_pooling_score", "fusedattn._C.cpp.AttentionPooling(4, 8, 'additive')", "RuntimeError", ["luong", "bahdanau"]),
    ("cpp_gaussian_bandwidth", "fusedattn._C.cpp.GaussianKernelAttention(0.0, True)", "RuntimeError", ["bandwidth must be positive"]),
    ("cpp_module_forward_shape", "m = fusedattn._C.cpp.MultiheadAttention(8, 2)\nx = torch.randn(5, 3, 8)\nm.forward(x, torch.randn(5, 2, 8), torch.randn(5, 2, 8))",
     "RuntimeError", ["same batch size"]),
]:
    case(f"ops/{name}", code + "\n", err(*frags, kind=kind))

# More edge inputs that must work.
case("attention/scale_zero_uniform", QKV + f"""
out = {A}(q, k, v, scale=0.0)
torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand(2, 3, 5, 4))
""")
case("attention/one_query_long_keys", f"""
q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 20000, 8), torch.randn(1, 2, 20000, 3)
torch.testing.assert_close({A}(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
""")
case("attention/gqa_average_weights", f"""
q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 4)
out, w, _ = {A}(q, k, v, enable_gqa=True, return_weights=True, average_weights=True)
_, full, _ = {A}(q, k, v, enable_gqa=True, return_weights=True)
torch.testing.assert_close(w, full.mean(1))
""")
case("attention/fp16_large_values_no_overflow_garbage", f"""
q, k = torch.randn(1, 2, 5, 8).half(), torch.randn(1, 2, 7, 8).half()
v = torch.full((1, 2, 7, 4), 6e4).half()
out = {A}(q, k, v)
assert torch.isfinite(out).all() and (out > 5.9e4).all()
""")
case("attention/causal_more_queries_than_keys", f"""
q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4)
out, w, lse = {A}(q, k, v, is_causal=True, causal_alignment="bottom_right", return_weights=True, return_lse=True)
assert (out[:, :, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
assert not out.isnan().any()
""")
for dtype in ("float32", "float64", "bfloat16", "float16"):
    case(f"attention/backward_all_masked_rows_zero_grad/{dtype}", QKV + f"""
q, k, v = (t.to(torch.{dtype}).requires_grad_() for t in (q, k, v))
m = torch.ones(5, 7, dtype=torch.bool); m[1] = False
{A}(q, k, v, m).float().sum().backward()
assert (q.grad[:, :, 1] == 0).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
""")
    case(f"attention/dropout_keeps_nan/{dtype}", QKV + f"""
q, k, v = q.to(torch.{dtype}), k.to(torch.{dtype}), v.to(torch.{dtype})
v[0, 0, :, 1] = float('nan')
out = {A}(q, k, v, dropout_p=0.5)
assert out[0, 0, :, 1].isnan().any()
""")
case("mha_forward/float_mask_all_neg_inf_row", MHA + """
mask = torch.zeros(5, 5); mask[2] = float('-inf')
out, w = m(x, x, x, attn_mask=mask)
assert not out.isnan().any() and (w[:, 2] == 0).all()
""")
case("mha_forward/need_weights_per_head_shape", MHA + """
out, w = m(x, x, x, average_attn_weights=False)
assert w.shape == (3, 2, 5, 5)
""")
case("mha_forward/unbatched_3d_mask", MHA + """
u = torch.randn(5, 8)
out, w = m(u, u, u, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool))
assert out.shape == (5, 8) and w.shape == (5, 5)
""")
case("mha_forward/nested_misuse_named", """
m = fusedattn.MultiheadAttention(8, 2)
nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(6, 8)], layout=torch.jagged)
m(nt, nt, nt)
""", err("batch_first=True", kind="ValueError"))
case("mha_forward/nested_empty", """
m = fusedattn.MultiheadAttention(8, 2, batch_first=True)
nt = torch.nested.nested_tensor([])
m(nt, nt, nt)
""", err("must be 3-D", kind="ValueError"))
case("mha_forward/compile_dynamic_kpm_mismatch", """
m = fusedattn.MultiheadAttention(8, 2, batch_first=True)
f = torch.compile(m, fullgraph=True, dynamic=True)
x = torch.randn(3, 5, 8)
f(x, x, x, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
x = torch.randn(2, 9, 8)
f(x, x, x, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))
""", err("key_padding_mask must have shape (N, S)", kind="torch._dynamo.exc.TorchRuntimeError"))
case("mha_forward/jit_script_bad_input_named", MHA + """
s = torch.jit.script(m)
s(x, torch.randn(5, 2, 8), torch.randn(5, 2, 8))
""", err("same batch size"))
