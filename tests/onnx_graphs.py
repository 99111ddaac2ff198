"""Tiny ONNX models made with onnx's helper, for the checks on loading a graph."""

from __future__ import annotations


def identity_model(input_name: str, output: str, *, ir_version: int | None = None) -> bytes:
    """A whole, valid model passing one int64 input through as OUTPUT; stamped with
    IR_VERSION where given (one ONNX Runtime may not read)."""
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info(input_name, TensorProto.INT64, [None, None])
    out = helper.make_tensor_value_info(output, TensorProto.INT64, [None, None])
    node = helper.make_node("Identity", [input_name], [output])
    graph = helper.make_graph([node], "g", [ids], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if ir_version is not None:
        model.ir_version = ir_version
    return bytes(model.SerializeToString())
