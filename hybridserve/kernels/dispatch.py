"""The kernel ops the engine calls; each picks Triton on CUDA and its torch reference elsewhere.

`HYBRIDSERVE_KERNELS=ref|triton` forces a backend (see `_backend`). Importing
this module does not need Triton.
"""

from hybridserve.kernels._backend import HAS_TRITON, forced_backend, use_triton
from hybridserve.kernels.conv1d import causal_conv1d, causal_conv1d_update
from hybridserve.kernels.gated_rmsnorm import gated_rms_norm
from hybridserve.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_prefill,
    write_kv,
)
from hybridserve.kernels.ssd import ssd_scan
from hybridserve.kernels.state_update import selective_state_update

__all__ = [
    "HAS_TRITON",
    "causal_conv1d",
    "causal_conv1d_update",
    "forced_backend",
    "gated_rms_norm",
    "paged_attention_decode",
    "paged_attention_prefill",
    "selective_state_update",
    "ssd_scan",
    "use_triton",
    "write_kv",
]
