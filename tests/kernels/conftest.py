"""Kernel tests: Triton runs in its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be in the environment before a kernel is first launched;
set here, at collection, on CPU-only machines.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
