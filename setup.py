"""Builds fusedattn through CMake (CMakeLists.txt is the one list of sources).

    pip install --no-build-isolation .      # or -e . ; needs torch installed first

The CMake build lives in ./build (FUSEDATTN_BUILD_DIR overrides), so the Catch2 tests built
with it run with `ctest --test-dir build`, and rebuilds are incremental. `cmake --install`
puts _C, lib/libfusedattn.so, the headers and the CMake package into the Python package:
`find_package(fusedattn)` works with CMAKE_PREFIX_PATH=fusedattn.cmake_prefix_path.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch.utils

        package_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(os.environ.get("FUSEDATTN_BUILD_DIR", ROOT / "build")).resolve()
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DFUSEDATTN_INSTALL_PYTHON_LAYOUT=ON",
            f"-DCMAKE_INSTALL_PREFIX={package_dir}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        configure += [f"-D{k}={v}" for k, v in os.environ.items() if k.startswith("FUSEDATTN_")
                      and k != "FUSEDATTN_BUILD_DIR"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        subprocess.check_call(["cmake", "--install", str(build_dir)])


setup(
    name="fusedattn",
    version="0.1.0",
    description="Fused multi-head attention for PyTorch and LibTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("fusedattn._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    # fusedattn.transformers: the Hugging Face attention backend (import fusedattn never
    # imports transformers).
    extras_require={"transformers": ["transformers>=5.0,<6"]},
    zip_safe=False,
)
