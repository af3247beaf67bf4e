"""Constant folding, dead-node removal and Reshape/Transpose/MatMul+Add clean-ups.

All of it is onnxscript's: its optimizer (constant folding, unused-node removal) and its common
rewrite rules (successive Reshape/Transpose, no-op ops, MatMul + Add -> Gemm on rank-2 inputs).
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer as optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common

from omniforge.passes.base import PassReport

LINEAR_RULES = [
    common.matmul_add_to_gemm_rule,
    common.transpose_a_matmul_add_to_gemm_rule,
    common.transpose_b_matmul_add_to_gemm_rule,
    common.transpose_ab_matmul_add_to_gemm_rule,
]
SHAPE_RULES = [
    common.transpose_transpose_rule,
    common.reshape_reshape_rule,
    common.no_op_transpose_rule,
    common.no_op_expand_rule,
    common.no_op_cast_rule,
    common.cast_cast_rule,
    common.squeeze_reshape_1d_rule,
    common.unsqueeze_unsqueeze_rule,
]


def fold_constants(model: ir.Model) -> PassReport:
    """onnxscript's optimizer: constant folding + dead-node removal, in place."""
    before = model.graph.num_nodes()
    optimizer.optimize_ir(model)
    return PassReport("fold_constants", fired=before - model.graph.num_nodes())


def _apply(name: str, rules: list, model: ir.Model) -> PassReport:
    count = pattern.RewriteRuleSet(rules).apply_to_model(model)
    return PassReport(name, fired=int(count))


def fuse_linear(model: ir.Model) -> PassReport:
    """MatMul + Add (bias) -> Gemm where the inputs are rank 2 (Gemm's domain)."""
    return _apply("fuse_linear", LINEAR_RULES, model)


def clean_shapes(model: ir.Model) -> PassReport:
    """Successive Reshape/Transpose/Cast/Unsqueeze collapse; no-op ones disappear."""
    return _apply("clean_shapes", SHAPE_RULES, model)
