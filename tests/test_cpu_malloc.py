"""glibc malloc tuning: a step-sized buffer, freed and allocated again, stops faulting its pages in."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from hybridserve.cpu_malloc import tune_malloc

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

# In a fresh interpreter: allocate, touch and free a 48 MB block (about one prefill step's largest
# activations at 2,048 tokens) 30 times; report the minor page faults of the last 20 rounds.
_PROBE = """
import json, resource, sys
import torch
from hybridserve.cpu_malloc import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(30):
    if i == 10:
        start = faults()
    x = torch.empty(12 << 20, dtype=torch.float32)
    x.fill_(1.0)
    del x
print(json.dumps({"applied": applied, "faults": faults() - start}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_reuses_freed_step_buffers():
    pages = (48 << 20) // 4096  # what one round faults in when its block went back to the kernel
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"] == {"mmap_threshold": 64 << 20, "trim_threshold": 256 << 20}
    assert default["faults"] > 10 * pages  # glibc's defaults unmap the block on every free
    assert tuned["faults"] < pages // 4    # tuned: the heap keeps it for the next round


def test_switch_off():
    assert tune_malloc({"HYBRIDSERVE_MALLOC_TUNING": "0"}) is None
    assert tune_malloc({"HYBRIDSERVE_MALLOC_TUNING": "off"}) is None
