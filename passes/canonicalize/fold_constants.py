"""FoldConstants: evaluate, at compile time, nodes whose result does not depend on the model's inputs.

What: a node ``y = op(c1, ..., cn)`` whose inputs are all constants is replaced by an initializer named ``y`` that
holds ``op(c1, ..., cn)``, computed by onnx's reference evaluator on a one-node graph under the model's
default-domain opset. A constant here is an initializer that is not also a graph input (a caller may override such
a default at run time). Nodes are visited in graph order, so a folded result feeds the next fold in the same run:
whole constant chains collapse in one run. Shape information folds too::

    Shape(x; start, end) = int64 [d_start, ..., d_(end-1)]   when x's shape (d_0, ..., d_(r-1)) is fully static
    Size(x)              = int64 d_0 · d_1 · ... · d_(r-1)   likewise

which is what makes exported dynamic-shape arithmetic (``Shape → Gather → Unsqueeze → Concat → Reshape``)
collapse to constants. The folded node is removed, and an initializer the node read that nothing reads any more is
dropped (graph inputs and outputs are never dropped); the result keeps the output's name, so graph outputs and
subgraph captures stay intact. Main graph and If/Loop/Scan bodies are folded (a body's results become initializers
of that body); functions are not, since they cannot hold initializers.

Bounded: folding trades computation for stored data, so a fold may not blow the model up. Before evaluating, the
size of every output is bounded, from its static shape or from onnx shape inference on the one-node graph (small
inputs passed as data, so ``ConstantOfShape``/``Expand``/``Tile``/``Range`` see their sizes). A node is refused when
its outputs would hold more than ``max_output_elements`` elements *and* more elements than its inputs together: a
tiny ``Shape → ConstantOfShape`` or ``Expand`` never becomes a huge constant, while a same-size rewrite of a large
weight (``Transpose``, ``Cast``, ``Reshape``) still folds. A node whose output size cannot be bounded before
evaluation is refused too.

Refused (reason logged, node kept): non-deterministic operators (``RandomNormal*``, ``RandomUniform*``,
``Multinomial``, ``Bernoulli``, and ``Dropout``, random in training mode; inference Dropout is EliminateIdentity's),
operators with subgraphs (If/Loop/Scan), operators outside the default domain, ``QuantizeLinear`` /
``DequantizeLinear`` / ``DynamicQuantizeLinear`` (the quantization phases own them: folding the DequantizeLinear of
a weight would undo its quantization), any input that is a graph input, element types numpy cannot hold exactly
(strings, bfloat16, float8, 4-bit, complex), non-tensor results, and anything the evaluator rejects.
``modified`` is true exactly when at least one node folded.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes import PassResult

from qgraph.ir.edit import drop_unused_initializers
from qgraph.ir.values import DEFAULT_DOMAINS, constant_refusal, default_opset, static_shape
from qgraph.passes.infrastructure import Phase, QGraphPass, register

logger = logging.getLogger(__name__)

NON_DETERMINISTIC_OPERATORS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
QUANTIZATION_OPERATORS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Operators whose output size depends on input values that shape inference does not evaluate, but which never
#: produce more elements than their inputs hold (NonZero: rank × count of non-zeros ≤ rank × input size).
_BOUNDED_BY_INPUTS = frozenset({"NonZero", "Unique", "Compress"})

FOLDABLE_DTYPES = frozenset(
    {
        ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BOOL,
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)

#: Inputs up to this many elements are given to shape inference as data, so it can read shapes and counts.
_SHAPE_INFERENCE_DATA_ELEMENTS = 4096


class _Refusal(Exception):
    """Raised inside a fold attempt with the reason the node stays."""


@register
class FoldConstants(QGraphPass):
    """Evaluate nodes whose inputs are all constants (and Shape/Size of static shapes) into initializers."""

    phase = Phase.CANONICALIZE
    summary = "evaluate constant subexpressions and static Shape/Size into initializers (size-bounded)"

    def __init__(self, *, max_output_elements: int = 1 << 20) -> None:
        super().__init__()
        if max_output_elements < 0:
            raise ValueError("max_output_elements must be non-negative")
        self.max_output_elements = max_output_elements

    def call(self, model: ir.Model) -> PassResult:
        opset = default_opset(model)
        if opset == 0:  # imports no default-domain operator set, so it holds no node to fold
            return PassResult(model, False)
        folded = 0
        for graph in list(model.graphs()):
            for node in list(graph):
                if node.graph is None:
                    continue
                try:
                    results = self._fold(node, opset)
                except _Refusal as refusal:
                    logger.info("%s: leaving %s (%s): %s", self.pass_name(), node.name, node.op_type, refusal)
                    continue
                if results is None:
                    continue
                self._replace(node, results)
                folded += 1
        if folded:
            logger.debug("%s: folded %d node(s)", self.pass_name(), folded)
        return PassResult(model, folded > 0)

    # Deciding and computing.

    def _fold(self, node: ir.Node, opset: int) -> list[np.ndarray] | None:
        """The values of the node's outputs, ``None`` when the node is not a candidate; raises ``_Refusal``."""
        if node.op_type in ("Shape", "Size") and node.domain in DEFAULT_DOMAINS:
            return self._fold_shape(node)
        present = [value for value in node.inputs if value is not None]
        if node.op_type == "Constant" or not present or not all(value.is_initializer() for value in present):
            return None  # not a constant expression (Constant nodes are LiftConstants' job)
        if node.domain not in DEFAULT_DOMAINS:
            raise _Refusal(f"operator domain {node.domain!r} is not the default ONNX domain")
        if node.op_type in NON_DETERMINISTIC_OPERATORS:
            raise _Refusal("the operator is non-deterministic")
        if node.op_type in QUANTIZATION_OPERATORS:
            raise _Refusal("quantization operators belong to the quantization and lowering phases")
        graph_types = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        if any(attribute.type in graph_types for attribute in node.attributes.values()):
            raise _Refusal("the operator has subgraphs")
        for value in present:
            reason = constant_refusal(value, "input")
            if reason is not None:
                raise _Refusal(reason)
            if value.const_value.dtype not in FOLDABLE_DTYPES:
                raise _Refusal(f"input {value.name!r} has element type {value.const_value.dtype.name}")
        input_elements = sum(math.prod(value.const_value.shape) for value in {id(v): v for v in present}.values())
        expected = self._expected_outputs(node, opset)
        self._check_size_bound(node, expected, input_elements)
        results = self._evaluate(node, opset)
        return self._checked_results(node, results, expected, input_elements)

    def _fold_shape(self, node: ir.Node) -> list[np.ndarray] | None:
        data = node.inputs[0] if node.inputs else None
        shape = static_shape(data) if data is not None else None
        if shape is None:
            return None  # a dynamic shape is the common case, not worth a log line
        if node.op_type == "Size":
            return [np.array(math.prod(shape), dtype=np.int64)]
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        if (start is not None and start.is_ref()) or (end is not None and end.is_ref()):
            raise _Refusal("start or end refers to a function attribute")
        begin = start.as_int() if start is not None else 0
        stop = end.as_int() if end is not None else len(shape)
        # ONNX clamps negative and out-of-range bounds exactly like a Python slice does.
        return [np.array(shape[begin:stop], dtype=np.int64)]

    def _expected_outputs(self, node: ir.Node, opset: int) -> list[tuple[tuple[int, ...] | None, ir.DataType | None]]:
        """Static shape and element type of each output: declared ones, else from one-node shape inference."""
        declared = [(static_shape(output), output.dtype) for output in node.outputs]
        if all(shape is not None and dtype is not None for shape, dtype in declared):
            return declared
        inferred = _infer_one_node(node, opset)
        return [
            (shape if shape is not None else inferred.get(output.name, (None, None))[0],
             dtype if dtype is not None else inferred.get(output.name, (None, None))[1])
            for output, (shape, dtype) in zip(node.outputs, declared)
        ]

    def _check_size_bound(self, node: ir.Node, expected, input_elements: int) -> None:
        unknown = [output.name for output, (shape, _) in zip(node.outputs, expected) if shape is None and output.name]
        if unknown:
            if node.op_type in _BOUNDED_BY_INPUTS:
                return
            raise _Refusal(f"the size of {unknown[0]!r} cannot be bounded before evaluating it")
        total = sum(math.prod(shape) for shape, _ in expected if shape is not None)
        self._check_size(total, input_elements)

    def _check_size(self, output_elements: int, input_elements: int) -> None:
        if output_elements > self.max_output_elements and output_elements > input_elements:
            raise _Refusal(
                f"its result would hold {output_elements} elements, more than max_output_elements="
                f"{self.max_output_elements} and more than its {input_elements} input elements"
            )

    @staticmethod
    def _evaluate(node: ir.Node, opset: int) -> list:
        node_proto = ir.serde.serialize_node(node)
        input_names = list(dict.fromkeys(name for name in node_proto.input if name))
        output_names = [name for name in node_proto.output if name]
        graph = onnx.helper.make_graph(
            [node_proto],
            "fold",
            [onnx.ValueInfoProto(name=name) for name in input_names],
            [onnx.ValueInfoProto(name=name) for name in output_names],
        )
        feeds = {value.name: value.const_value.numpy() for value in node.inputs if value is not None}
        try:
            evaluator = ReferenceEvaluator(graph, opsets={"": opset})
            values = evaluator.run(None, feeds)
        except Exception as error:  # the evaluator raises assorted errors for what it cannot run
            raise _Refusal(f"the reference evaluator cannot compute it ({type(error).__name__}: {error})") from None
        by_name = dict(zip(output_names, values))
        return [by_name.get(output.name) if output.name else None for output in node.outputs]

    def _checked_results(self, node: ir.Node, results: list, expected, input_elements: int) -> list[np.ndarray | None]:
        checked: list[np.ndarray | None] = []
        total = 0
        for output, result, (_, dtype) in zip(node.outputs, results, expected):
            if result is None:
                if output.uses() or output.is_graph_output():
                    raise _Refusal(f"the evaluator gave no value for {output.name!r}")
                checked.append(None)
                continue
            if isinstance(result, (list, tuple, dict)) or not isinstance(result, (np.ndarray, np.generic)):
                raise _Refusal(f"{output.name!r} is not a tensor")
            array = np.asarray(result)
            try:
                result_dtype = ir.DataType.from_numpy(array.dtype)
            except Exception:
                raise _Refusal(f"{output.name!r} has numpy type {array.dtype}, without an ONNX element type") from None
            if result_dtype not in FOLDABLE_DTYPES:
                raise _Refusal(f"{output.name!r} has element type {result_dtype.name}")
            if dtype is not None and result_dtype != dtype:
                raise _Refusal(f"the evaluator computed {result_dtype.name} for {output.name!r}, expected {dtype.name}")
            total += array.size
            checked.append(array)
        self._check_size(total, input_elements)
        return checked

    # Rewriting.

    def _replace(self, node: ir.Node, results: list[np.ndarray | None]) -> None:
        graph = node.graph
        new_initializers: list[ir.Value] = []
        for output, array in zip(node.outputs, results):
            if array is None or not (output.uses() or output.is_graph_output()):
                continue
            if not array.flags.c_contiguous:
                array = array.copy(order="C")  # not np.ascontiguousarray: it turns a scalar into shape (1,)
            initializer = ir.Value(
                name=output.name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.tensor(array, name=output.name),
                metadata_props=dict(output.metadata_props),
            )
            output.replace_all_uses_with(initializer, replace_graph_outputs=True)
            new_initializers.append(initializer)
        inputs = [value for value in node.inputs if value is not None]
        graph.remove(node, safe=True)
        for initializer in new_initializers:
            graph.register_initializer(initializer)
        drop_unused_initializers(inputs)
        logger.debug("%s: folded %s (%s)", self.pass_name(), node.name, node.op_type)


