"""The Triton interpreter runs loops over scalar kernel arguments on every supported Triton
and NumPy (Triton 3.6's interpreter needs `fusedres.triton.interpreter_compat` with NumPy >= 2.4)."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import fusedres.triton  # noqa: E402,F401  (installs the compatibility patch when needed)
from fusedres.triton import interpreter_compat  # noqa: E402


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):  # a loop bound that is a scalar argument
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@pytest.mark.parametrize("n", [1, 16, 37])
def test_loop_over_a_scalar_argument(n):
    x = torch.randn(n)
    out = torch.full((1,), float("nan"))
    _sum_kernel[(1,)](x, out, n, BLOCK=16)
    torch.testing.assert_close(out[0], x.sum(), rtol=1e-6, atol=1e-6)


def test_apply_is_idempotent():
    assert interpreter_compat.apply() is False  # already applied at import, or not needed
