"""TensorRT readiness without a GPU: the graph each stage would hand TensorRT, checked against
what TensorRT's ONNX parser documents for a given version (``versions``, ``rules``)."""

from omniforge.engines.trt_check.build import StageFinding, check_build, trt_graph
from omniforge.engines.trt_check.graph import Violation
from omniforge.engines.trt_check.rules import RULES, Target, check_model
from omniforge.engines.trt_check.versions import VERSIONS, version

__all__ = [
    "RULES",
    "VERSIONS",
    "StageFinding",
    "Target",
    "Violation",
    "check_build",
    "check_model",
    "trt_graph",
    "version",
]
