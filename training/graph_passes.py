"""Graph passes over an exported ONNX graph: the same function, computed faster by onnxruntime.

`conv1d_as_conv2d` rewrites every 1-D convolution (and 1-D max pooling) as its 2-D form over
a height-1 image: x (B, C, L) -> Unsqueeze -> (B, C, 1, L) -> Conv with kernel (1, k) ->
(B, F, 1, L') -> Squeeze -> (B, F, L'). The arithmetic is the same; only the kernel that runs
it changes. Why: onnxruntime 1.31's CPU Conv for 1-D inputs is a slow path (a profile of
kim-cnn-trec6 put 90 % of the run in 1-D FusedConv, and per text it got *slower* with larger
batches), while its 2-D convolution is the tuned one (NCHW im2col + SGEMM). On this machine the
rewrite made kim-cnn-trec6 1.4x faster at batch 1 and 3.2x at batch 64 (docs/performance.md
says which command measured it).

The weight's Unsqueeze is a constant expression, folded by onnxruntime when it loads the graph.
Parity is proven by `optimize` in training/optimize_bundle.py (the rewritten graph against the
original on real texts) and, for new exports, by export's parity check against PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

SPATIAL_ONE_D_OPS = ("Conv", "MaxPool")
PASS_NAME = "conv1d-as-conv2d"


def as_two_d(attribute: onnx.AttributeProto) -> dict:
    """A 1-D attribute in its 2-D form over a height-1 image (pads [b, e] -> [0, b, 0, e])."""
    value = helper.get_attribute_value(attribute)
    if attribute.name in ("kernel_shape", "strides", "dilations"):
        return {attribute.name: [1, *value]}
    if attribute.name == "pads":
        return {attribute.name: [0, value[0], 0, value[1]]}
    return {attribute.name: value}


def is_one_d(node: onnx.NodeProto) -> bool:
    kernel = [helper.get_attribute_value(a) for a in node.attribute if a.name == "kernel_shape"]
    return node.op_type in SPATIAL_ONE_D_OPS and len(kernel) == 1 and len(kernel[0]) == 1


def conv1d_as_conv2d(graph_model: onnx.ModelProto) -> int:
    """Rewrite, in place, each 1-D Conv/MaxPool of the main graph; returns how many were
    rewritten. Nodes without an explicit kernel_shape (the exporter always writes one) are left."""
    graph = graph_model.graph
    height_axis = numpy_helper.from_array(np.array([2], dtype=np.int64), f"{PASS_NAME}/height_axis")
    rewritten = []
    count = 0
    for node in graph.node:
        if not is_one_d(node):
            rewritten.append(node)
            continue
        count += 1
        prefix = f"{PASS_NAME}/{node.name or node.output[0]}"
        x_2d, out_2d = f"{prefix}/input", f"{prefix}/output"
        rewritten.append(helper.make_node("Unsqueeze", [node.input[0], height_axis.name], [x_2d], name=f"{prefix}/unsqueeze_input"))
        inputs = [x_2d]
        if node.op_type == "Conv":  # weight (F, C, k) -> (F, C, 1, k); the bias stays (F,)
            weight_2d = f"{prefix}/weight"
            rewritten.append(helper.make_node("Unsqueeze", [node.input[1], height_axis.name], [weight_2d], name=f"{prefix}/unsqueeze_weight"))
            inputs += [weight_2d, *node.input[2:]]
        attributes = {}
        for attribute in node.attribute:
            attributes.update(as_two_d(attribute))
        if len(node.output) != 1:
            raise ValueError(f"{node.op_type} {node.name} has {len(node.output)} outputs; only single-output nodes are rewritten")
        rewritten.append(helper.make_node(node.op_type, inputs, [out_2d], name=f"{prefix}/2d", **attributes))
        rewritten.append(helper.make_node("Squeeze", [out_2d, height_axis.name], [node.output[0]], name=f"{prefix}/squeeze_output"))
    if count:
        graph.initializer.append(height_axis)
        del graph.node[:]
        graph.node.extend(rewritten)
        onnx.checker.check_model(graph_model, full_check=True)
    return count
