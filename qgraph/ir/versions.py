"""What the installed onnxruntime can execute, and conversion of a model towards it.

qgraph runs on whichever onnxruntime from 1.19 on the environment has (:mod:`qgraph.runtime`), so the IR version and
default-domain opset that load keeps and save writes are the installed release's, not fixed numbers.
:data:`RUNTIME_LIMITS` lists, per release, the highest IR version onnxruntime loads and the highest opset whose
operators qgraph writes it runs:

=================  ========  =========  ==========================================================================
onnxruntime        IR <=     opset <=   source
=================  ========  =========  ==========================================================================
1.18 (reference)   10        21         onnxruntime's compatibility table (docs/reference/compatibility.md), the
                                        last row it lists in the docs read; below the supported range
1.19, 1.20         10        21         measured (onnxruntime-training-cpu 1.19.2; onnxruntime 1.20.1)
1.21, 1.22         10        22         measured (1.21.1, 1.22.1)
1.23               11        22         measured (1.23.2): it loads opset 23 (ONNX 1.18) but has no QuantizeLinear(23)
1.24               13        25         measured (1.24.4)
1.25 to 1.31       13        26         measured (1.25.1, 1.26.0, 1.27.0, 1.28.0, 1.29.0, 1.30.0, 1.31.1)
1.32               14        27         measured (1.32.0, the latest release when written)
=================  ========  =========  ==========================================================================

Measured means: the probe of ``tests/ir/runtime_probe.py`` (one model of the operators qgraph writes whose schemas
changed in recent opsets, Q/DQ, Conv, MaxPool, Reshape, Pad, Range and others) stamped with IR n and opset m, created
as a session on that release's wheel and run once; the row holds the largest n, then the largest m, that load and
run. ``tests/ir/test_versions.py`` re-measures the installed release's row in every environment the suite runs in.
A release newer than the table gets the last row: every release runs what the ones before it ran.

:func:`supported_versions` caps that row by what the installed onnx knows (its ``IR_VERSION`` and highest opset:
shape inference and the version converter go no further), so a newer runtime beside an older onnx stays consistent.

A model written for a newer opset is converted down with onnx's version converter when every operator has an
adapter and the conversion keeps the model's declared shapes; otherwise it is refused naming the model's opset, the
installed onnxruntime and the opset it runs. A newer IR version is lowered (the IR versions after 10 add fields
qgraph's passes neither read nor write). Only the operator domains below exist in onnxruntime; a domain that a
model defines as local functions is fine too, since onnxruntime inlines them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import onnx
import onnx.shape_inference
import onnx.version_converter

from qgraph import runtime
from qgraph.errors import UnsupportedModelError
from qgraph.ir.values import default_opset

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeLimits:
    """From onnxruntime ``release`` (major, minor) on: the highest IR version it loads and opset it runs."""

    release: tuple[int, int]
    ir_version: int
    opset: int


#: One row per change, holding from its release until the next row's (see the module docstring for each source).
RUNTIME_LIMITS = (
    RuntimeLimits(release=(1, 19), ir_version=10, opset=21),
    RuntimeLimits(release=(1, 21), ir_version=10, opset=22),
    RuntimeLimits(release=(1, 23), ir_version=11, opset=22),
    RuntimeLimits(release=(1, 24), ir_version=13, opset=25),
    RuntimeLimits(release=(1, 25), ir_version=13, opset=26),
    RuntimeLimits(release=(1, 32), ir_version=14, opset=27),
)
#: The highest ai.onnx.ml opset: 5 in every supported release (and in onnx from 1.16 to 1.23).
MAX_ML_OPSET = 5
#: Above this many bytes the converted model is not re-checked by strict shape inference (protobuf's 2 GB limit).
_STRICT_INFERENCE_LIMIT = 1_500_000_000
SUPPORTED_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.training", "ai.onnx.preview.training"}
)


@dataclasses.dataclass(frozen=True)
class SupportedVersions:
    """What this environment loads, runs and writes: the installed onnxruntime's row, capped by the installed onnx."""

    onnxruntime_version: str
    onnx_version: str
    ir_version: int
    opset: int

    def describe(self) -> str:
        """``onnxruntime 1.19.2 (IR <= 10, opset <= 21)``, for messages."""
        return f"onnxruntime {self.onnxruntime_version} (IR <= {self.ir_version}, opset <= {self.opset})"


