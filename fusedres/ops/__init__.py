"""The fusedres op set, registered with torch.library under the `fusedres` namespace.

Each op takes a `backend` argument ("auto", "triton", "cuda" or "torch"); see
`fusedres.backends` for how it is chosen.
"""

from fusedres.ops.bn import bn_stats, scale_bias_act
from fusedres.ops.conv import conv_bias_act
from fusedres.ops.conv_train import conv_bn_stats

__all__ = ["bn_stats", "conv_bias_act", "conv_bn_stats", "scale_bias_act"]
