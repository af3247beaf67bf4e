"""Recognise decomposed LayerNorm / RMSNorm subgraphs and replace each by one op.

Rules in the onnxscript rewriter's style (pattern + check + rewrite). RMSNorm becomes the standard
``RMSNormalization`` when the model's opset is 23 or more, or ONNX Runtime's
``SimplifiedLayerNormalization`` when the graph targets ONNX Runtime; otherwise it stays
decomposed (its gamma can still be folded) and the report says why. ``ReduceMean`` is matched in
both its opset-17 (axes attribute) and opset-18 (axes input) forms.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from omniforge.passes.base import PassReport, const_array


def _scalar(v: ir.Value | None) -> float | None:
    a = const_array(v)
    return float(a.reshape(())) if a is not None and a.size == 1 else None


def _reduce_last(op, x):
    return pattern.OrValue([op.ReduceMean(x, axes=[-1], keepdims=1), op.ReduceMean(x, [-1], keepdims=1)])


def _rsqrt(op, var_eps, one):
    rms = op.Sqrt(var_eps)
    return rms, pattern.OrValue([op.Reciprocal(rms), op.Div(one, rms)])


class RmsNormRule(pattern.RewriteRuleClassBase):
    """``scale * (x * rsqrt(mean(x^2) + eps))`` -> one RMS-norm op."""

    def __init__(self, name: str, target_op: str, scale_first: bool) -> None:
        super().__init__(name)
        self.target_op = target_op
        self.scale_first = scale_first

    def pattern(self, op, x, two, epsilon, one, scale):
        mean_sq = _reduce_last(op, op.Pow(x, two))
        _, inv = _rsqrt(op, op.Add(mean_sq, epsilon), one)
        normalized = op.Mul(x, inv)
        return op.Mul(scale, normalized) if self.scale_first else op.Mul(normalized, scale)

    def check(self, context, x, two, epsilon, one, scale, **_):
        result = pattern.MatchResult()
        if _scalar(two) != 2.0:
            return result.fail("not a square")
        if _scalar(epsilon) is None:
            return result.fail("epsilon is not a constant scalar")
        if one is not None and one.const_value is not None and _scalar(one) != 1.0:
            return result.fail("numerator is not 1")
        s = const_array(scale)
        if s is None or s.ndim != 1:
            return result.fail("scale is not a constant vector")
        return result

    def rewrite(self, op, x, epsilon, scale, **_):
        eps = _scalar(epsilon)
        if self.target_op == "RMSNormalization":
            return op.RMSNormalization(x, scale, axis=-1, epsilon=eps)
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)


class LayerNormRule(pattern.RewriteRuleClassBase):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` -> ``LayerNormalization`` (opset 17)."""

    def pattern(self, op, x, two, epsilon, one, scale, bias):
        dev = op.Sub(x, _reduce_last(op, x))
        var = _reduce_last(op, pattern.OrValue([op.Pow(dev, two), op.Mul(dev, dev)]))
        rms, inv = _rsqrt(op, op.Add(var, epsilon), one)
        normalized = pattern.OrValue([op.Mul(dev, inv), op.Div(dev, rms)])
        return op.Add(op.Mul(normalized, scale), bias)

    def check(self, context, x, epsilon, scale, bias, two=None, one=None, **_):
        result = pattern.MatchResult()
        if _scalar(epsilon) is None:
            return result.fail("epsilon is not a constant scalar")
        for v, name in ((scale, "scale"), (bias, "bias")):
            a = const_array(v)
            if a is None or a.ndim != 1:
                return result.fail(f"{name} is not a constant vector")
        if two is not None and _scalar(two) != 2.0:
            return result.fail("not a square")
        return result

    def rewrite(self, op, x, epsilon, scale, bias, **_):
        return op.LayerNormalization(x, scale, bias, axis=-1, epsilon=_scalar(epsilon))


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", 0))


def recognize_norms(model: ir.Model, target: str = "onnx") -> PassReport:
    """Replace decomposed norms in place. ``target``: "onnx" (standard ops) or "onnxruntime"."""
    report = PassReport("recognize_norms")
    rules = [LayerNormRule.rule()]
    rms_op = None
    if target == "onnxruntime":
        rms_op = "SimplifiedLayerNormalization"  # ORT registers it in the default domain
    elif _opset(model) >= 23:
        rms_op = "RMSNormalization"
    if rms_op:
        rules += [RmsNormRule.rule(f"rms_{order}", rms_op, order) for order in (True, False)]
    count = pattern.RewriteRuleSet(rules).apply_to_model(model)
    report.fired = int(count)
    if rms_op is None:
        probe = ir.from_proto(ir.to_proto(model))
        found = pattern.RewriteRuleSet(
            [RmsNormRule.rule("probe", "RMSNormalization", o) for o in (True, False)],
        ).apply_to_model(probe)
        if found:
            report.notes.append(
                f"kept {found} RMSNorm(s) decomposed: opset {_opset(model)} < 23 has no standard RMS-norm op"
            )
    return report
