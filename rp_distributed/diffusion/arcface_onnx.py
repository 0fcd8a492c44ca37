"""Random-weight ArcFace-shaped ONNX recognizers (input ``data`` [N, 3, 112, 112] float32 -> ``fc1`` [N, 512]),
built with onnx's helpers (no torch, no export): ``tiny`` (one strided convolution and a linear layer, for tests)
and ``r50`` (insightface's IResNet-50 layout of buffalo_l's ``w600k_r50.onnx``: 3/4/14/3 blocks of 64/128/256/512
channels, BatchNorm-PReLU residual blocks, a 25088 -> 512 embedding layer; 43.6M parameters, ~6.3 GFLOP a face),
for measuring the recognizer's speed where the real weights cannot be fetched."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ID_DIM = 512
R50_LAYERS = ((64, 3), (128, 4), (256, 14), (512, 3))  # (channels, blocks); each stage starts with stride 2


class _Graph:
    """Nodes and random initializers of one graph; each helper returns its output's name."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def weight(self, shape, std: float) -> str:
        name = self._name("w")
        self.inits.append((name, (self.rng.standard_normal(shape) * std).astype(np.float32)))
        return name

    def const(self, value: np.ndarray) -> str:
        name = self._name("c")
        self.inits.append((name, value.astype(np.float32)))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, gain: float = 1.0) -> str:
        w = self.weight((cout, cin, k, k), gain * (2.0 / (cin * k * k)) ** 0.5)
        return self.node("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)

    def bn(self, x: str, c: int) -> str:
        ones, zeros = np.ones(c), np.zeros(c)
        return self.node("BatchNormalization", [x, self.const(ones), self.const(zeros), self.const(zeros),
                                                self.const(ones)], epsilon=1e-5)

    def prelu(self, x: str, c: int) -> str:
        return self.node("PRelu", [x, self.const(np.full((c, 1, 1), 0.25))])


def _r50(g: _Graph, x: str) -> str:
    x = g.prelu(g.bn(g.conv(x, 3, 64, 3, 1), 64), 64)
    cin = 64
    for cout, blocks in R50_LAYERS:
        for b in range(blocks):
            stride = 2 if b == 0 else 1
            y = g.conv(g.prelu(g.bn(g.conv(g.bn(x, cin), cin, cout, 3, 1), cout), cout), cout, cout, 3, stride,
                       gain=0.2)  # a small residual branch keeps 24 random blocks' activations in range
            y = g.bn(y, cout)
            shortcut = x if b else g.bn(g.conv(x, cin, cout, 1, stride), cout)
            x, cin = g.node("Add", [y, shortcut]), cout
    x = g.node("Flatten", [g.bn(x, 512)], axis=1)
    x = g.node("Gemm", [x, g.weight((512 * 7 * 7, ID_DIM), (1.0 / (512 * 7 * 7)) ** 0.5), g.const(np.zeros(ID_DIM))])
    return g.bn(x, ID_DIM)


def _tiny_graph(seed: int):
    """One strided convolution, ReLU and a linear layer (the tests' recognizer; unchanged since it was written)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w_conv = (rng.standard_normal((8, 3, 8, 8)) / 14).astype(np.float32)
    w_fc = (rng.standard_normal((8 * 14 * 14, ID_DIM)) / 40).astype(np.float32)
    b_fc = (0.01 * rng.standard_normal(ID_DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "conv_w"], ["c"], name="conv0", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten0", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["fc1"], name="gemm0"),
    ]
    return helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", ID_DIM])],
        initializer=[numpy_helper.from_array(w_conv, "conv_w"), numpy_helper.from_array(w_fc, "fc_w"),
                     numpy_helper.from_array(b_fc, "fc_b")],
    )


def _r50_graph(seed: int):
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(seed)
    g.nodes.append(helper.make_node("Identity", [_r50(g, "data")], ["fc1"], name="output"))
    return helper.make_graph(
        g.nodes, "r50_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", ID_DIM])],
        initializer=[numpy_helper.from_array(v, k) for k, v in g.inits],
    )


def make_arcface_onnx(path: Path, seed: int = 4, layout: str = "tiny") -> Path:
    """Write an ArcFace-shaped ONNX recognizer of ``layout`` (``tiny`` or ``r50``) with random weights."""
    import onnx
    from onnx import helper

    graphs = {"tiny": _tiny_graph, "r50": _r50_graph}
    if layout not in graphs:
        raise ValueError(f"layout must be one of {sorted(graphs)}, got {layout!r}")
    graph = graphs[layout](seed)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rp_distributed.tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
