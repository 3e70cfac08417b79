"""Batch sources for QAT: labelled batches, and label-free distillation targets from the FP32 model.

Both are zero-argument callables that return a fresh iterator of ``(inputs, targets)`` pairs per epoch, the form
:class:`qgraph.train.Trainer` accepts; they shuffle with ``seed + epoch`` themselves and can cap the samples per epoch.

**Distillation loss.** With ``--distill`` the targets are the FP32 model's outputs on the same inputs, computed by an
``onnxruntime.InferenceSession`` beside the training session for every batch, and the loss is the mean squared
error between logits::

    L = mean_{batch, classes} (z_quantized − z_fp32)²

MSE on logits rather than KL on softmax: it is the high-temperature limit of Hinton's KL distillation, so it keeps
everything the softmax would throw away (the logits' offsets and the margins of confident samples, where a
temperature-1 KL gives almost no gradient), it works for any float output (regression heads, embeddings, not only
classifiers), and the training driver already has it as its ``mse`` loss — no new loss graph.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import onnx

logger = logging.getLogger(__name__)


class BatchSource:
    """``(inputs, targets)`` batches of a dataset; targets are labels, or teacher outputs when a teacher is given."""

    def __init__(self, dataset, input_names: tuple[str, ...], *, batch_size: int, shuffle: bool, seed: int,
                 limit: int | None = None, label_key: str | None = None, teacher: Teacher | None = None) -> None:
        self.dataset = dataset
        self.input_names = input_names
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.limit = limit
        self.label_key = label_key
        self.teacher = teacher
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        total = int(self.dataset.num_samples)
        return min(total, self.limit) if self.limit is not None else total

    @property
    def steps(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __call__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        seed = self.seed + self.epoch
        self.epoch += 1
        include_labels = self.teacher is None
        for batch in self.dataset.iter_batches(self.batch_size, self.limit, self.shuffle, seed,
                                               include_labels=include_labels):
            feeds = {name: batch[name] for name in self.input_names}
            if self.teacher is not None:
                yield feeds, self.teacher(feeds)
            else:
                yield feeds, batch.get(self.label_key)


class Teacher:
    """The FP32 model in an inference session: ``teacher(feeds)`` is its output ``output_name``."""

    def __init__(self, model: onnx.ModelProto, output_name: str, *, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        self.output_name = output_name

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], feeds)[0].astype(np.float32, copy=False)
