"""Numerical-parity checks for a user's own model: `check_parity`, `assert_parity`.

"I swapped fusedres blocks into my model; prove it still computes the same thing, on my
checkpoint, in my dtype." `check_parity(model, x)` converts a private copy of `model`
(`fusedres.convert`), runs it and the original (`fusedres.revert`: torchvision's / timm's
own blocks) on the same inputs, and compares, per tensor, eval outputs and, after SGD
steps in train mode, outputs, the input gradient, every parameter gradient and every
buffer: in float64 at the package's own test bounds, and in float32 / bfloat16 / float16
within 2x PyTorch's own error at that dtype (see `fusedres.testing.parity`). The report
says which blocks were fused (and why others were not) and which backend ran each one.

`fusedres-check` (fusedres/check.py) is the same check as a command line for CI.
"""

from fusedres.testing.parity import (
    EVAL_RTOL_FLOAT64,
    LOSS_SCALE,
    LOW_PRECISION_EPS,
    LOW_PRECISION_FACTOR,
    TRAIN_RTOL_FLOAT64,
    ParityUsageError,
    assert_parity,
    check_parity,
    relative_error,
)
from fusedres.testing.report import BlockInfo, Comparison, ParityReport
from fusedres.testing.seeding import randomize_batchnorm

__all__ = [
    "EVAL_RTOL_FLOAT64",
    "LOSS_SCALE",
    "LOW_PRECISION_EPS",
    "LOW_PRECISION_FACTOR",
    "TRAIN_RTOL_FLOAT64",
    "BlockInfo",
    "Comparison",
    "ParityReport",
    "ParityUsageError",
    "assert_parity",
    "check_parity",
    "randomize_batchnorm",
    "relative_error",
]