def limits_of_release(release: tuple[int, int]) -> RuntimeLimits:
    """The row of :data:`RUNTIME_LIMITS` that holds for onnxruntime ``release`` (major, minor)."""
    if release < RUNTIME_LIMITS[0].release:
        raise ValueError(f"onnxruntime {release[0]}.{release[1]} is older than the table's first release")
    return [row for row in RUNTIME_LIMITS if row.release <= release][-1]


@functools.cache
def supported_versions() -> SupportedVersions:
    """The IR version and opset this process can run: the installed onnxruntime's, within the installed onnx's.

    Refuses an onnxruntime older than qgraph supports (:func:`qgraph.runtime.installed_onnxruntime`).
    """
    installed = runtime.installed_onnxruntime()
    row = limits_of_release(installed.release)
    supported = SupportedVersions(
        onnxruntime_version=installed.version,
        onnx_version=onnx.__version__,
        ir_version=min(row.ir_version, onnx.IR_VERSION),
        opset=min(row.opset, onnx.defs.onnx_opset_version()),
    )
    logger.debug("%s with onnx %s", supported.describe(), supported.onnx_version)
    return supported


def fit_to_runtime(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` within what the installed runtime runs: a newer opset converted down, a newer IR version lowered.

    Refuses, naming the model's version and the runtime's, what cannot be brought down, and operators the runtime
    cannot execute (:func:`check_runtime_support`).
    """
    supported = supported_versions()
    opset = default_opset(proto)
    if opset > supported.opset:
        try:
            proto = convert_opset(proto, supported.opset)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(
                f"the model's opset {opset} is newer than the installed {supported.describe()} runs, "
                f"and converting it down failed: {error}"
            ) from None
    if proto.ir_version > supported.ir_version:
        logger.info("lowering IR version %d -> %d for %s", proto.ir_version, supported.ir_version,
                    supported.describe())
        proto.ir_version = supported.ir_version
    for entry in proto.opset_import:
        if entry.domain == "ai.onnx.ml" and entry.version > MAX_ML_OPSET:
            raise UnsupportedModelError(
                f"the model's ai.onnx.ml opset {entry.version} is newer than the installed onnxruntime "
                f"{supported.onnxruntime_version} runs ({MAX_ML_OPSET})"
            )
    check_runtime_support(proto)
    return proto


def convert_opset(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to default-domain opset ``target``; a refusal names the operator that blocks it."""
    current = default_opset(proto)
    if current == target:
        return proto
    logger.info("converting opset %d -> %d", current, target)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as error:  # the converter raises bare RuntimeError/ValueError with its reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(
            f"cannot convert the model from opset {current} to opset {target}: {reason}"
        ) from error
    conflict = _conversion_shape_conflict(proto, converted)
    if conflict is not None:
        raise UnsupportedModelError(
            f"cannot convert the model from opset {current} to opset {target} without changing it: {conflict}"
        )
    return converted


def _strict_inference_error(proto: onnx.ModelProto) -> str | None:
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else "shape inference failed"
    except Exception:  # other failures (size, unsupported constructs) say nothing about the conversion
        return None
    return None


def _conversion_shape_conflict(original: onnx.ModelProto, converted: onnx.ModelProto) -> str | None:
    """Why the converted model contradicts shapes the original declares, if it does and the original did not.

    The converter keeps an operator whose semantics changed between the opsets (MaxPool's ceil_mode output size
    changed in opset 22, for one) as it is; shape inference at the lower opset then disagrees with the shapes the
    model declares, which would be a different model, silently.
    """
    if original.ByteSize() > _STRICT_INFERENCE_LIMIT:
        return None
    after = _strict_inference_error(converted)
    if after is None:
        return None
    return after if _strict_inference_error(original) is None else None


def check_runtime_support(proto: onnx.ModelProto) -> None:
    """Refuse operators whose domain or version the installed runtime cannot execute."""
    local_domains = {function.domain for function in proto.functions}
    opsets = {entry.domain or "": entry.version for entry in proto.opset_import}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if domain in local_domains:
                pass
            elif domain not in SUPPORTED_DOMAINS:
                raise UnsupportedModelError(
                    f"node {node.name or node.op_type!r} uses operator {node.op_type} from domain {domain!r}, "
                    "which onnxruntime cannot run (supported domains: ai.onnx, ai.onnx.ml, com.microsoft)"
                )
            elif domain in ("", "ai.onnx"):
                version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else "", 0))
                try:
                    onnx.defs.get_schema(node.op_type, version, "")
                except onnx.defs.SchemaError:
                    raise UnsupportedModelError(
                        f"node {node.name or node.op_type!r}: operator {node.op_type} does not exist in "
                        f"ONNX opset {version}"
                    ) from None
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(proto.graph)
