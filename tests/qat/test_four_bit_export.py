"""QAT with 4-bit weights exports real 4-bit storage: the learned codes (±7, int8 in the trained QDQ graph) are
stored as int4 in the QDQ format and packed into MatMulNBits in the QOperator format, as after PTQ."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from qgraph.ptq import QuantizeOptions
from qgraph.qat import build_fake_quant_graph, export_qdq, lower_qdq
from qgraph.qat.export import learned_scales, read_checkpoint_parameters
from qgraph.targets import TargetOptions
from qgraph.testing import run_model
from qgraph.train import ConstantSchedule, Trainer, TrainingConfig
from tests.qat.helpers import dataset, labelled_data, quantized


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(exported int8-coded QDQ model, the largest activation step, the trainer's eval-mode outputs, feeds)."""
    float_model, result = quantized(weight_bits=4)
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    config = TrainingConfig(epochs=1, batch_size=32, learning_rate=3e-3, schedule=ConstantSchedule(),
                            trainable=graph.trainable, threads=1)
    inputs, labels = labelled_data(128)
    trainer = Trainer(graph.model, config, tmp_path_factory.mktemp("four_bit_qat"))
    trainer.fit(dataset(inputs, labels))
    values = read_checkpoint_parameters(trainer.best_checkpoint, graph.trainable)
    step = max(float(scale) for key, scale in learned_scales(graph, values).items()
               if key in {quantizer.key for quantizer in graph.activations})
    feeds = {"input": labelled_data(64, seed=9)[0]}
    return export_qdq(graph, values), step, trainer.predict(feeds), feeds


def _lowered(exported: onnx.ModelProto, output_format: str) -> onnx.ModelProto:
    options = QuantizeOptions(target_options=TargetOptions(weight_bits=4, format=output_format, reduce_range="off"))
    lowered, _ = lower_qdq(exported, options)
    proto = ir.serde.serialize_model(lowered)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_qdq_export_stores_the_learned_codes_as_int4_bit_for_bit(trained):
    exported, _, _, feeds = trained
    assert {t.data_type for t in exported.graph.initializer if len(t.dims) >= 2} == {TensorProto.INT8}
    stored = _lowered(exported, "qdq")
    assert {t.data_type for t in stored.graph.initializer if len(t.dims) >= 2} == {TensorProto.INT4}
    assert [opset.version for opset in stored.opset_import if opset.domain in ("", "ai.onnx")] == [21]
    expected, actual = run_model(exported, feeds), run_model(stored, feeds)
    for name, values in expected.items():
        np.testing.assert_array_equal(actual[name], values)
    def code_bytes(model, data_type):
        return sum(len(t.raw_data) for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type == data_type)

    eight, four = code_bytes(exported, TensorProto.INT8), code_bytes(stored, TensorProto.INT4)
    assert four <= eight // 2 + 4  # two codes per byte (an odd count rounds up, per tensor)


def test_qoperator_export_packs_the_classifier_and_agrees_with_eval_mode(trained):
    exported, step, evaluated, feeds = trained
    lowered = _lowered(exported, "qoperator")
    ops = {node.op_type for node in lowered.graph.node}
    assert {"QLinearConv", "MatMulNBits"} <= ops
    output = run_model(lowered, feeds)["logits"]
    assert np.max(np.abs(output - evaluated)) <= 2 * step
