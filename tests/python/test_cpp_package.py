"""A LibTorch app built against the installed package with find_package(fusedattn): it must
link, find the op registrations, and run without LD_LIBRARY_PATH."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils

import fusedattn

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_find_package_app_builds_and_runs(tmp_path):
    prefix = f"{fusedattn.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(EXAMPLE), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    *generator], check=True, env=env, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, env=env, capture_output=True)
    run = subprocess.run([str(build / "fusedattn_app")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "found op fusedattn::attention" in run.stdout
    assert "\nsave/load round trip ok" in run.stdout
    assert "regressor save/load round trip ok" in run.stdout
    assert "single-head layers: train MAE" in run.stdout
