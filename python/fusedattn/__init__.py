"""fusedattn: fused multi-head attention for PyTorch and LibTorch.

``fusedattn.attention`` is the op (``torch.ops.fusedattn.attention``);
``fusedattn.MultiheadAttention`` is a drop-in for ``torch.nn.MultiheadAttention``.
The C++ library behind both is ``libfusedattn``; ``cmake_prefix_path`` points a C++ build at
its CMake package (``find_package(fusedattn)``).
"""
import os

import torch  # noqa: F401  (loads LibTorch before the extension)

from . import _C  # noqa: F401  (loading it registers the ops)
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from ._C import cpu_capabilities_supported, cpu_capability
from ._ops import attention, attention_varlen, explain, t5_rel_bias
from .layers import AttentionPooling, GaussianKernelAttention, SelfAttention, gaussian_kernel_attention
from .kv_cache import KVCache
from .modules import MultiheadAttention

__version__ = "0.1.0"
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")

__all__ = ["attention", "attention_varlen", "explain", "t5_rel_bias", "KVCache", "MultiheadAttention",
           "SelfAttention", "AttentionPooling", "GaussianKernelAttention", "gaussian_kernel_attention", "cmake_prefix_path",
           "cpu_capability", "cpu_capabilities_supported"]
