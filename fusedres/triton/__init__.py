"""Triton kernels for fusedres, on channels_last tensors: implicit-GEMM convolutions (conv.py)
and train-mode BatchNorm: statistics, scale/bias/residual/ReLU and their backward (bn.py)."""
