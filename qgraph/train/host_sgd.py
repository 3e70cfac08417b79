"""SGD with momentum and weight decay, computed in numpy on the parameters of an onnxruntime checkpoint state.

onnxruntime-training 1.19's only SGD optimizer graph is ``SGDOptimizerV2``: ``w ← w − lr · g``, with no momentum
and no weight decay (``artifacts.OptimType`` has ``AdamW`` and ``SGD`` only, and ``onnxblock.optim.SGD`` takes
nothing but ``clip_grad``). When a run asks for either, this host optimizer replaces the optimizer graph. After the
training step has filled the gradient buffers, for every trainable parameter ``w`` with gradient ``g``:

    g ← g · min(1, max_norm / ‖(g_1, …, g_n)‖₂)        (global-norm clipping, when enabled)
    g ← g + weight_decay · w                            (coupled L2 decay, as torch.optim.SGD)
    v ← momentum · v + g                                (heavy-ball momentum; v starts at 0)
    w ← w − lr · v

The gradients are read through ``Parameter.grad`` and the parameters written through ``Parameter.data``: two
host copies per parameter and step, which costs little next to the step itself for the CNNs qgraph trains but is
slower than the fused onnxruntime optimizers. The velocity buffers are saved beside a checkpoint (``.npz``) so a
resumed run continues with the same optimizer state.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


class HostMomentumSGD:
    """The ``api.Optimizer``-like interface (``step``, ``set_learning_rate``, ``get_learning_rate``) in numpy."""

    def __init__(
        self,
        state,
        parameter_names: Sequence[str],
        *,
        learning_rate: float,
        momentum: float,
        weight_decay: float,
        max_grad_norm: float | None,
    ) -> None:
        self._state = state
        self._names = tuple(parameter_names)
        self._learning_rate = float(learning_rate)
        self._momentum = float(momentum)
        self._weight_decay = float(weight_decay)
        self._max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
        self._velocity: dict[str, np.ndarray] = {}

    def set_learning_rate(self, learning_rate: float) -> None:
        self._learning_rate = float(learning_rate)

    def get_learning_rate(self) -> float:
        return self._learning_rate

    def step(self) -> None:
        parameters = self._state.parameters
        gradients = {}
        for name in self._names:
            gradient = parameters[name].grad
            if gradient is None:
                raise RuntimeError(f"parameter {name!r} has no gradient; call the training step first")
            gradients[name] = np.asarray(gradient, dtype=np.float32)
        if self._max_grad_norm is not None:
            total = math.sqrt(sum(float(np.vdot(gradient, gradient)) for gradient in gradients.values()))
            if total > self._max_grad_norm:
                scale = np.float32(self._max_grad_norm / (total + 1e-6))
                for gradient in gradients.values():
                    gradient *= scale
        for name in self._names:
            weight = np.array(parameters[name].data, dtype=np.float32, copy=True)
            gradient = gradients[name]
            if self._weight_decay:
                gradient = gradient + np.float32(self._weight_decay) * weight
            if self._momentum:
                velocity = self._velocity.get(name)
                velocity = gradient.copy() if velocity is None else np.float32(self._momentum) * velocity + gradient
                self._velocity[name] = velocity
                gradient = velocity
            weight -= np.float32(self._learning_rate) * gradient
            parameters[name].data = weight

    def save(self, path: str | os.PathLike) -> None:
        """Write the velocity buffers (one array per parameter) to ``path`` (.npz)."""
        with open(path, "wb") as handle:
            np.savez(handle, **{f"velocity/{name}": value for name, value in self._velocity.items()})

    def load(self, path: str | os.PathLike) -> None:
        """Read velocity buffers written by :meth:`save`; a missing file means zero velocity."""
        if not os.path.exists(path):
            logger.warning("no host SGD state at %s; momentum restarts from zero", path)
            self._velocity = {}
            return
        with np.load(path) as archive:
            self._velocity = {key.split("/", 1)[1]: archive[key].astype(np.float32) for key in archive.files}
