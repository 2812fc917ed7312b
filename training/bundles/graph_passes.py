"""Graph passes over an exported ONNX graph: the same function, computed faster by onnxruntime.

`conv1d_as_conv2d` rewrites every 1-D convolution (and 1-D max pooling) as its 2-D form over
a height-1 image: x (B, C, L) -> Unsqueeze -> (B, C, 1, L) -> Conv with kernel (1, k) ->
(B, F, 1, L') -> Squeeze -> (B, F, L'). The arithmetic is the same; only the kernel that runs
it changes. Why: onnxruntime 1.31's CPU Conv for 1-D inputs is a slow path (a profile of
kim-cnn-trec6 put 90 % of the run in 1-D FusedConv, and per text it got *slower* with larger
batches), while its 2-D convolution is the tuned one (NCHW im2col + SGEMM). On this machine the
rewrite took kim-cnn-trec6's kernel time from 0.38 to 0.28 ms at batch 1 and from 15.4 to
10.2 ms at batch 64 (`python -m training.bench.op_profile`; docs/performance-history.md).

The weight's Unsqueeze is a constant expression, folded by onnxruntime when it loads the graph.
Parity is proven by `optimize_bundle` in training/bundles/export_classifier.py (the rewritten graph against the
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


# Ops that act on each element alone, so they commute with adding an axis of size 1 to every
# operand (binary ones broadcast the same way when both operands have the same rank).
ELEMENTWISE_UNARY = ("Relu", "LeakyRelu", "Tanh", "Sigmoid", "Identity")
ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div")
ROUND_TRIPS_PASS_NAME = "height-one-round-trips"


def is_height_axis_op(node: onnx.NodeProto | None, op_type: str) -> bool:
    """`node` is a Squeeze/Unsqueeze of the height axis that conv1d_as_conv2d put in."""
    return node is not None and node.op_type == op_type and list(node.input[1:]) == [f"{PASS_NAME}/height_axis"]


def drop_height_round_trips(graph_model: onnx.ModelProto) -> int:
    """Keep the convolution stack 4-D: where conv1d_as_conv2d left Squeeze -> 3-D elementwise
    ops -> Unsqueeze between two 2-D convolutions or pools, compute those ops on the 4-D
    tensors instead (a 3-D operand that comes from elsewhere, like a padding mask, is
    unsqueezed once), and squeeze only where a 3-D op still reads the result. Returns how many
    Unsqueezes went. Why: onnxruntime's int8 convolution (QLinearConv) runs in NHWC and wraps
    each one in Transposes, which it cancels between neighbouring convolutions only when
    nothing 3-D sits between them; `python -m training.bench.op_profile` put those Transposes at half
    of char-cnn-small-trec6-int8's time."""
    graph = graph_model.graph
    ranks = tensor_ranks(graph_model)
    producers = {output: node for node in graph.node for output in node.output}
    height_axis = f"{PASS_NAME}/height_axis"
    lifted: dict[str, str] = {}  # 3-D tensor -> its 4-D (B, C, 1, L) twin
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # nodes to insert before the node producing the key

    def liftable(name: str) -> bool:
        """`name` is computed from a height Squeeze through elementwise ops only (worth lifting)."""
        node = producers.get(name)
        if is_height_axis_op(node, "Squeeze"):
            return True
        if node is not None and node.op_type in ELEMENTWISE_UNARY and len(node.input) == 1:
            return liftable(node.input[0])
        if node is not None and node.op_type in ELEMENTWISE_BINARY and all(ranks.get(i) == 3 for i in node.input):
            return any(liftable(i) for i in node.input)
        return False

    def lift(name: str, anchor: str) -> str:
        """The 4-D twin of the 3-D tensor `name`, built (if new) just before `anchor`'s producer."""
        if name in lifted:
            return lifted[name]
        node = producers.get(name)
        if is_height_axis_op(node, "Squeeze"):
            lifted[name] = node.input[0]
            return node.input[0]
        twin = f"{ROUND_TRIPS_PASS_NAME}/{name}"
        if liftable(name):
            inputs = [lift(i, anchor) for i in node.input]
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            made = helper.make_node(node.op_type, inputs, [twin], name=f"{ROUND_TRIPS_PASS_NAME}/{node.name or name}", **attributes)
        else:  # a 3-D operand from elsewhere (a mask): add the axis once
            made = helper.make_node("Unsqueeze", [name, height_axis], [twin], name=f"{ROUND_TRIPS_PASS_NAME}/unsqueeze/{name}")
        new_nodes.setdefault(anchor, []).append(made)
        lifted[name] = twin
        return twin

    replaced = {}  # an Unsqueeze's output -> the 4-D twin that now stands for it
    for node in graph.node:
        if is_height_axis_op(node, "Unsqueeze") and liftable(node.input[0]):
            replaced[node.output[0]] = lift(node.input[0], node.output[0])
    if not replaced:
        return 0
    graph_outputs = {output.name for output in graph.output}
    rebuilt = []
    for node in graph.node:
        for output in node.output:
            rebuilt.extend(new_nodes.get(output, []))
        if node.output[0] in replaced:
            if node.output[0] in graph_outputs:
                rebuilt.append(helper.make_node("Identity", [replaced[node.output[0]]], [node.output[0]]))
            continue
        rebuilt.append(node)
    for node in rebuilt:  # readers of a replaced Unsqueeze read its 4-D twin
        for index, name in enumerate(node.input):
            if name in replaced:
                node.input[index] = replaced[name]
    # A 3-D tensor that now has a computed 4-D twin is read back from it (one Squeeze) by any
    # 3-D reader left, so the 3-D ops that made it are not computed twice.
    computed = {name: twin for name, twin in lifted.items() if twin.startswith(ROUND_TRIPS_PASS_NAME)
                and not is_height_axis_op(producers.get(name), "Squeeze") and liftable(name)}
    rebuilt = [helper.make_node("Squeeze", [computed[node.output[0]], height_axis], [node.output[0]],
                                name=f"{ROUND_TRIPS_PASS_NAME}/squeeze/{node.output[0]}")
               if len(node.output) == 1 and node.output[0] in computed else node for node in rebuilt]
    del graph.node[:]
    graph.node.extend(topologically_sorted(rebuilt, graph))
    drop_unread_nodes(graph)
    onnx.checker.check_model(graph_model, full_check=True)
    return len(replaced)


def tensor_ranks(graph_model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(graph_model)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    ranks = {info.name: len(info.type.tensor_type.shape.dim) for info in infos if info.type.tensor_type.HasField("shape")}
    ranks.update({init.name: len(init.dims) for init in graph_model.graph.initializer})
    return ranks


def topologically_sorted(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is produced before it is read (Kahn's algorithm,
    keeping the given order where it is free)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        for index, node in enumerate(pending):
            if all(name in available for name in node.input):
                ordered.append(pending.pop(index))
                available.update(ordered[-1].output)
                break
        else:
            raise ValueError(f"graph has a cycle or an input nobody produces: {pending[0].name} reads {list(pending[0].input)}")
    return ordered


def drop_unread_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read by another node or is a graph output."""
    while True:
        read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        kept = [node for node in graph.node if any(output in read for output in node.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)
