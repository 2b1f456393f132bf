"""Shared test setup: a temp cache for built-in checkpoints; Triton's interpreter on CPU-only machines.

TRITON_INTERPRET must be set before anything imports triton (engine and model
tests import the kernels package too), so it is set here, first; it only matters
where a test forces the Triton path — the engine on CPU always runs the torch refs.
"""
import os
import tempfile

import torch

# Keep test runs from writing into the user's cache, and share one cache per run.
os.environ.setdefault("HYBRIDSERVE_CACHE", os.path.join(tempfile.gettempdir(), "hybridserve-test-cache"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
