"""One live training session: checkpoint state, training module and optimizer over a set of artifacts.

:class:`TrainingSession` hides the positional calling convention of ``onnxruntime.training.api.Module`` (user
inputs in the order of ``Module.input_names()``, targets included, outputs ``(loss, model output)``), applies the
learning rate and the optimizer step, saves checkpoints with qgraph's counters as checkpoint properties, and exports
the inference model.

Checkpoints are onnxruntime checkpoint files written by ``CheckpointState.save_checkpoint`` with the optimizer state
(AdamW's step count and both moments) included, so a resumed ``api.Optimizer`` continues exactly where it stopped;
the host SGD's velocity lives beside it in ``<checkpoint>.host_sgd.npz``. qgraph's own counters are checkpoint
properties named ``qgraph.*``.

Export: ``Module.export_model_for_inferencing`` keeps the eval graph up to the model output, with every parameter
(BatchNormalization running statistics included) stored as an initializer. The exported model lists every opset
domain onnxruntime's training graph knew; :func:`tidy_exported_model` keeps only the domains its nodes use, drops
the LayerNormalization ``Mean``/``InvStdDev`` outputs that only the gradient needed (when nothing reads them), and
the model is checked with ``onnx.checker`` so plain onnxruntime (and other tools) can load it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from qgraph.errors import QGraphError
from qgraph.train.artifacts import TrainingArtifacts
from qgraph.train.config import TrainingConfig
from qgraph.train.host_sgd import HostMomentumSGD
from qgraph.train.ort_training import captured_native_stderr, training_api

logger = logging.getLogger(__name__)

PROPERTY_PREFIX = "qgraph."


def host_state_path(checkpoint: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(checkpoint)}.host_sgd.npz")


def tidy_exported_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Drop unread LayerNormalization statistics outputs and opset imports no node uses, save back, and run the
    full ONNX checker."""
    model = onnx.load(os.fspath(path))
    read = {name for node in model.graph.node for name in node.input} | {value.name for value in model.graph.output}
    for node in model.graph.node:  # the statistics outputs artifacts.py exposed for the gradient
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            while len(node.output) > 1 and node.output[-1] not in read:
                node.output.pop()
    used = {node.domain or "" for node in model.graph.node}
    kept = [opset for opset in model.opset_import if (opset.domain or "") in used or opset.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, os.fspath(path))
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return model


class TrainingSession:
    """State, module and optimizer built from ``artifacts``, starting from ``checkpoint``."""

    def __init__(self, artifacts: TrainingArtifacts, config: TrainingConfig, checkpoint: str | os.PathLike) -> None:
        api = training_api().api
        self.artifacts = artifacts
        self.config = config
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if config.threads is not None:
            options.intra_op_num_threads = config.threads
            options.inter_op_num_threads = 1
        if artifacts.custom_operators is not None:
            options.register_custom_ops_library(artifacts.custom_operators)
        with captured_native_stderr():
            self.state = api.CheckpointState.load_checkpoint(os.fspath(checkpoint))
            self.module = api.Module(
                os.fspath(artifacts.training_model), self.state, os.fspath(artifacts.eval_model),
                device="cpu", session_options=options,
            )
            if artifacts.optimizer_model is not None:
                self.optimizer = api.Optimizer(os.fspath(artifacts.optimizer_model), self.module)
            else:
                self.optimizer = HostMomentumSGD(
                    self.state, artifacts.trainable, learning_rate=config.learning_rate, momentum=config.momentum,
                    weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                )
                if host_state_path(checkpoint).exists():
                    self.optimizer.load(host_state_path(checkpoint))
        self._train_input_names = tuple(self.module.train().input_names())
        self._eval_input_names = tuple(self.module.eval().input_names())
        self.module.train()

    # -- properties -----------------------------------------------------------------------------------------------

    def get_property(self, name: str, default=None):
        key = PROPERTY_PREFIX + name
        properties = self.state.properties
        return properties[key] if key in properties else default

    def set_property(self, name: str, value: int | float | str) -> None:
        self.state.properties[PROPERTY_PREFIX + name] = value

    # -- steps ----------------------------------------------------------------------------------------------------

    def _arguments(self, names: tuple[str, ...], feeds: Mapping[str, np.ndarray], targets: np.ndarray) -> list:
        arguments = []
        for name in names:
            arguments.append(targets if name == self.artifacts.target_input_name else feeds[name])
        return arguments

    def forward_backward(self, feeds: Mapping[str, np.ndarray], targets: np.ndarray) -> tuple[float, np.ndarray]:
        """Training-mode forward and backward pass; gradients land in the buffers. Returns (loss, model output)."""
        self.module.train()
        loss, output = self.module(*self._arguments(self._train_input_names, feeds, targets))
        return float(loss), output

    def update(self, learning_rate: float) -> None:
        """Apply the optimizer with ``learning_rate``, then schedule the gradient buffers for reset."""
        self.optimizer.set_learning_rate(learning_rate)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def discard_gradients(self) -> None:
        self.module.lazy_reset_grad()

    def parameters_are_finite(self) -> bool:
        """Whether every trainable parameter is finite (one contiguous copy of them).

        A step whose loss is finite can still have non-finite gradients (a NaN input that a quantizer clamps to a
        finite code), and the update then spreads NaN through the weights. The next training step must not run:
        onnxruntime's MaxPoolGrad scatters through the indices MaxPool returns, which are undefined when a window
        holds only NaN, and it crashed the process (a wild write, measured with onnxruntime-training 1.19.2).
        """
        values = self.module.get_contiguous_parameters(trainable_only=True)
        return bool(np.isfinite(values.numpy()).all())

    def evaluate(self, feeds: Mapping[str, np.ndarray], targets: np.ndarray) -> tuple[float, np.ndarray]:
        """Eval-mode forward pass (BatchNormalization on running statistics). Returns (loss, model output)."""
        self.module.eval()
        loss, output = self.module(*self._arguments(self._eval_input_names, feeds, targets))
        self.module.train()
        return float(loss), output

    # -- persistence ----------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint with parameters, qgraph properties and the optimizer state."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        api = training_api().api
        include_optimizer = self.artifacts.optimizer_model is not None
        api.CheckpointState.save_checkpoint(self.state, os.fspath(path), include_optimizer_state=include_optimizer)
        if isinstance(self.optimizer, HostMomentumSGD):
            self.optimizer.save(host_state_path(path))
        return path

    def export(self, path: str | os.PathLike) -> Path:
        """Write the inference model (eval graph up to the trained output) and check it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with captured_native_stderr():
                self.module.export_model_for_inferencing(os.fspath(path), [self.artifacts.output_name])
        except Exception as error:
            raise QGraphError(f"could not export the trained model to {path}: {error}") from error
        tidy_exported_model(path)
        logger.info("exported the trained inference model to %s", path)
        return path
