"""The long C++ CPU kernels let the GIL go while they compute, so a worker's event loop (another
Python thread) runs on the other core meanwhile instead of waiting for the step's next op."""
import sys
import threading
import time

import pytest
import torch

from hybridserve.kernels import cpu_gemm, cpu_ssd


def _python_progress_during(call) -> int:
    """How many iterations a pure-Python thread makes while `call()` runs on this one. The GIL's
    switch interval is raised to 1 s meanwhile, so that a call that keeps the GIL leaves the
    other thread no forced turn at all (0 iterations), where one that lets it go leaves it
    running through the call (and through this thread's wait to take the GIL back)."""
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        t = threading.Thread(target=spin, daemon=True)
        t.start()
        while count[0] == 0:    # the spinner is running; taking the GIL back costs up to one interval
            time.sleep(0.001)
        during = 0
        for _ in range(2):      # the best of two: a call that keeps the GIL gives 0 every time
            before = count[0]
            call()
            during = max(during, count[0] - before)
        stop.set()
    finally:
        sys.setswitchinterval(interval)
    t.join()
    return during


def test_the_probe_sees_a_call_that_keeps_the_gil():
    """The measure itself: a C call that keeps the GIL (sorting a big list) leaves the other thread nothing."""
    data = list(range(2_000_000, 0, -1))
    assert _python_progress_during(lambda: sorted(data)) < 1000


@pytest.mark.skipif(not cpu_gemm.available(), reason="the C++ linear kernel cannot be built here")
def test_a_panel_linear_lets_python_run_meanwhile():
    w = cpu_gemm.pack_panels(torch.randn(16384, 2048))       # 128 MiB of weights: milliseconds of reading
    x = torch.randn(8, 2048)
    cpu_gemm.panel_linear(x, w, None, 16384)
    runs = _python_progress_during(lambda: cpu_gemm.panel_linear(x, w, None, 16384))
    print("python iterations during the call:", runs)
    assert runs > 1000      # with the GIL held through the call the other thread cannot run at all


@pytest.mark.skipif(not cpu_ssd.available(), reason="the C++ SSD kernel cannot be built here")
def test_an_ssd_scan_lets_python_run_meanwhile():
    L, G, R, P, N = 4096, 1, 16, 64, 64
    args = (torch.randn(L, G, R, P), torch.rand(L, G, R) * 0.1, -torch.rand(G, R), torch.randn(L, G, N),
            torch.randn(L, G, N), torch.zeros(G, R, P, N))
    runs = _python_progress_during(lambda: cpu_ssd.scan_piece(*args))
    print("python iterations during the call:", runs)
    assert runs > 1000
