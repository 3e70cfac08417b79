"""Training artifacts from an inference ``onnx.ModelProto``: training, eval and optimizer graphs plus a checkpoint.

:func:`build_training_artifacts` wraps ``onnxruntime.training.artifacts.generate_artifacts`` and decides what the
graph trains:

- **Parameters.** ``trainable`` names the initializers that get gradients (default: every float initializer except
  BatchNormalization running mean/variance and scalars — rank-0 constants such as ``Clip`` bounds, GELU's ``0.5``
  or attention's ``1/sqrt(d)``, which are not weights and, for ``Clip``'s bounds, have no gradient at all, so
  onnxruntime refuses to build the graph). Every other *float* initializer becomes a frozen parameter: it moves
  to a graph input, lives in the checkpoint and is written back on export. Integer initializers (Reshape shapes,
  axes, zero points) stay constants inside the graph. So a QAT graph may carry extra non-trainable initializers.
- **Loss.** ``cross_entropy``: ``SoftmaxCrossEntropyLoss(logits, labels)`` with mean reduction over a 2-D
  ``batch × classes`` output and a new int64 graph input of shape ``[batch]``. ``mse``: ``mean((y - target)²)`` with a
  new float graph input shaped like the output (a regression target, or a teacher's output for distillation). The
  output the loss reads is also kept as a second graph output of the training and eval graphs, so every step
  returns ``(loss, output)`` and accuracy needs no extra run.
- **BatchNormalization.** onnxruntime's pre-training graph transformer replaces every ``BatchNormalization`` in the
  training graph by ``BatchNormInternal`` in training mode — also nodes in inference form (no ``training_mode``
  attribute, i.e. 0, as the reference models write them; measured with onnxruntime-training 1.19.2): batch
  statistics normalise, and the running mean/variance inputs are updated *in place* (aliased outputs,
  ``running = momentum · running + (1 - momentum) · batch``). That is why the running statistics must be frozen
  parameters (graph inputs backed by the checkpoint): as constants they could not be updated. The eval graph keeps
  the node with ``training_mode = 0`` (running statistics), and ``export_model_for_inferencing`` writes the updated
  statistics into the exported model.
- **Optimizer.** onnxruntime offers two optimizer graphs: ``AdamWOptimizer`` (``adam_mode = 1``, decoupled weight
  decay, bias correction) and ``SGDOptimizerV2`` (plain ``w -= lr · g``: no momentum, no weight decay). Both accept
  onnxblock's ``ClipGradNorm(max_norm)``, an ``InplaceClipGradNorm`` node that rescales the whole gradient sequence
  by ``min(1, max_norm / ‖g‖₂)`` before the update. SGD with momentum or weight decay has no optimizer graph: the
  host update in :mod:`qgraph.train.host_sgd` replaces it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from qgraph.errors import DataError, QGraphError
from qgraph.ir.naming import NameScope
from qgraph.train.config import TrainingConfig
from qgraph.train.fused_gradients import fuse_quantizers, library_path
from qgraph.train.ort_training import captured_native_stderr, register_gradient_overrides, training_api

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {onnx.TensorProto.FLOAT}


@dataclass(frozen=True)
class TrainingArtifacts:
    """Paths and names of the artifacts one :func:`build_training_artifacts` call wrote."""

    directory: Path
    training_model: Path
    eval_model: Path
    optimizer_model: Path | None
    checkpoint: Path
    input_names: tuple[str, ...]
    target_input_name: str
    output_name: str
    output_shape: tuple[int | str | None, ...]
    loss: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    #: The custom-operator library the training model needs (:mod:`qgraph.train.fused_gradients`), if any.
    custom_operators: str | None = None

    @property
    def num_classes(self) -> int | None:
        """The static size of the logits' last dimension for cross-entropy, else ``None``."""
        if self.loss != "cross_entropy" or not self.output_shape:
            return None
        last = self.output_shape[-1]
        return last if isinstance(last, int) else None


