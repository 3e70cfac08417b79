"""The instrumented pass manager: phase order, unknown passes, records, fixed points and the verification mode."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from onnx_ir.passes import PassResult

from qgraph.errors import PipelineError, QGraphError
from qgraph.passes.infrastructure import (
    PassManager,
    PassVerificationError,
    Phase,
    QGraphPass,
    Refusal,
    RewriteContext,
    RewritePass,
    available_passes,
    check_phase_order,
    count_nodes,
    get_pass,
)
from qgraph.pipeline import OptimizeOptions, build_pipeline
from qgraph.testing import to_ir
from tests.passes.batch_norm_builders import batch_norm_node, batch_norm_parameters, make_model, weights
from tests.passes.exporter_spellings import gelu_erf, gelu_tanh, layer_norm
from tests.passes.lower.attention_models import integer_attention_block
from tests.passes.lower.test_lower_end_to_end import small_cnn
from tests.passes.lower.test_lower_fast_gelu import quantized_gelu
from tests.passes.qdq_builders import QDQBuilder

MODEL = """
<ir_version: 10, opset_import: ["" : 17]>
small (float[2, 3] x) => (float[2, 3] y) {
    a = Relu(x)
    b = Identity(a)
    c = Neg(b)
    y = Abs(c)
}
"""


def model() -> ir.Model:
    return to_ir(MODEL)


class Nothing(QGraphPass):
    """Changes nothing (canonicalize)."""

    phase = Phase.CANONICALIZE

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


class LowerNothing(Nothing):
    """Changes nothing (lower)."""

    phase = Phase.LOWER


class RemoveOneIdentity(QGraphPass):
    """Removes the first Identity node it finds: modifies the model once per Identity, honestly."""

    phase = Phase.CANONICALIZE

    def call(self, model: ir.Model) -> PassResult:
        for node in model.graph:
            if node.op_type == "Identity":
                ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
                model.graph.remove(node, safe=True)
                return PassResult(model, True)
        return PassResult(model, False)


class AlwaysModified(Nothing):
    """Claims a change on every run: a fixed point is never reached."""

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, True)


class NegToSigmoid(RewritePass):
    """A broken rewrite: Neg becomes Sigmoid, which changes the outputs."""

    phase = Phase.CANONICALIZE

    def match(self, node: ir.Node, context: RewriteContext):
        return node if node.op_type == "Neg" else None

    def rewrite(self, node: ir.Node, context: RewriteContext) -> None:
        node._op_type = "Sigmoid"  # deliberately wrong numerics (onnx-ir has no setter for op_type)


class DropProducer(QGraphPass):
    """A broken rewrite: removes Relu but leaves its consumer reading the dead value (invalid model)."""

    phase = Phase.CANONICALIZE

    def call(self, model: ir.Model) -> PassResult:
        relu = next(node for node in model.graph if node.op_type == "Relu")
        model.graph.remove(relu, safe=False)
        return PassResult(model, True)


def add_identity_chain(model: ir.Model, length: int) -> None:
    """Insert ``length`` Identity nodes before the output."""
    last = model.graph.outputs[0]
    producer = last.producer()
    value = producer.inputs[0]
    for _ in range(length):
        identity = ir.node("Identity", [value])
        model.graph.insert_before(producer, identity)
        value = identity.outputs[0]
    producer.replace_input_with(0, value)


# ---------------------------------------------------------------------------------------------------------------


def test_phases_only_move_forward():
    with pytest.raises(PipelineError, match="phases only move forward"):
        PassManager([LowerNothing(), Nothing()])
    with pytest.raises(PipelineError):
        check_phase_order([Nothing(), LowerNothing(), Nothing()])
    PassManager([Nothing(), Nothing(), LowerNothing(), LowerNothing()])  # repeats and forward moves are fine


def test_a_pass_without_a_phase_is_refused():
    from onnx_ir.passes.common import IdentityEliminationPass

    with pytest.raises(PipelineError, match="not a qgraph pass"):
        PassManager([IdentityEliminationPass()])


def test_unknown_pass_name():
    with pytest.raises(PipelineError, match="unknown pass 'NoSuchPass'"):
        get_pass("NoSuchPass")
    with pytest.raises(QGraphError, match="NoSuchPass"):
        build_pipeline(OptimizeOptions(passes=("NoSuchPass",)))


def test_records_time_node_counts_and_modified():
    subject = model()
    result = PassManager([Nothing(), RemoveOneIdentity()]).run(subject)
    assert [record.name for record in result.records] == ["Nothing", "RemoveOneIdentity"]
    nothing, removal = result.records
    assert (nothing.nodes_before, nothing.nodes_after, nothing.modified) == (4, 4, False)
    assert (removal.nodes_before, removal.nodes_after, removal.modified) == (4, 3, True)
    assert all(record.seconds >= 0 for record in result.records)
    assert nothing.phase == Phase.CANONICALIZE
    assert result.modified and count_nodes(result.model) == 3


def test_without_fixed_point_each_pass_runs_once():
    subject = model()
    add_identity_chain(subject, 3)
    result = PassManager([RemoveOneIdentity()]).run(subject)
    assert len(result.records) == 1
    assert sum(node.op_type == "Identity" for node in result.model.graph) == 3


def test_fixed_point_runs_until_a_round_changes_nothing():
    subject = model()
    add_identity_chain(subject, 3)  # four Identity nodes in all
    result = PassManager([Nothing(), RemoveOneIdentity()], fixed_point=True, max_iterations=20).run(subject)
    removals = [record for record in result.records if record.name == "RemoveOneIdentity"]
    assert [record.modified for record in removals] == [True, True, True, True, False]
    assert len(result.records) == 10  # five rounds of two passes
    assert not any(node.op_type == "Identity" for node in result.model.graph)
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)


def test_fixed_point_stops_after_max_iterations(caplog):
    result = PassManager([AlwaysModified()], fixed_point=True, max_iterations=5).run(model())
    assert len(result.records) == 5
    assert "did not reach a fixed point" in caplog.text


def test_verify_accepts_an_honest_pass():
    result = PassManager([RemoveOneIdentity()], verify=True).run(model())
    assert result.modified


def test_verify_catches_changed_outputs():
    with pytest.raises(PassVerificationError, match="NegToSigmoid.*changed"):
        PassManager([Nothing(), NegToSigmoid()], verify=True).run(model())


def test_verify_catches_an_invalid_model():
    with pytest.raises(PassVerificationError, match="DropProducer"):
        PassManager([DropProducer()], verify=True).run(model())


def test_verification_errors_are_bugs_not_user_errors():
    assert not issubclass(PassVerificationError, QGraphError)


def test_without_verify_a_broken_pass_goes_unnoticed_by_the_manager():
    result = PassManager([NegToSigmoid()]).run(model())
    assert [node.op_type for node in result.model.graph] == ["Relu", "Identity", "Sigmoid", "Abs"]


# --- the rewrite protocol: match -> check (plan or Refusal) -> rewrite(plan, context) ----------------------------

class KeepNeg(RewritePass):
    """Matches every Neg and refuses it: nothing may change."""

    phase = Phase.CANONICALIZE

    def match(self, node: ir.Node, context: RewriteContext):
        return node if node.op_type == "Neg" else None

    def check(self, node: ir.Node, context: RewriteContext) -> Refusal:
        return Refusal(f"a Neg reading {node.inputs[0].name!r} stays")

    def rewrite(self, plan, context: RewriteContext) -> None:
        raise AssertionError("rewrite ran for a refused match")


@dataclasses.dataclass(frozen=True)
class AbsPlan:
    node: ir.Node
    replacement: str


class NegToAbs(RewritePass):
    """Neg becomes Abs; ``journal`` (an option) records each plan check returns and each plan rewrite receives."""

    phase = Phase.CANONICALIZE

    def __init__(self, *, journal: dict[str, list] | None = None) -> None:
        super().__init__()
        self.journal = journal

    def match(self, node: ir.Node, context: RewriteContext):
        return node if node.op_type == "Neg" else None

    def check(self, node: ir.Node, context: RewriteContext) -> AbsPlan:
        plan = AbsPlan(node, "Abs")
        if self.journal is not None:
            self.journal["checked"].append(plan)
        return plan

    def rewrite(self, plan: AbsPlan, context: RewriteContext) -> None:
        if self.journal is not None:
            self.journal["rewritten"].append((plan, context))
        node = plan.node
        replacement = ir.Node("", plan.replacement, [node.inputs[0]], name=context.names.fresh("abs"))
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [replacement], node.outputs,
                                                replacement.outputs)


class LegacyCheck(NegToAbs):
    """The old protocol's ``check``: ``None`` for "legal"."""

    def check(self, node: ir.Node, context: RewriteContext):
        return None


