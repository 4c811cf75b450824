"""The fusedres op set, registered with torch.library under the `fusedres` namespace.

Each public function here takes a `backend` ("auto", "triton", "cuda" or "torch"; see
`fusedres.backends`), packs its arguments into the op's typed inputs
(`fusedres.backends.inputs`), chooses the backend once (`select_backend`) and runs the
registered op (`torch.ops.fusedres.<name>`) with that backend's name, which the op's
fake, autograd context and backward use as they are.

Following one op from here to its kernel, on the triton backend (three files):

* `conv_bias_act` (eval: folded BN, residual, ReLU):
  1. `fusedres/ops/conv.py`: `conv_bias_act` -> `ConvInputs`, `select_backend(..., tune=True)`,
     the op `fusedres::conv_bias_act` (fake, autograd);
  2. `fusedres/backends/triton_backend.py`: `TritonBackend.SUPPORT[ConvInputs]` (what it
     takes) and `TritonBackend.conv_bias_act`, which runs `fusedres::triton_conv_bias_act`;
  3. `fusedres/triton/conv.py`: that op's registration (`torch.library.triton_op`), the
     launcher `conv_bias_act` (checks -> `ConvGeometry`, then the launch) and `_conv_kernel`.
* `conv_bn_stats` (train: previous BN + ReLU in the prologue, batch statistics in the epilogue):
  1. `fusedres/ops/conv_train.py`: `conv_bn_stats` -> `ConvStatsInputs`, the op
     `fusedres::conv_bn_stats` and its backward (`conv_bn_stats_grad_y`, `prologue`,
     `conv_backward`, `prologue_backward` on the same backend);
  2. `fusedres/backends/triton_backend.py`: `TritonBackend.conv_bn_stats`;
  3. `fusedres/triton/conv.py`: the launcher `conv_bn_stats` (the same kernel with `STATS`,
     then the statistics combine).

Exporters see each op's plain-PyTorch definition instead (`fusedres/ops/decompositions.py`).

The shared Triton helpers (configs, pruning, allocation, `mma`, the dtype set, the
per-channel partial sums) are in `fusedres/triton/common.py`; the semantics, forward and
backward, in `fusedres/reference.py`.
"""

from fusedres.ops import decompositions
from fusedres.ops.bn import bn_stats, bn_stats_of, scale_bias_act
from fusedres.ops.conv import conv_bias_act
from fusedres.ops.conv_train import conv_bn_stats
from fusedres.ops.decompositions import DECOMPOSITIONS

decompositions.register()

__all__ = ["DECOMPOSITIONS", "bn_stats", "bn_stats_of", "conv_bias_act", "conv_bn_stats", "scale_bias_act"]
