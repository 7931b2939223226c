"""Deployment paths for models made of fusedattn modules: torch.export with dynamic shapes
(eval and training graphs), AOTInductor and TorchScript files run by a LibTorch C++ app
(examples/deploy), and torch.autocast."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.utils
from torch.export import Dim

import fusedattn

DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy"
sys.path.insert(0, str(DEPLOY))
from model import TinyTranslator, example_inputs  # noqa: E402


class Block(nn.Module):
    """Self-attention then cross-attention, with the mask kinds a model passes."""

    def __init__(self, need_weights, mask, dropout=0.0):
        super().__init__()
        self.need_weights, self.mask = need_weights, mask
        self.self_attn = fusedattn.MultiheadAttention(16, 4, dropout=dropout, batch_first=True)
        self.cross = fusedattn.MultiheadAttention(16, 2, kdim=6, vdim=10, batch_first=True)

    def forward(self, x, mem, pad, attn_mask):
        kw = {"key_padding_mask": pad} if self.mask == "padding" else \
            {"attn_mask": attn_mask} if self.mask == "float" else {"is_causal": True}
        y, w = self.self_attn(x, x, x, need_weights=self.need_weights, **kw)
        z, w2 = self.cross(y, mem[..., :6], mem, need_weights=self.need_weights)
        if self.need_weights:
            return z, w.sum(-1) + w2.sum(-1)
        return z, y


def block_inputs(n, t, s):
    g = torch.Generator().manual_seed(n * 100 + t)
    x = torch.randn(n, t, 16, generator=g)
    mem = torch.randn(n, s, 10, generator=g)
    pad = torch.rand(n, t, generator=g) > 0.7
    pad[:, 0] = False
    attn_mask = torch.randn(t, t, generator=g)
    return x, mem, pad, attn_mask


def _dynamic():
    n, t, s = Dim("n", min=1, max=64), Dim("t", min=2, max=512), Dim("s", min=2, max=512)
    return {"x": {0: n, 1: t}, "mem": {0: n, 1: s}, "pad": {0: n, 1: t}, "attn_mask": {0: t, 1: t}}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["padding", "float", "causal"])
def test_export_eval_graph_with_dynamic_shapes(need_weights, mask):
    torch.manual_seed(0)
    model = Block(need_weights, mask).eval()
    ep = torch.export.export(model, block_inputs(2, 5, 7), dynamic_shapes=_dynamic())
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fusedattn.multihead_attention.default" in ops
    run = ep.module()
    for n, t, s in [(3, 9, 4), (1, 6, 13), (4, 2, 2)]:
        args = block_inputs(n, t, s)
        for got, want in zip(run(*args), model(*args)):
            torch.testing.assert_close(got, want)


def test_export_training_graph_matches_eager_values_and_gradients():
    torch.manual_seed(0)
    model = Block(True, "padding", dropout=0.25).train()
    ep = torch.export.export(model, block_inputs(2, 5, 7), dynamic_shapes=_dynamic())
    run = ep.module()
    args = block_inputs(3, 8, 6)
    torch.manual_seed(7)
    got = run(*args)
    torch.manual_seed(7)
    want = model(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    (got[0].sum() + got[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    exported = dict(run.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(exported[name].grad, p.grad, msg=name)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_aoti_package_and_torchscript_run_in_a_cpp_app(tmp_path):
    """examples/deploy end to end: export.py writes the AOTInductor package and TorchScript
    files, a C++ app found through find_package(fusedattn) loads and checks them."""
    out = tmp_path / "export"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    subprocess.run([sys.executable, str(DEPLOY / "export.py"), str(out)], check=True, env=env,
                   capture_output=True, timeout=900)
    assert (out / "model.pt2").exists()
    prefix = f"{fusedattn.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(DEPLOY), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    *generator], check=True, env=env, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, env=env, capture_output=True)
    run = subprocess.run([str(build / "fusedattn_deploy"), str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for kind in ("aoti", "script", "trace"):
        assert run.stdout.count(f"{kind} case") == 3, run.stdout
    assert "all outputs match Python" in run.stdout


def test_deploy_model_scripts_and_traces_like_eager():
    torch.manual_seed(0)
    model = TinyTranslator().eval()
    args = example_inputs(2, 8, 5)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, args)
        other = example_inputs(3, 12, 4, seed=3)
        want = model(*other)
        for got in (scripted(*other), traced(*other)):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("need_weights", [True, False])
def test_autocast_module_dtypes_and_gradients_as_torchs(need_weights):
    torch.manual_seed(0)
    ours = fusedattn.MultiheadAttention(16, 4, batch_first=True)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 16, requires_grad=True)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = ours(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        ref, ref_w = theirs(x, x, x, key_padding_mask=pad, need_weights=need_weights)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (w is None) == (ref_w is None)
    if w is not None:
        assert w.dtype == ref_w.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert ours.in_proj_weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_op_as_scaled_dot_product_attention(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    mask = torch.randn(5, 5)
    with torch.autocast("cpu", dtype=dtype):
        out = fusedattn.attention(q, q, q, mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, mask)
        pad = fusedattn.attention(q, q, q, key_padding_mask=torch.zeros(2, 5))  # float kpm
    assert out.dtype == ref.dtype == pad.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32
    # fp64 stays fp64 under autocast, as for torch's ops.
    with torch.autocast("cpu", dtype=dtype):
        assert fusedattn.attention(q.double(), q.double(), q.double()).dtype == torch.float64


def test_autocast_registered_for_cuda_too():
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedattn::attention", key)


def test_autocast_seed_layers():
    torch.manual_seed(0)
    sa = fusedattn.SelfAttention(8, 6)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = sa(x)
    assert out.dtype == w.dtype == torch.bfloat16