def printed(subject: ir.Model) -> str:
    return onnx.printer.to_text(ir.serde.serialize_model(subject))


def test_a_refusal_is_logged_and_leaves_the_graph_unchanged(caplog):
    subject = model()
    before = printed(subject)
    with caplog.at_level(logging.DEBUG, logger="qgraph.passes.infrastructure"):
        result = KeepNeg()(subject)
    assert not result.modified
    assert printed(result.model) == before
    records = [record for record in caplog.records if record.name == "qgraph.passes.infrastructure"]
    # each node at debug level, one line per pass at info level (-v), naming the first; the parsed node has no name
    assert [(record.levelname, record.getMessage()) for record in records] == [
        ("DEBUG", "KeepNeg: leaving  (Neg): a Neg reading 'b' stays"),
        ("INFO", "KeepNeg: left 1 match as it was, the first  (Neg): a Neg reading 'b' stays")]


def test_many_refusals_make_one_info_line(caplog):
    subject = model()
    for _ in range(3):  # three more Negs, unread: four refusals in all
        subject.graph.append(ir.node("Neg", [subject.graph.outputs[0].producer().inputs[0]]))
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        KeepNeg()(subject)
    messages = [record.getMessage() for record in caplog.records if record.name == "qgraph.passes.infrastructure"]
    assert messages == ["KeepNeg: left 4 matches as they were, the first  (Neg): a Neg reading 'b' stays "
                        "(-vv lists each)"]


