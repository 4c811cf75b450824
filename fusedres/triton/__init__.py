"""Triton kernels for fusedres (implicit-GEMM convolutions on channels_last tensors)."""
