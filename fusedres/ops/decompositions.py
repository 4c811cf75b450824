"""What an exporter sees instead of a fusedres op: its plain-PyTorch definition (fusedres.reference).

Each function takes the registered op's arguments (`backend` included, and ignored) and
returns what the op returns, computed by `fusedres.reference`, so a graph decomposed with
them holds ATen ops only and needs no fusedres to run.

* While `torch.onnx.export` runs (either exporter), the public op functions call these
  directly (`fusedres.capture.onnx_exporting`): the exported graph never holds a fusedres op.
* They are also registered in `torch._decomp.decomposition_table`, which the dynamo ONNX
  exporter draws its decomposition table from, so an ExportedProgram made beforehand by
  `torch.export.export(fused_model, ...)` converts too: `torch.onnx.export(program)`.
* `DECOMPOSITIONS` maps each op overload to its function, for
  `program.run_decompositions(DECOMPOSITIONS)` (an ExportedProgram in ATen ops only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fusedres import reference
from fusedres.ops.bn import tail_mask_bytes

Tensor = torch.Tensor


def conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                  shortcut_stride, relu, in_scale, in_shift, backend) -> Tensor:
    return reference.conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation,
                                   groups, shortcut_stride, relu, in_scale, in_shift)


def conv_bn_stats(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, residual,
                  backend) -> tuple[Tensor, Tensor, Tensor]:
    return reference.conv_bn_stats(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups,
                                   residual)


def bn_stats(y, backend) -> tuple[Tensor, Tensor]:
    return reference.bn_stats(y)


def bn_stats_of(y, mean, var, backend) -> tuple[Tensor, Tensor]:
    return mean.clone(), var.clone()


def scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu, backend) -> tuple[Tensor, Tensor]:
    """The block tail and the op's second output, the ReLU mask, sized as the op's fake sizes it
    (nothing in a decomposed graph reads it)."""
    out = reference.scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu)
    return out, y.new_zeros(tail_mask_bytes(y, relu, backend), dtype=torch.uint8)


def _table() -> dict[torch._ops.OpOverload, Callable]:
    ops = torch.ops.fusedres
    return {ops.conv_bias_act.default: conv_bias_act, ops.conv_bn_stats.default: conv_bn_stats,
            ops.bn_stats.default: bn_stats, ops.bn_stats_of.default: bn_stats_of,
            ops.scale_bias_act.default: scale_bias_act}


DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}


def register() -> None:
    """Fill DECOMPOSITIONS (once the ops are registered) and add them to torch's decomposition
    table. A torch without that table (it is internal) loses only the ExportedProgram route."""
    DECOMPOSITIONS.update(_table())
    try:
        from torch._decomp import decomposition_table
    except ImportError:
        logging.getLogger("fusedres").info("fusedres: torch._decomp.decomposition_table not found; an "
                                           "ExportedProgram with fusedres ops needs DECOMPOSITIONS to convert to ONNX")
        return
    for op, fn in DECOMPOSITIONS.items():
        decomposition_table.setdefault(op, fn)
