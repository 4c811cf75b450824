"""Triton kernels for fusedres, on channels_last tensors: implicit-GEMM convolutions (conv.py,
conv_backward.py), train-mode BatchNorm: statistics, scale/bias/residual/ReLU and their
backward (bn.py), the elementwise passes of conv_bn_stats' backward (prologue.py), and the
scaffolding they share (common.py)."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from fusedres.triton import interpreter_compat

    interpreter_compat.apply()
