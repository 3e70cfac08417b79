"""The instrumented pass manager: phase order, unknown passes, records, fixed points and the verification mode."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes import PassResult

from qgraph.errors import PipelineError, QGraphError
from qgraph.passes.infrastructure import QGraphPass, RewritePass
from qgraph.passes.infrastructure import RewriteContext
from qgraph.passes.infrastructure import PassManager, PassVerificationError, check_phase_order, count_nodes
from qgraph.pipeline import OptimizeOptions, build_pipeline
from qgraph.passes.infrastructure import Phase
from qgraph.passes.infrastructure import get_pass

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
    return ir.serde.deserialize_model(onnx.parser.parse_model(MODEL))


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
