"""Loading a model on CPU in fp32 builds the C++ kernels its layers use, so that the first request
does not wait for a compiler (each extension takes 25-40 s to build the first time)."""
import json
import os
import subprocess
import sys

import pytest

from hybridserve.models.builtin import materialize

PROBE = """
import json, sys
from hybridserve.kernels import cpu_attention, cpu_mamba, cpu_ops, cpu_ssd
from hybridserve.models.loader import load_model
load_model(sys.argv[1])
print(json.dumps({name: mod._KERNEL._module is not None
                  for name, mod in [("attention", cpu_attention), ("mamba", cpu_mamba),
                                    ("ops", cpu_ops), ("ssd", cpu_ssd)]}))
"""


@pytest.mark.parametrize("model_name,want", [("tiny-hybrid", {"attention", "mamba", "ops", "ssd"}),
                                             ("tiny-transformer", {"attention", "ops"})])
def test_load_builds_the_kernels_the_model_uses_and_no_others(model_name, want):
    from hybridserve.kernels import cpu_mamba

    if not cpu_mamba.available():
        pytest.skip(f"the C++ CPU kernels cannot be built here ({cpu_mamba._KERNEL.why_unavailable()})")
    path = materialize(model_name)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HYBRIDSERVE_CPU_PREPACK": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert {name for name, ok in built.items() if ok} == want