def test_rewrite_receives_the_plan_check_returned_and_the_run_context():
    subject = model()
    subject.graph.append(ir.node("Neg", [subject.graph.outputs[0].producer().inputs[0]]))  # a second, unread Neg
    journal = {"checked": [], "rewritten": []}
    result = NegToAbs(journal=journal)(subject)
    assert result.modified
    assert len(journal["checked"]) == 2
    assert [plan for plan, _ in journal["rewritten"]] == journal["checked"]
    assert all(received is checked for (received, _), checked in zip(journal["rewritten"], journal["checked"]))
    first_context, second_context = (context for _, context in journal["rewritten"])
    assert first_context is second_context and first_context.model is subject  # one context per run
    assert [node.op_type for node in subject.graph] == ["Relu", "Identity", "Abs", "Abs", "Abs"]
    assert sorted(node.name for node in subject.graph if node.name) == ["abs", "abs_1"]  # one name scope per run


def test_check_in_the_old_protocol_is_an_error_not_a_silent_rewrite():
    with pytest.raises(TypeError, match=r"LegacyCheck\.check returned None; it returns a plan, or a Refusal"):
        LegacyCheck()(model())


def protocol_corpus() -> list[onnx.ModelProto]:
    """Models on which every registered rewrite pass finds something to rewrite (and something to refuse)."""
    conv_batch_norm = make_model(
        [helper.make_node("Conv", ["x", "W"], ["conv"], name="conv"), batch_norm_node("bn", "conv", "y")],
        [("x", [1, 3, 5, 5])], [("y", None)], {"W": weights((4, 3, 3, 3), 1), **batch_norm_parameters("bn", 4, 2)},
    )
    lone_batch_norm = make_model(
        [helper.make_node("Relu", ["x"], ["relu"], name="relu"), batch_norm_node("bn", "relu", "y")],
        [("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])], batch_norm_parameters("bn", 4, 3),
    )
    conv_bias = make_model(
        [helper.make_node("Conv", ["x", "W"], ["conv"], name="conv"), helper.make_node("Add", ["conv", "c"], ["y"])],
        [("x", [1, 3, 5, 5])], [("y", None)], {"W": weights((4, 3, 3, 3), 4), "c": weights((4, 1, 1), 5)},
    )
    cnn, _, _ = small_cnn()
    from tests.passes.lower.four_bit_models import four_bit_matmul
    from tests.passes.lower.islands import embedding_lookup

    return [
        ir.serde.serialize_model(model()), conv_batch_norm, lone_batch_norm, conv_bias,
        gelu_erf(), gelu_tanh(opset=20), layer_norm("tf2onnx"), cnn.model(), float_output_islands(),
        blocked_int4_matmul(), four_bit_matmul()[0].model(), integer_attention_block(), quantized_gelu(),
        embedding_lookup(), *exporter_spelling_corpus(),
    ]


def blocked_int4_matmul() -> onnx.ModelProto:
    """MatMul over a blocked int4 DequantizeLinear weight (opset 21), for LowerMatMulNBits."""
    import ml_dtypes

    rng = np.random.default_rng(7)
    codes = ir.serde.serialize_tensor(ir.tensor(rng.integers(-8, 8, (32, 3)).astype(ml_dtypes.int4), name="q"))
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=16),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "blocked", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [codes, numpy_helper.from_array(rng.uniform(0.1, 1, (2, 3)).astype(np.float32), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def exporter_spelling_corpus() -> list[onnx.ModelProto]:
    """flax LayerNorm, RMSNorm, SiLU and HardSwish spellings (for the fusions of issue 14)."""
    from tests.passes.canonicalize.activation_spellings import hard_swish, sigmoid_gate
    from tests.passes.canonicalize.normalization_spellings import flax_layer_norm, rms_norm

    return [flax_layer_norm("flax"), rms_norm("pow_div"), sigmoid_gate(1.702), hard_swish("clip")]


def float_output_islands() -> onnx.ModelProto:
    """QDQ islands for the lowerings small_cnn lacks: Conv and MatMul read as float, a quantized MatMul, Sigmoid and
    Concat."""
    builder = QDQBuilder(seed=3)
    rng = np.random.default_rng(3)
    x = builder.quantize(builder.add_input("x", [1, 3, 4, 4]))
    builder.quantize("x")  # a second Q → DQ of x that nobody reads
    builder.output(builder.conv(x, rng.standard_normal((2, 3, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1]))
    right, _ = builder.weight(rng.standard_normal((4, 5)).astype(np.float32), axis=1)
    builder.output(builder.node("MatMul", [x, right]))
    other, _ = builder.weight(rng.standard_normal((4, 4)).astype(np.float32), axis=1)
    product = builder.quantize(builder.node("MatMul", [x, other]))
    sigmoid = builder.quantize(builder.node("Sigmoid", [product]))
    builder.output(builder.quantize(builder.node("Concat", [product, sigmoid], axis=1)))
    return builder.model()


def rewrite_pass_classes() -> list[type]:
    return [cls for cls in available_passes().values() if issubclass(cls, RewritePass)]


#: Options for the passes that rewrite nothing unless told where (KeepFloatNodes: small_cnn's first Conv and Relu).
CORPUS_OPTIONS = {"KeepFloatNodes": {"nodes": frozenset({"Conv_node_17", "Relu_node_19"})}}


def corpus_instance(pass_class: type):
    return pass_class(**CORPUS_OPTIONS.get(pass_class.__name__, {}))


def test_every_rewrite_pass_rewrites_something_in_the_protocol_corpus():
    """The corpus of the two tests below exercises every pass's rewrite, not just its match."""
    idle = [cls.__name__ for cls in rewrite_pass_classes()
            if not any(corpus_instance(cls)(ir.serde.deserialize_model(proto)).modified for proto in protocol_corpus())]
    assert not idle


@pytest.mark.parametrize("pass_class", rewrite_pass_classes(), ids=lambda cls: cls.__name__)
def test_a_pass_instance_holds_no_state_after_a_run(pass_class):
    instance = corpus_instance(pass_class)
    options = dict(vars(instance))
    for proto in protocol_corpus():
        instance(ir.serde.deserialize_model(proto))
        assert vars(instance).keys() == options.keys()
        assert all(vars(instance)[name] is value for name, value in options.items())


@pytest.mark.parametrize("pass_class", rewrite_pass_classes(), ids=lambda cls: cls.__name__)
def test_one_instance_runs_on_many_models_as_fresh_instances_do(pass_class):
    shared = corpus_instance(pass_class)
    for proto in protocol_corpus():
        by_shared, by_fresh = ir.serde.deserialize_model(proto), ir.serde.deserialize_model(proto)
        assert shared(by_shared).modified == corpus_instance(pass_class)(by_fresh).modified
        assert printed(by_shared) == printed(by_fresh)
