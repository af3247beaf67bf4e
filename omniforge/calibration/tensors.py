"""Reading a graph's intermediate tensors: the calibration methods' shared way in."""

from __future__ import annotations

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def session_with_outputs(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A CPU session of ``model`` whose outputs are its own followed by the tensors ``names``."""
    if not names:
        raise ValueError("no intermediate tensors named")  # run(names=[]) would mean "all outputs"
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