def _infer_one_node(node: ir.Node, opset: int) -> dict[str, tuple[tuple[int, ...] | None, ir.DataType | None]]:
    """Shapes and element types onnx shape inference gives the node's outputs, from its inputs alone."""
    initializers: list[onnx.TensorProto] = []
    graph_inputs: list[onnx.ValueInfoProto] = []
    seen: set[str] = set()
    for value in node.inputs:
        if value is None or value.name in seen:
            continue
        seen.add(value.name)
        tensor = value.const_value
        if tensor is not None and math.prod(tensor.shape) <= _SHAPE_INFERENCE_DATA_ELEMENTS:
            initializers.append(ir.serde.serialize_tensor(tensor))
            initializers[-1].name = value.name
        elif tensor is not None:
            graph_inputs.append(onnx.helper.make_tensor_value_info(value.name, int(tensor.dtype), list(tensor.shape)))
        else:
            return {}
    graph = onnx.helper.make_graph([ir.serde.serialize_node(node)], "infer", graph_inputs, [], initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as error:  # inference errors mean "unknown", never a crash of the pass
        logger.debug("shape inference failed for %s (%s): %s", node.name, node.op_type, error)
        return {}
    found: dict[str, tuple[tuple[int, ...] | None, ir.DataType | None]] = {}
    for info in inferred.graph.value_info:
        if not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        dtype = ir.DataType(tensor_type.elem_type) if tensor_type.elem_type else None
        shape = None
        if tensor_type.HasField("shape") and all(dim.HasField("dim_value") for dim in tensor_type.shape.dim):
            shape = tuple(dim.dim_value for dim in tensor_type.shape.dim)
        found[info.name] = (shape, dtype)
    return found
