"""Kernel ops for the hybrid's hot path (Triton on CUDA, torch references elsewhere).

The engine imports `hybridserve.kernels.dispatch`; op modules hold one op each.
"""
