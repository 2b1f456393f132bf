"""Backend choice for the kernel ops: Triton on CUDA, the torch reference elsewhere.

Triton is optional. This module imports it if it can and otherwise supplies a
stand-in, so every op module imports on a machine without Triton (the kernels
are then never launched). Kernels are wrapped in `lazy_jit`, which hands them to
`triton.jit` only at their first launch: whether Triton interprets them on the
CPU (`TRITON_INTERPRET=1`) is decided then, not when this package was imported.

`HYBRIDSERVE_KERNELS=ref|triton` forces a backend; unset means "triton when the
tensors are on CUDA and Triton imports, else ref". Forcing triton with CPU
tensors needs `TRITON_INTERPRET=1` (tests do this).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

try:  # pragma: no cover - exercised by whichever machine runs it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

    class _Stub:
        """Stands in for `triton` / `triton.language` so annotations still resolve."""

        constexpr = object
        int32 = int64 = float32 = bfloat16 = float16 = object

        def __getattr__(self, name: str) -> Any:
            return _Stub()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return _Stub()

    triton = _Stub()  # type: ignore[assignment]
    tl = _Stub()  # type: ignore[assignment]

ENV_VAR = "HYBRIDSERVE_KERNELS"
BACKENDS = ("ref", "triton")


class lazy_jit:
    """`triton.jit` deferred to the first launch; `kernel[grid](...)` as usual.

    Kernels wrapped this way must not call other jitted helpers (the helper
    would be a `lazy_jit` object, which Triton's compiler does not know).
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._built: dict[bool, Any] = {}

    def _kernel(self) -> Any:
        interpret = interpreting()
        if interpret:
            _fix_interpreter_index()
        if interpret not in self._built:
            self._built[interpret] = triton.jit(self.fn)
        return self._built[interpret]

    def __getitem__(self, grid: Any) -> Any:
        return self._kernel()[grid]


def _fix_interpreter_index() -> None:
    """Let `range()` take scalar tensors in Triton's interpreter under numpy >= 2.4.

    The interpreter holds a scalar as a 1-element array and turns it into a loop
    bound with int(array), which numpy 2.4 refuses for arrays that are not 0-d.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "hybridserve_fixed", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.hybridserve_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def forced_backend() -> str | None:
    """The backend named by HYBRIDSERVE_KERNELS, or None when unset."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {BACKENDS} or unset")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op whose main input is `tensor` should run its Triton kernel."""
    forced = forced_backend()
    if forced == "ref":
        return False
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but triton does not import")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(f"{ENV_VAR}=triton with CPU tensors needs TRITON_INTERPRET=1")
        return True
    return HAS_TRITON and tensor.is_cuda


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1); Triton block sizes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())
