"""Build-on-first-use C++ extensions for the CPU kernels (torch's `load_inline`).

Each `CppKernel` compiles its source once per process, lazily and under a lock, with
-O3, OpenMP and, on x86, -march=native (so the cached build's name carries the CPU
model along with a digest of the source and the torch version). Where it cannot be
built (no compiler, no ninja, a read-only cache) or HYBRIDSERVE_CPU_KERNELS=0, `module()`
returns None, `why_unavailable()` says why, and callers keep their torch path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading

import torch

logger = logging.getLogger(__name__)

# Releases the GIL for a kernel's run (scope) when this thread holds it, and takes it back after; a
# no-op when called from another kernel that already let it go. A worker's event loop runs on the
# other core meanwhile instead of waiting for the step's next Python op (torch's own ops do the same).
NO_GIL_CPP = r"""
struct NoGil {
  PyThreadState* state = nullptr;
  NoGil() { if (PyGILState_Check()) state = PyEval_SaveThread(); }
  ~NoGil() { if (state) PyEval_RestoreThread(state); }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;
};
"""

# 16 fp32 lanes (one AVX-512 register; GCC/Clang vector extensions), for the extensions' sources.
V16_CPP = r"""
typedef float v16 __attribute__((vector_size(64)));
static inline v16 load16(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
static inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
static inline v16 splat16(float x) { return v16{} + x; }
static inline float hsum16(v16 v) { float s = 0.0f; for (int j = 0; j < 16; ++j) s += v[j]; return s; }
"""

# Shared by the extensions' sources (needs <cmath>, <cstring>, <algorithm>, <cstdint>).
EXP_NEG_CPP = r"""
// exp for x <= 0 (scores minus their running max), as plain arithmetic so that the loops
// around it vectorize: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2 (ln 2 split in
// two for an exact r), e^r by a degree-6 Taylor polynomial (relative error ~2e-7, about
// 2 ulp); below -87 it returns 0, where expf underflows anyway.
// e^r for |r| <= ln 2 / 2, the Taylor polynomial by Horner (a float or a vector of them)
template <class T> static inline T exp_taylor6(T r) {
  T p = r * 0.0f + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p;
}

static inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  const float p = exp_taylor6(r);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
"""


def _cpu_model() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu += next((line for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return cpu


class CppKernel:
    """One inline C++ extension: `name` prefixes the build, `functions` are bound to Python."""

    def __init__(self, name: str, source: str, functions: list[str], what: str):
        self.name, self.source, self.functions, self.what = name, source, functions, what
        self._lock = threading.Lock()
        self._module = None
        self._failed: str | None = None

    def build_name(self) -> str:
        """Extension name: source and CPU model in it, since -march=native binds it to this CPU."""
        digest = hashlib.sha256((self.source + _cpu_model() + torch.__version__).encode()).hexdigest()[:12]
        return f"{self.name}_{digest}"

    def module(self):
        """The built extension, building it now if it was not tried yet; None if it cannot be."""
        if self._module is not None:   # the per-call path: no lock once built
            return self._module
        with self._lock:
            if self._module is not None or self._failed is not None:
                return self._module
            if os.environ.get("HYBRIDSERVE_CPU_KERNELS", "1") == "0":
                self._failed = "HYBRIDSERVE_CPU_KERNELS=0"
                return None
            bindir = os.path.dirname(sys.executable)   # pip's `ninja` lands beside the venv's python
            if shutil.which("ninja") is None and os.path.exists(os.path.join(bindir, "ninja")):
                os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
            try:
                from torch.utils.cpp_extension import load_inline

                flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
                self._module = load_inline(name=self.build_name(), cpp_sources=self.source,
                                           functions=self.functions, extra_cflags=flags,
                                           extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # keep the torch path
                msg = str(e).strip()
                self._failed = f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
                logger.warning("%s unavailable, using the torch path (%s)", self.what, self._failed)
            return self._module

    def available(self) -> bool:
        return self.module() is not None

    def why_unavailable(self) -> str | None:
        self.module()
        return self._failed