def _value_shape(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    shape: list[int | str | None] = []
    for dimension in value.type.tensor_type.shape.dim:
        if dimension.HasField("dim_value"):
            shape.append(dimension.dim_value)
        elif dimension.HasField("dim_param"):
            shape.append(dimension.dim_param)
        else:
            shape.append(None)
    return tuple(shape)


def batchnorm_statistics(model: onnx.ModelProto) -> set[str]:
    """Names of the running mean and variance inputs of every BatchNormalization node in the main graph."""
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            names.update(name for name in node.input[3:5] if name)
    return names


def split_parameters(model: onnx.ModelProto, trainable: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """(trainable, frozen) float initializer names; see the module docstring for the default split."""
    float_initializers = [tensor.name for tensor in model.graph.initializer if tensor.data_type in _FLOAT_TYPES]
    if trainable is None:
        excluded = batchnorm_statistics(model)
        excluded.update(tensor.name for tensor in model.graph.initializer if not tensor.dims)  # scalar constants
        chosen = [name for name in float_initializers if name not in excluded]
    else:
        available = set(float_initializers)
        unknown = [name for name in trainable if name not in available]
        if unknown:
            raise QGraphError(f"trainable names are not float initializers of the model: {', '.join(unknown[:5])}")
        chosen = list(dict.fromkeys(trainable))
    if not chosen:
        raise QGraphError("the model has no trainable float initializers")
    chosen_set = set(chosen)
    frozen = [name for name in float_initializers if name not in chosen_set]
    return chosen, frozen


def values_behind(model: onnx.ModelProto, output_name: str) -> set[str]:
    """The names of every value ``output_name`` is computed from (itself included), through If/Loop bodies too: a
    node's body may read outer values by name."""
    producers = {output: node for node in model.graph.node for output in node.output}
    behind, pending = set(), [output_name]
    while pending:
        name = pending.pop()
        if name in behind:
            continue
        behind.add(name)
        node = producers.get(name)
        if node is None:
            continue
        pending += [value for value in node.input if value]
        pending += [value for attribute in node.attribute for graph in _attribute_graphs(attribute)
                    for body_node in _all_nodes(graph) for value in body_node.input if value]
    return behind


def _attribute_graphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = list(graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            for body in _attribute_graphs(attribute):
                nodes += _all_nodes(body)
    return nodes


def _expose_layer_norm_statistics(model: onnx.ModelProto) -> None:
    """Give every LayerNormalization its optional ``Mean`` and ``InvStdDev`` outputs, in place.

    onnxruntime's LayerNormalization gradient reads both (``GradientBuilderBase::O(1)`` and ``O(2)``); a node written
    with ``Y`` only, as exporters and the reference ViT write it, makes artifact generation fail with
    ``i < node_->OutputDefs().size() was false``. :func:`qgraph.train.session.tidy_exported_model` drops them again.
    """
    names = NameScope.of_proto(model)
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        for suffix in ("mean", "inv_std_dev")[len(node.output) - 1:]:
            node.output.append(names.fresh(f"{node.output[0]}_{suffix}"))


def _prepared_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without initializers listed as graph inputs (IR < 4 style), LayerNormalization statistics exposed,
    shapes inferred."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    initializer_names = {tensor.name for tensor in prepared.graph.initializer}
    real_inputs = [value for value in prepared.graph.input if value.name not in initializer_names]
    if len(real_inputs) != len(prepared.graph.input):
        del prepared.graph.input[:]
        prepared.graph.input.extend(real_inputs)
    _expose_layer_norm_statistics(prepared)
    try:
        prepared = onnx.shape_inference.infer_shapes(prepared)
    except Exception as error:  # noqa: BLE001 - shapes only refine the checks below
        logger.debug("shape inference failed before artifact generation: %s", error)
    return prepared


def _check_output(model: onnx.ModelProto, output_name: str, loss: str) -> tuple[int | str | None, ...]:
    outputs = {value.name: value for value in model.graph.output}
    if output_name not in outputs:
        raise QGraphError(f"the model has no output {output_name!r}; outputs: {', '.join(outputs)}")
    value = outputs[output_name]
    shape = _value_shape(value) or ()
    if value.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise QGraphError(f"output {output_name!r} is not float32; the {loss} loss needs float32 predictions")
    if loss == "cross_entropy" and shape and len(shape) != 2:
        raise DataError(
            f"the cross_entropy loss expects 2-D logits (batch × classes) from output {output_name!r}, "
            f"but it has rank {len(shape)}; use loss='mse' with targets for other outputs"
        )
    return shape


def _loss_block(onnxblock, loss: str, output_name: str, target_name: str):
    """An onnxblock loss over one chosen model output (the default blocks would read the first output)."""

    class _SelectedOutputLoss(onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            if loss == "cross_entropy":
                self._loss = onnxblock.loss.CrossEntropyLoss(reduction="mean")
            else:
                self._loss = onnxblock.loss.MSELoss(reduction="mean")

        def build(self, *output_names: str) -> str:
            return self._loss(output_name, target_name)

    return _SelectedOutputLoss()


def _optimizer_block(onnxblock, config: TrainingConfig):
    if config.uses_host_sgd:
        return None
    clip = onnxblock.optim.ClipGradNorm(float(config.max_grad_norm)) if config.clips_gradients else None
    if config.optimizer == "adamw":
        return onnxblock.optim.AdamW(
            bias_correction=True,
            betas=tuple(config.betas),
            eps=config.epsilon,
            weight_decay=config.weight_decay,
            clip_grad=clip,
        )
    return onnxblock.optim.SGD(clip_grad=clip)


def build_training_artifacts(
    model: onnx.ModelProto, directory: str | os.PathLike, config: TrainingConfig
) -> TrainingArtifacts:
    """Write ``training_model.onnx``, ``eval_model.onnx``, ``checkpoint`` and (unless host SGD) the optimizer model."""
    api = training_api()
    register_gradient_overrides()
    prepared = _prepared_model(model)
    output_name = config.output_name or (prepared.graph.output[0].name if prepared.graph.output else None)
    if output_name is None:
        raise QGraphError("the model has no outputs to train")
    output_shape = _check_output(prepared, output_name, config.loss)
    trainable, frozen = split_parameters(prepared, config.trainable)
    behind = values_behind(prepared, output_name)
    elsewhere = [name for name in trainable if name not in behind]
    if elsewhere:  # onnxruntime-training refuses a trainable parameter the loss cannot reach
        others = [value.name for value in prepared.graph.output if value.name != output_name]
        logger.warning("training on output %r only: %d parameter(s) that only other outputs (%s) read keep their "
                       "values", output_name, len(elsewhere), ", ".join(others))
        trainable = [name for name in trainable if name in behind]
        frozen += elsewhere
        if not trainable:
            raise QGraphError(f"no trainable float initializer reaches output {output_name!r}")
    target_name = NameScope.of_proto(prepared).fresh("labels" if config.loss == "cross_entropy" else "target")
    input_names = tuple(value.name for value in prepared.graph.input)

    work = Path(directory)
    work.mkdir(parents=True, exist_ok=True)
    optimizer = _optimizer_block(api.onnxblock, config)
    logger.info(
        "building training artifacts in %s: loss=%s on %r, optimizer=%s, %d trainable and %d frozen parameters",
        work, config.loss, output_name, "host-sgd" if optimizer is None else config.optimizer, len(trainable),
        len(frozen),
    )
    try:
        with captured_native_stderr():
            api.artifacts.generate_artifacts(
                prepared,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=_loss_block(api.onnxblock, config.loss, output_name, target_name),
                optimizer=optimizer,
                artifact_directory=work,
                additional_output_names=[output_name],
            )
    except QGraphError:
        raise
    except Exception as error:
        raise QGraphError(f"onnxruntime-training could not build the training graph: {error}") from error
    custom_operators = library_path() if config.fused_gradients else None
    if custom_operators is not None and not fuse_quantizers(work / "training_model.onnx"):
        custom_operators = None  # nothing to fuse: the sessions need no library
    return TrainingArtifacts(
        directory=work,
        training_model=work / "training_model.onnx",
        eval_model=work / "eval_model.onnx",
        optimizer_model=None if optimizer is None else work / "optimizer_model.onnx",
        checkpoint=work / "checkpoint",
        input_names=input_names,
        target_input_name=target_name,
        output_name=output_name,
        output_shape=output_shape,
        loss=config.loss,
        trainable=tuple(trainable),
        frozen=tuple(frozen),
        custom_operators=custom_operators,
    )
