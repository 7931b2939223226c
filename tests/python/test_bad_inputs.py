"""Degenerate and bad inputs: each case runs in its own process, so that a crash (a signal) is a
failed test rather than a dead run. A case passes when it prints OK, or when it raises the
expected error type with every expected fragment in its message."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuzz_cases import CASES

PRELUDE = "import torch, fusedattn\ntorch.manual_seed(0)\n"


def run_case(body):
    code = PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode >= 0, f"killed by signal {-r.returncode}:\n{r.stderr[-2000:]}"
    return r


def expect_ok(body):
    r = run_case(textwrap.dedent(body) + "\nprint('OK')\n")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]


def expect_error(body, error, *fragments):
    r = run_case(body)
    assert r.returncode != 0, "no error raised"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(error), r.stderr[-2000:]
    for f in fragments:
        assert f in r.stderr, (f, r.stderr[-2000:])


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("average", [False, True])
def test_zero_heads_give_empty_outputs_not_a_crash(dtype, average):
    expect_ok(f"""
        dt = torch.{dtype}
        q = torch.randn(2, 0, 5, 8, dtype=dt, requires_grad=True)
        k = torch.randn(2, 0, 7, 8, dtype=dt, requires_grad=True)
        v = torch.randn(2, 0, 7, 4, dtype=dt, requires_grad=True)
        out, w, lse = fusedattn.attention(q, k, v, return_weights=True, return_lse=True,
                                          average_weights={average})
        assert out.shape == (2, 0, 5, 4) and lse.shape == (2, 0, 5)
        assert w.shape == ((2, 5, 7) if {average} else (2, 0, 5, 7)) and (w == 0).all()
        grads = torch.autograd.grad(out.sum() + w.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or g.shape == t.shape for g, t in zip(grads, (q, k, v)))
    """)


def test_zero_heads_on_the_reference_path():
    expect_ok("""
        import os
        os.environ["FUSEDATTN_CPU_KERNEL"] = "reference"
        q, k, v = (torch.randn(2, 0, n, 8) for n in (5, 7, 7))
        out, w, _ = fusedattn.attention(q, k, v, return_weights=True, average_weights=True)
        assert out.shape == (2, 0, 5, 8) and w.shape == (2, 5, 7) and (w == 0).all()
    """)


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_a_mask_on_another_device_is_refused(which):
    # Such a call must not reach the fake kernels (uninitialised memory out).
    mask = ("torch.ones(5, 7, dtype=torch.bool, device='meta')" if which == "attn_mask"
            else "torch.zeros(2, 7, dtype=torch.bool, device='meta')")
    expect_error(f"""
        q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
        fusedattn.attention(q, k, v, {which}={mask})
    """, "RuntimeError", which, "query's device", "meta")


def test_a_meta_mask_is_refused_by_the_module():
    expect_error("""
        m = fusedattn.MultiheadAttention(16, 2, batch_first=True)
        x = torch.randn(2, 5, 16)
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta"))
    """, "RuntimeError", "key_padding_mask", "meta")


def test_meta_inputs_still_shape_outputs():
    expect_ok("""
        q, k, v = (torch.randn(2, 3, n, 8, device="meta") for n in (5, 7, 7))
        out = fusedattn.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))
        assert out.device.type == "meta" and out.shape == (2, 3, 5, 8)
    """)


def test_head_dim_zero_names_the_head_dim():
    expect_error("""
        q, k, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 0), torch.randn(2, 3, 7, 4)
        fusedattn.attention(q, k, v)
    """, "RuntimeError", "head dim E", "got query of shape [2, 3, 5, 0]")
    expect_ok("""
        q, k, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 0), torch.randn(2, 3, 7, 4)
        out = fusedattn.attention(q, k, v, scale=1.0)  # uniform weights over the 7 keys
        torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand(2, 3, 5, 4))
    """)


@pytest.mark.parametrize("module", ["MultiheadAttention(16, 2, batch_first=True)", "SelfAttention(16, 4)"])
def test_an_input_dtype_other_than_the_modules_is_named(module):
    # It surfaced as a GEMM's "mat1 and mat2 must have the same dtype".
    call = "m(x, x, x)" if module.startswith("Multi") else "m(x)"
    expect_error(f"""
        m = fusedattn.{module}
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        {call}
    """, "RuntimeError", "parameter dtype (Float)", "got Double", ".to(dtype)")


def test_autocast_still_casts_the_projections():
    expect_ok("""
        m = fusedattn.MultiheadAttention(16, 2, batch_first=True)
        x = torch.randn(2, 5, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, w = m(x, x, x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32
    """)


@pytest.mark.parametrize("args,fragment", [
    ("16, 2.5", "num_heads must be an int, got float 2.5"),
    ("16.0, 2", "embed_dim must be an int, got float 16.0"),
    ("16, 2, dtype=torch.int64", "dtype must be a floating-point dtype, got torch.int64"),
])
def test_module_constructor_arguments_are_named(args, fragment):
    expect_error(f"fusedattn.MultiheadAttention({args})\n", "TypeError", fragment)


def test_numpy_ints_are_ints():
    expect_ok("""
        import numpy as np
        m = fusedattn.MultiheadAttention(np.int64(16), np.int32(2))
        assert m.num_heads == 2
    """)


@pytest.mark.parametrize("bandwidth", ["0.0", "float('nan')", "1e-20", "-1.0", "float('inf')"])
def test_gaussian_bandwidth_values_are_checked(bandwidth):
    # They gave weights of 0 or NaN without a word.
    expect_error(f"""
        x = torch.rand(5)
        fusedattn.gaussian_kernel_attention(x, torch.rand(7), torch.rand(7), bandwidth={bandwidth})
    """, "RuntimeError", "bandwidth must be positive and finite")


def test_gaussian_integer_inputs_are_named():
    expect_error("""
        x = torch.arange(5)
        fusedattn.gaussian_kernel_attention(x, torch.arange(7), torch.arange(7), bandwidth=1.0)
    """, "RuntimeError", "must be floating point, got Long")


def test_gaussian_module_compiles_fullgraph():
    # The bandwidth's value check stays out of traced graphs.
    expect_ok("""
        m = fusedattn.GaussianKernelAttention(0.7)
        q, k, v = torch.rand(2, 5, 3), torch.rand(2, 7, 3), torch.rand(2, 7, 4)
        out = torch.compile(m, fullgraph=True)(q, k, v)[0]
        torch.testing.assert_close(out, m(q, k, v)[0])
    """)


def test_fake_kernels_run_the_real_checks():
    # Meta inputs with mismatched head dims got a shape the real kernel would reject; under
    # torch.compile the error now comes while tracing, with the real kernel's message.
    expect_error("""
        q = torch.randn(2, 3, 5, 8, device="meta")
        k, v = torch.randn(2, 3, 7, 6, device="meta"), torch.randn(2, 3, 7, 4, device="meta")
        fusedattn.attention(q, k, v)
    """, "RuntimeError", "key must have shape (..., Hk, S, E) with E = 8")
    expect_ok("""
        f = torch.compile(lambda q, k, v: fusedattn.attention(q, k, v), fullgraph=True)
        try:
            f(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 6), torch.randn(2, 3, 7, 4))
            raise SystemExit("no error")
        except Exception as e:  # dynamo wraps it
            assert "key must have shape (..., Hk, S, E) with E = 8" in str(e), e
        assert f(torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)).shape == (2, 3, 5, 4)
    """)


# ---------------------------------------------------------------- the fuzz suite (fuzz_cases.py)
# Hundreds of cases share a few processes: a runner executes them in turn and a crash ends only
# the case it happened in (the next runner resumes after it).
RUNNER = str(Path(__file__).with_name("fuzz_runner.py"))


@pytest.fixture(scope="module")
def fuzz_results():
    results, pending = {}, list(CASES)
    while pending:
        r = subprocess.run([sys.executable, RUNNER, *pending], capture_output=True, text=True,
                           timeout=1800, cwd=Path(__file__).parent)
        started = None
        for line in r.stdout.splitlines():
            if line.startswith("BEGIN "):
                started = line[len("BEGIN "):]
            elif line.startswith("RESULT "):
                found = json.loads(line[len("RESULT "):])
                results[found["name"]] = found
                started = None
        if started is not None:
            results[started] = {"name": started, "crash": r.returncode, "stderr": r.stderr[-3000:]}
        elif r.returncode != 0:
            for name in pending:
                results.setdefault(name, {"name": name, "crash": r.returncode, "stderr": r.stderr[-3000:]})
        pending = [n for n in pending if n not in results]
    return results


def test_fuzz_suite_is_wide():
    assert len(CASES) >= 200, len(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_fuzz_case(name, fuzz_results):
    got = fuzz_results[name]
    assert "crash" not in got, f"process died (exit {got['crash']}):\n{got['stderr']}"
    _, expect = CASES[name]
    if expect == "ok":
        assert got["raised"] is None, f"{got['raised']}: {got.get('message')}"
        return
    kind, fragments = expect
    assert got["raised"] is not None, "no error raised"
    assert got["raised"] == kind or got["raised"].endswith("." + kind), \
        f"raised {got['raised']} instead of {kind}: {got['message']}"
    for fragment in fragments:
        assert fragment in got["message"], f"{fragment!r} not in: {got['message']}"
