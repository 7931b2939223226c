# The instruction-set tier of the CPU kernels: reported, capped by FUSEDATTN_CPU_CAPABILITY
# (read once, at the first use, so each case runs in its own process), refused with a clear
# error where unknown or beyond the CPU.
import os
import subprocess
import sys

import pytest

import fusedattn

TIERS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]


def run(code, tier):
    env = dict(os.environ, FUSEDATTN_CPU_CAPABILITY=tier)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    return subprocess.run([sys.executable, "-c", "import torch, fusedattn\n" + code], env=env,
                          capture_output=True, text=True, timeout=120)


def test_supported_tiers_are_a_prefix_and_include_the_one_in_use():
    supported = fusedattn.cpu_capabilities_supported()
    assert supported == TIERS[:len(supported)] and supported[0] == "scalar"
    assert fusedattn.cpu_capability() in supported


@pytest.mark.parametrize("tier", fusedattn.cpu_capabilities_supported())
def test_cap_is_reported_and_the_kernels_run_there(tier):
    code = ("print(fusedattn.cpu_capability())\n"
            "q = torch.randn(2, 3, 70, 16, dtype=torch.bfloat16)\n"
            "out = fusedattn.attention(q, q, q, is_causal=True)\n"
            "ref = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float(),"
            " is_causal=True)\n"
            "assert (out.float() - ref).abs().max() < 2e-2\n"
            "import ctypes; getenv = ctypes.CDLL(None).getenv; getenv.restype = ctypes.c_char_p\n"
            "print(getenv(b'ONEDNN_MAX_CPU_ISA').decode())\n")  # set in C, after os.environ
    r = run(code, tier)
    assert r.returncode == 0, r.stderr
    reported, onednn = r.stdout.split()
    assert reported == tier
    # oneDNN (behind the packed and JIT GEMMs) is capped to the same tier at load time.
    expected = {"scalar": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE",
                "avx512_bf16": "AVX512_CORE_BF16", "amx": "AVX512_CORE_AMX"}[tier]
    assert onednn == expected


def test_unknown_tier_is_an_error_naming_the_allowed_ones():
    r = run("fusedattn.attention(*(torch.randn(1, 1, 4, 8),) * 3)", "avx9000")
    assert r.returncode != 0
    assert "FUSEDATTN_CPU_CAPABILITY=avx9000: unknown tier" in r.stderr
    assert "scalar, avx2, avx512, avx512_bf16, amx" in r.stderr
    assert "this CPU runs scalar" in r.stderr


def test_tier_beyond_the_cpu_is_an_error():
    supported = fusedattn.cpu_capabilities_supported()
    if len(supported) == len(TIERS):
        pytest.skip("this CPU runs every tier")
    beyond = TIERS[len(supported)]
    r = run("print(fusedattn.cpu_capability())", beyond)
    assert r.returncode != 0
    assert f"FUSEDATTN_CPU_CAPABILITY={beyond}: this CPU cannot run that tier" in r.stderr
