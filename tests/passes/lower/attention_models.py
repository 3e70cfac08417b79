"""A small BERT encoder quantized by qgraph and lowered by every ort-cpu pass except LowerQuantizedAttention: the
integer attention block that pass rewrites (shared by its tests and the pass-protocol corpus)."""

from __future__ import annotations

import functools

import onnx
import onnx_ir as ir

from qgraph.annotate.annotator import AnnotationOverrides
from qgraph.models.bert import BertLayout, BertOptions, build_bert, example_inputs
from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.infrastructure import PassManager
from qgraph.passes.lower.lower_quantized_attention import LowerQuantizedAttention
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.targets import TargetOptions, get_target


def lower_without_attention(qdq_model: onnx.ModelProto, target_options: TargetOptions) -> ir.Model:
    """``qdq_model`` lowered by the ort-cpu passes, LowerQuantizedAttention left out, then dead code removed."""
    model = ir.serde.deserialize_model(qdq_model)
    passes = [step for step in get_target("ort-cpu", target_options).lowering_pipeline()
              if not isinstance(step, LowerQuantizedAttention)]
    PassManager(passes, fixed_point=True).run(model)
    PassManager([EliminateDeadCode()]).run(model)
    return model


def unfused_bert(layout: BertLayout, options: BertOptions, activations: str, *, sequence: int,
                 exclude: frozenset[str] = frozenset(), reduce_range: str = "off",
                 proto: onnx.ModelProto | None = None) -> ir.Model:
    """The encoder (``proto``, or built from ``layout`` and ``options``) quantized with shape inference and lowered
    without LowerQuantizedAttention."""
    proto = proto if proto is not None else build_bert(layout, options=options, seed=3)
    batches = [example_inputs(layout, 4, sequence, seed=seed, mask_dtype=options.mask_dtype) for seed in range(3)]
    target_options = TargetOptions(reduce_range=reduce_range)
    quantization = QuantizeOptions(min_sqnr=None, activations=activations, speed_choice=False,
                                   overrides=AnnotationOverrides(exclude=exclude), target_options=target_options)
    inferred = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    result = optimize(inferred, None, OptimizeOptions(quantization=quantization), calibration_data=batches)
    assert result.quantization is not None
    return lower_without_attention(result.quantization.qdq_model, target_options)


@functools.lru_cache(maxsize=1)
def _corpus_bytes() -> bytes:
    layout = BertLayout(layers=1, hidden=16, heads=2, intermediate=32, vocabulary=32, max_positions=16)
    model = unfused_bert(layout, BertOptions(), "static", sequence=8)
    return ir.serde.serialize_model(model).SerializeToString()


def integer_attention_block() -> onnx.ModelProto:
    """A one-layer encoder whose attention LowerQuantizedAttention rewrites (built once per session)."""
    return onnx.load_from_string(_corpus_bytes())
