"""Kernels for quantized linears. `reference` is the oracle every fast kernel is tested against."""
