"""UpgradeOpsetForFusions: convert the model to the opset a pending fusion needs, when the conversion is exact.

A fusion whose operator the model's opset lacks (LayerNormalization: 17, HardSwish: 14) refuses with an
:class:`~qgraph.passes.canonicalize._pattern_matching.OpsetRefusal` naming the opset it needs. This pass asks each
such fusion, without changing anything, whether it meets one: it runs their ``match`` and ``check`` over the model.
If any asks for opset N above the model's, the model is converted to N (the highest asked for) with onnx's version
converter through :func:`qgraph.ir.opset_upgrade.upgrade_opset`, which never goes beyond what the installed
onnxruntime runs and refuses, with a log line, a conversion that changes the model's outputs on seeded random inputs.
The fusions that follow in the pipeline then fuse. A refused upgrade leaves the model as it is (correct, unfused).

It runs after the constant folding (the fusions read their constants as initializers) and before the fusions. A
model that needs nothing, or is already new enough, is not touched (no conversion, no session).
"""

from __future__ import annotations

import logging
import sys

import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.opset_upgrade import adopt, upgrade_opset
from qgraph.ir.traversal import iterate_graphs
from qgraph.ir.values import default_opset
from qgraph.passes.canonicalize._pattern_matching import OpsetRefusal
from qgraph.passes.canonicalize.fuse_general_layer_normalization import FuseGeneralLayerNormalization
from qgraph.passes.canonicalize.fuse_hard_swish import FuseHardSwish
from qgraph.passes.canonicalize.fuse_layer_normalization import FuseLayerNormalization
from qgraph.passes.infrastructure import Phase, QGraphPass, RewriteContext, register

logger = logging.getLogger(__name__)

#: The fusions whose operator needs a minimum opset (FuseGelu and FuseQuickGelu fall back to com.microsoft ops).
OPSET_FUSIONS = (FuseLayerNormalization, FuseGeneralLayerNormalization, FuseHardSwish)
#: Their modules, each of which names the opset its operator needs (MINIMUM_OPSET).
_FUSION_MODULES = tuple(sys.modules[fusion.__module__] for fusion in OPSET_FUSIONS)


def needed_opset(model: ir.Model, fusions=OPSET_FUSIONS) -> int:
    """The highest opset a fusion of ``fusions`` refuses for (0 when none does); changes nothing."""
    context = RewriteContext(model)
    needed = 0
    for fusion_class in fusions:
        fusion = fusion_class()
        for graph in iterate_graphs(model):
            for node in graph:
                match = fusion.match(node, context)
                if match is None:
                    continue
                plan = fusion.check(match, context)
                if isinstance(plan, OpsetRefusal):
                    needed = max(needed, plan.needed)
    return needed


@register
class UpgradeOpsetForFusions(QGraphPass):
    """Convert the model to the opset a pending LayerNorm/HardSwish fusion needs (checked numerically)."""

    phase = Phase.CANONICALIZE
    summary = "Upgrade the opset (onnx version converter, checked numerically) when a fusion needs a newer one"

    def call(self, model: ir.Model) -> PassResult:
        current = default_opset(model)
        if current >= max(fusion.MINIMUM_OPSET for fusion in _FUSION_MODULES):
            return PassResult(model, False)  # every fusion's operator exists already: nothing to ask
        needed = needed_opset(model)
        if needed <= current:
            return PassResult(model, False)
        logger.info("a fusion needs opset %d, the model imports %d", needed, current)
        upgraded = upgrade_opset(model, needed)
        if upgraded is None:
            return PassResult(model, False)
        adopt(model, upgraded)
        logger.info("model upgraded to opset %d", default_opset(model))
        return PassResult(model, True)
