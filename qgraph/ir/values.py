"""Questions about one value or one node of the in-memory graph, each answered here and nowhere else.

**Constant.** A value is a *constant* when its data is in the model and no caller can change it: it is an
initializer (it has ``const_value``) and it is not also a graph input (an initializer listed as a graph input is a
default that a caller may override at run time). A ``Constant`` node's output is not a constant in this sense:
LiftConstants turns every such node of a graph into an initializer early in the canonical pipeline, and functions,
which keep their Constant nodes, cannot hold the initializers that a rewrite of a constant writes; so every rewrite
that reads constants stays out of function bodies. :func:`is_constant` asks without reading the data,
:func:`constant_array` returns the data, :func:`constant_refusal` says why not.

**Sole consumer.** A node is the *sole consumer* of a value when it is the value's only *use* (one node, through
one input slot) and the value is not a graph output. A node that reads the value through two inputs
(``Mul(x, x)``) makes two uses, so the value has no sole consumer: rewiring "the" input of that node would leave the
other one behind. A question about several readers (is a value private to a set of nodes?) is another question and
has its own helper where a pass needs it.

**Operators.** :func:`is_op` compares the operator type and the domain; onnx-ir normalises the default domain's
alias ``"ai.onnx"`` to ``""`` on every node, and the argument is normalised the same way.

**Opset.** :func:`default_opset` is the default-domain operator set version a model imports, and 0 when it imports
none: no ONNX operator set has version 0, so every "opset >= N" test refuses such a model, which cannot hold a
default-domain node anyway (the ONNX checker rejects one). :func:`node_default_opset` is the version that applies
to one node: a function's own import when the node lives in a function that has one.

**Static shape.** :func:`static_shape` is a value's shape when every dimension is a known integer: the declared or
inferred shape, else the shape of a constant's data (a graph input's default does not fix the shape a caller feeds).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

#: The default ONNX domain and its alias (onnx-ir writes nodes with ``""``; opset imports may use either).
DEFAULT_DOMAINS = ("", "ai.onnx")
MICROSOFT_DOMAIN = "com.microsoft"


def is_constant(value: ir.Value | None) -> bool:
    """``value`` is an initializer that is not also a graph input (see the module docstring)."""
    return value is not None and value.is_initializer() and value.const_value is not None and not value.is_graph_input()


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The data of ``value`` when it is a constant (see the module docstring); ``None`` otherwise."""
    if not is_constant(value):
        return None
    assert value is not None and value.const_value is not None  # is_constant says so; this tells mypy
    return value.const_value.numpy()


def constant_refusal(value: ir.Value | None, role: str) -> str | None:
    """Why ``value`` is not a constant, ``None`` when it is; ``role`` starts the sentence ("the Conv bias")."""
    if value is None:
        return f"{role} is missing"
    if value.is_graph_input():
        return f"{role} {value.name!r} is a graph input (a caller can override it)"
    if not is_constant(value):
        return f"{role} {value.name!r} is not a constant initializer"
    return None


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of ``value`` when every dimension is a known integer (see the module docstring), else ``None``."""
    if value is None:
        return None
    if value.shape is not None:
        sizes = [size for size in value.shape if isinstance(size, int)]
        if len(sizes) == len(value.shape):
            return tuple(sizes)
    if is_constant(value):
        assert value.const_value is not None  # is_constant says so; this tells mypy
        return tuple(int(size) for size in value.const_value.shape.numpy())
    return None


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The node that is the only use of ``value`` when ``value`` is no graph output (see the module docstring)."""
    if value.is_graph_output():
        return None
    uses = value.uses()
    if len(uses) != 1:
        return None
    return next(iter(uses)).node


def sole_consumer_refusal(value: ir.Value, role: str, consumer: ir.Node | None = None) -> str | None:
    """Why ``value`` has no sole consumer (or, given ``consumer``, why that node is not it); ``None`` when it has.

    ``role`` starts the sentence ("the Conv output").
    """
    found = sole_consumer(value)
    if found is not None and (consumer is None or found is consumer):
        return None
    if value.is_graph_output():
        return f"{role} {value.name!r} is a graph output"
    uses = value.uses()
    if not uses:
        return f"{role} {value.name!r} is never read"
    counts: dict[str, int] = {}
    for use in uses:
        reader = f"{use.node.op_type} {use.node.name!r}"
        counts[reader] = counts.get(reader, 0) + 1
    readers = ", ".join(
        reader if count == 1 else f"{reader} ({count} inputs)" for reader, count in sorted(counts.items())
    )
    if found is not None:  # one use, by another node than ``consumer``
        return f"{role} {value.name!r} is read by {readers}, not by the expected node"
    return f"{role} {value.name!r} is read by {readers} (fan-out)"


def is_op(node: ir.Node | None, *op_types: str, domain: str = "") -> bool:
    """``node`` is one of ``op_types`` in ``domain`` (the default domain unless told; ``"ai.onnx"`` is ``""``)."""
    if node is None or node.op_type not in op_types:
        return False
    return node.domain == ("" if domain == "ai.onnx" else domain)


def _opset_in(imports: dict[str, int]) -> int:
    for domain in DEFAULT_DOMAINS:
        if domain in imports:
            return imports[domain]
    return 0


def default_opset(model: ir.Model | onnx.ModelProto) -> int:
    """The default-domain opset version ``model`` (onnx-ir or protobuf) imports; 0 when it imports none."""
    if isinstance(model, onnx.ModelProto):
        return _opset_in({entry.domain: entry.version for entry in model.opset_import})
    return _opset_in(dict(model.opset_imports))


def node_default_opset(node: ir.Node, model: ir.Model) -> int:
    """The default-domain opset that applies to ``node``: its function's import if it has one, else the model's.

    0 when neither imports the default domain.
    """
    graph = node.graph
    own = _opset_in(dict(graph.opset_imports)) if graph is not None else 0
    return own or default_opset(model)


def ensure_microsoft_domain(model: ir.Model, graph: ir.Graph | ir.Function | None = None) -> None:
    """Import the com.microsoft domain (version 1) into ``model``, and into ``graph``'s own imports when given.

    A function's body (``node.graph`` of a node inside a function, or the function itself) resolves domains through
    the function's imports, so a com.microsoft node written there needs the import there too; the main graph's
    imports are the model's, and an If/Loop body's are not stored, so adding there changes nothing. An existing
    import keeps its version.
    """
    model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
    if graph is not None:
        graph.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
