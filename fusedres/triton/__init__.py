"""Triton kernels for fusedres, on channels_last tensors: implicit-GEMM convolutions (conv.py)
and train-mode BatchNorm: statistics, scale/bias/residual/ReLU and their backward (bn.py)."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from fusedres.triton import interpreter_compat

    interpreter_compat.apply()
