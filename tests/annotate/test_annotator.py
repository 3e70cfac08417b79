"""Annotation rules per target: what is quantized, what shares a scale, what stays float and why."""

from __future__ import annotations

import onnx_ir as ir

from qgraph.annotate.annotator import AnnotationOverrides, annotate
from qgraph.targets import TargetOptions, get_target
from tests.ptq.small_models import residual_cnn


def _plan(target="ort-cpu", overrides=None, **options):
    model = ir.serde.deserialize_model(residual_cnn())
    return annotate(model, get_target(target, TargetOptions(**options)).rules(), overrides)


def test_ort_cpu_quantizes_activations_weights_and_biases_and_fuses_relu():
    plan = _plan()
    # Relu outputs carry the ranges; the Conv outputs feeding them do not get their own pair.
    assert {"input", "r1", "p1", "r2", "c3", "r3", "gap", "flat"} <= set(plan.activations)
    assert not {"c1", "c2", "sum"} & set(plan.activations)
    assert "logits" not in plan.activations  # graph outputs stay float
    assert {weight.name: weight.axis for weight in plan.weights} == {
        "conv1.weight": 0, "conv2.weight": 0, "conv3.weight": 0, "fc.weight": 0
    }
    assert {bias.name for bias in plan.biases} == {"conv1.bias", "conv2.bias", "conv3.bias", "fc.bias"}
    assert {"relu1", "relu2", "relu3", "conv1", "residual", "pool1"} <= set(plan.quantized_nodes)
    assert plan.fp32_nodes == {}


def test_pass_through_ops_share_the_scale_of_their_input():
    plan = _plan()
    assert plan.group_of("p1") == frozenset({"r1", "p1"})
    assert plan.group_of("flat") == frozenset({"gap", "flat"})
    assert plan.group_of("r2") == frozenset({"r2"})


def test_tensorrt_places_qdq_on_compute_inputs_and_the_residual_branch_only():
    plan = _plan("tensorrt")
    assert set(plan.activations) == {"input", "p1", "r2", "flat"}
    assert plan.biases == ()
    assert all(weight.name.endswith("weight") for weight in plan.weights)
    assert plan.activation_spec.symmetric and plan.activation_spec.signed
    assert plan.weight_spec.narrow_range
    assert "pool1" in plan.fp32_nodes


def test_exclusions_and_first_last_layers_stay_fp32_with_reasons():
    plan = _plan(overrides=AnnotationOverrides(exclude=frozenset({"conv2", "Gemm"}), keep_first_fp32=True))
    assert plan.fp32_nodes["conv2"] == "excluded by the user"
    assert plan.fp32_nodes["fc"] == "excluded by the user"
    assert "first/last" in plan.fp32_nodes["conv1"]
    assert "conv2.weight" not in {weight.name for weight in plan.weights}


def test_reduce_range_follows_the_option():
    assert _plan(reduce_range="on").weight_spec.qmax == 63
    assert _plan(reduce_range="on").weight_spec.qmin == -63
    assert _plan(reduce_range="off").weight_spec.qmax == 127
