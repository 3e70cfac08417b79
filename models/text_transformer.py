"""Graph writing, initialisation, training and the model cache shared by the text encoder and the text decoder.

:class:`TransformerGraphWriter` writes transformer graphs from a dictionary of numpy weights in two forms:

- ``"inference"``, the file a user gets, in the layout ``torch.onnx.export`` writes for a Hugging Face model with
  dynamic batch and sequence axes: ``nn.Linear`` on 3-D activations is ``MatMul(x, onnx::MatMul_N)`` followed by
  ``Add(bias, ·)`` (the transposed weight is a constant-folded initializer named ``onnx::MatMul_N``, the bias keeps
  its module name and comes first in the ``Add``, as torch's ``linear`` symbolic writes it); head splits are
  ``Reshape`` to a shape assembled from ``Shape → Gather → Unsqueeze → Concat`` then ``Transpose``; node names and
  output names follow torch's ``/scope/Op`` and ``/scope/Op_output_0``. A weight used twice (tied embeddings) is
  stored twice, the second time transposed, as constant folding leaves it;
- ``"training"``, for :mod:`qgraph.train`: the same nodes on initializers named after the parameters (so trained
  values can be read back by name), tied weights shared through a ``Transpose`` node (so both uses train one
  tensor), and a head that reads only the positions listed in an extra first graph input (flat indices into
  ``batch × sequence``). The loss of :mod:`qgraph.train` is ``SoftmaxCrossEntropyLoss`` over 2-D logits with one
  label per row, and the batch checker compares the label count with the first input's first axis: with the
  positions first, ``M`` selected tokens give ``M × vocabulary`` logits and ``M`` labels, the mean token loss.

Float constants are rank-0 initializers (so :mod:`qgraph.train` never trains them); integer constants (shapes, axes,
indices) are 1-D or scalar int64 initializers.

Both models' configs derive from :class:`TransformerConfig` (the sizes, checked once).

Initialisation (BERT's and GPT-2's, :func:`initial_transformer_weights`): embeddings and dense weights
``N(0, 0.02²)``, biases 0, LayerNorm scale 1 and bias 0; the decoder and the pre-norm encoder scale the residual
output projections by ``1 / sqrt(2 · layers)`` (GPT-2).

Training (:func:`train_text_model`, cached by :func:`cached_text_model`): a :class:`TextTrainingRecipe` is trained
once with :class:`qgraph.train.Trainer` (AdamW, linear warm-up then cosine decay, gradient clipping, validation
after every epoch, best checkpoint kept) on the batches the model's ``epoch_batches(epoch)`` gives; the trained
parameters are read from the best checkpoint and written into the inference form. The
result is cached in ``<cache>/text_models/<name>-<key>/`` where ``key`` is the first 16 hex digits of the sha256 of
the recipe (every field, architecture included), the corpus fingerprint (:func:`qgraph.models.text_corpus.
corpus_fingerprint`: interpreter version, documents, splits, vocabulary) and :data:`CACHE_FORMAT`; ``<cache>`` is
``$QGRAPH_CACHE_DIR``, else ``$XDG_CACHE_HOME/qgraph``, else ``~/.cache/qgraph``. A cache entry holds ``model.onnx``
and ``result.json`` (training time, steps, metrics) and is written to a temporary folder renamed into place, so a
reader never sees half an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import QGraphError
from qgraph.models import text_corpus
from qgraph.models.common import IR_VERSION, OPSET_VERSION

logger = logging.getLogger(__name__)

FORMS = ("training", "inference")
#: Changes whenever the graphs or the training code change what a cached model contains.
CACHE_FORMAT = 2  # 2: the encoder selects its masked rows after the head LayerNormalization
CACHE_ENVIRONMENT_VARIABLE = "QGRAPH_CACHE_DIR"
#: What Hugging Face fills masked attention scores with: ``torch.finfo(torch.float32).min``.
MASK_FILL_VALUE = float(np.finfo(np.float32).min)
POSITIONS_INPUT = "target_positions"


def normal_weight(generator: np.random.Generator, shape: Sequence[int], std: float = 0.02) -> np.ndarray:
    return (generator.standard_normal(tuple(shape)) * std).astype(np.float32)


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes shared by the encoder's and the decoder's config (each model subclass sets its own defaults)."""

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_positions: int = 128
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        sizes = [getattr(self, field.name) for field in dataclasses.fields(self)]
        if min(size for size in sizes if isinstance(size, int) and not isinstance(size, bool)) < 1:
            raise ValueError(f"invalid {type(self).__name__}: every size must be >= 1, got {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def initial_transformer_weights(shapes: Mapping[str, tuple[int, ...]], *, seed: int, num_layers: int,
                    residual_projections: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The initialisation of the module docstring, drawn in the order of ``shapes``: 1-D ``*.weight`` (LayerNorm
    scales) 1, ``*.bias`` 0, weights whose name ends with one of ``residual_projections`` ``N(0, (0.02 /
    sqrt(2 · num_layers))²)``, every other weight ``N(0, 0.02²)``."""
    generator = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * num_layers)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 1:
            weights[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            weights[name] = np.zeros(shape, np.float32)
        elif residual_projections and name.endswith(residual_projections):
            weights[name] = normal_weight(generator, shape, residual_std)
        else:
            weights[name] = normal_weight(generator, shape)
    return weights


class TransformerGraphWriter:
    """Collects nodes and initializers for one graph in the ``"training"`` or ``"inference"`` form."""

    def __init__(self, form: str, weights: Mapping[str, np.ndarray]) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._node_names: dict[str, int] = {}
        self._constants: dict[tuple, str] = {}
        self._folded_weights = 0
        self.used_weights: set[str] = set()

    @property
    def training(self) -> bool:
        return self.form == "training"

    # -- initializers -------------------------------------------------------------------------------------------
    def _weight(self, name: str) -> np.ndarray:
        if name not in self.weights:
            raise KeyError(f"no weight {name!r} among the {len(self.weights)} given")
        self.used_weights.add(name)
        return np.asarray(self.weights[name], dtype=np.float32)

    def _add_initializer(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.array(array, order="C"), name)
        return name

    def parameter(self, name: str) -> str:
        """A parameter stored under its own name (embeddings, biases, LayerNorm) in both forms."""
        return self._add_initializer(name, self._weight(name))

    def matmul_weight(self, name: str) -> str:
        """The ``(in, out)`` matrix of a dense layer: the parameter itself for training, ``onnx::MatMul_N`` (a folded
        constant, as torch.onnx names it) for inference."""
        if self.training:
            return self.parameter(name)
        self._folded_weights += 1
        return self._add_initializer(f"onnx::MatMul_{self._folded_weights}", self._weight(name))

    def transposed_weight(self, name: str, scope: str) -> str:
        """``Wᵀ`` of a tied matrix: a ``Transpose`` of the shared parameter for training, a folded transposed copy for
        inference."""
        if self.training:
            return self.node("Transpose", [self.parameter(name)], scope, perm=[1, 0])
        self._folded_weights += 1
        return self._add_initializer(f"onnx::MatMul_{self._folded_weights}", self._weight(name).T)

    def constant(self, value: float | int | Sequence[int] | np.ndarray, dtype: type = np.float32) -> str:
        """A shared constant initializer (float constants must be scalars: see the module docstring)."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype == np.float32 and array.ndim:
            raise ValueError("float constants are scalars (rank-0), so that training never learns them")
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self._add_initializer(f"onnx::Constant_{len(self._constants)}", array)
        return self._constants[key]

    # -- nodes --------------------------------------------------------------------------------------------------
    def node(self, op_type: str, inputs: Sequence[str], scope: str, *, output: str | None = None,
             domain: str = "", **attributes: Any) -> str:
        """Append ``/scope/Op`` (``_1``, ``_2`` … when repeated) writing ``/scope/Op_output_0`` or ``output``."""
        base = f"{scope}/{op_type}"
        count = self._node_names.get(base, 0)
        self._node_names[base] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        output_name = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output_name], name=name, domain=domain or None,
                                           **attributes))
        return output_name

    def dimension(self, tensor: str, axis: int, scope: str) -> str:
        """``Gather(Shape(tensor), axis)``: one dimension as an int64 scalar, as torch's ``x.size(axis)``."""
        shape = self.node("Shape", [tensor], scope)
        return self.node("Gather", [shape, self.constant(axis, np.int64)], scope, axis=0)

    def unsqueeze(self, tensor: str, axes: Sequence[int], scope: str) -> str:
        return self.node("Unsqueeze", [tensor, self.constant(list(axes), np.int64)], scope)

    def dynamic_shape(self, parts: Sequence[str | int], scope: str) -> str:
        """``Concat`` of int64 scalars (dimension names from :meth:`dimension`) and literal sizes, as torch writes
        ``x.view(a, b, heads, d)``."""
        pieces = [self.unsqueeze(part, [0], scope) if isinstance(part, str) else self.constant([part], np.int64)
                  for part in parts]
        return self.node("Concat", pieces, scope, axis=0)

    # -- layers -------------------------------------------------------------------------------------------------
    def linear(self, x: str, prefix: str, scope: str, *, bias: bool = True) -> str:
        """``Add(bias, MatMul(x, W))`` with ``W = weights[prefix.weight]`` of shape ``(in, out)``."""
        y = self.node("MatMul", [x, self.matmul_weight(f"{prefix}.weight")], scope)
        return self.node("Add", [self.parameter(f"{prefix}.bias"), y], scope) if bias else y

    def layer_norm(self, x: str, prefix: str, scope: str, epsilon: float, *, output: str | None = None) -> str:
        inputs = [x, self.parameter(f"{prefix}.weight"), self.parameter(f"{prefix}.bias")]
        return self.node("LayerNormalization", inputs, scope, output=output, axis=-1, epsilon=epsilon)

    def gelu_erf(self, x: str, scope: str) -> str:
        """Exact GELU as torch exports ``F.gelu``: ``x · (1 + Erf(x / √2)) · 0.5``."""
        scaled = self.node("Div", [x, self.constant(math.sqrt(2.0))], scope)
        shifted = self.node("Add", [self.node("Erf", [scaled], scope), self.constant(1.0)], scope)
        return self.node("Mul", [self.node("Mul", [x, shifted], scope), self.constant(0.5)], scope)

    def gelu_tanh(self, x: str, scope: str) -> str:
        """GPT-2's ``NewGELUActivation``: ``0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``."""
        half = self.node("Mul", [self.constant(0.5), x], scope)
        cube = self.node("Pow", [x, self.constant(3.0)], scope)
        inner = self.node("Add", [x, self.node("Mul", [self.constant(0.044715), cube], scope)], scope)
        scaled = self.node("Mul", [self.constant(math.sqrt(2.0 / math.pi)), inner], scope)
        shifted = self.node("Add", [self.constant(1.0), self.node("Tanh", [scaled], scope)], scope)
        return self.node("Mul", [half, shifted], scope)

    def split_heads(self, x: str, heads: int, head_dim: int, scope: str) -> str:
        """``batch × seq × (heads·d)`` → ``batch × heads × seq × d`` (``view`` then ``permute(0, 2, 1, 3)``)."""
        shape = self.dynamic_shape([self.dimension(x, 0, scope), self.dimension(x, 1, scope), heads, head_dim],
                                   scope)
        return self.node("Transpose", [self.node("Reshape", [x, shape], scope)], scope, perm=[0, 2, 1, 3])

    def merge_heads(self, context: str, hidden: int, scope: str) -> str:
        """``batch × heads × seq × d`` → ``batch × seq × hidden``."""
        transposed = self.node("Transpose", [context], scope, perm=[0, 2, 1, 3])
        shape = self.dynamic_shape([self.dimension(transposed, 0, scope), self.dimension(transposed, 1, scope),
                                    hidden], scope)
        return self.node("Reshape", [transposed, shape], scope)

    def attention_scores(self, query: str, key_transposed: str, additive_mask: str, head_dim: int, scope: str
                         ) -> str:
        """``Softmax(q·kᵀ / √d + mask)``."""
        scores = self.node("MatMul", [query, key_transposed], scope)
        scores = self.node("Div", [scores, self.constant(math.sqrt(head_dim))], scope)
        scores = self.node("Add", [scores, additive_mask], scope)
        return self.node("Softmax", [scores], scope, axis=-1)

    def select_positions(self, hidden_states: str, positions: str, hidden: int, scope: str) -> str:
        """Training head input: rows ``positions`` of ``hidden_states`` flattened to ``(batch·seq) × hidden``."""
        flat = self.node("Reshape", [hidden_states, self.constant([-1, hidden], np.int64)], scope)
        return self.node("Gather", [flat, positions], scope, axis=0)

    # -- wrapping -----------------------------------------------------------------------------------------------
    def build_model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
                    graph_name: str, doc_string: str) -> onnx.ModelProto:
        unused = sorted(set(self.weights) - self.used_weights)
        if unused:
            raise ValueError(f"weights not used by the graph: {', '.join(unused[:5])}")
        graph = helper.make_graph(self.nodes, graph_name, list(inputs), list(outputs),
                                  initializer=list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_VERSION)],
                                  producer_name="qgraph.models", doc_string=doc_string)
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def tensor_input(name: str, element_type: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, element_type, list(shape))


def positions_input() -> onnx.ValueInfoProto:
    return tensor_input(POSITIONS_INPUT, TensorProto.INT64, ["selected_tokens"])


# ------------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TextTrainingRecipe:
    """One training run of a text model; ``architecture`` is the model's frozen config dataclass."""

    name: str
    architecture: Any
    sequence_length: int
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    minimum_learning_rate_ratio: float = 0.05
    max_grad_norm: float | None = 1.0
    seed: int = 0
    #: Train on the first ``train_limit`` sequences only (tests); ``None``: all.
    train_limit: int | None = None
    validation_limit: int | None = None
    #: The encoder's masking rate (unused by the decoder).
    mask_rate: float = 0.15

    def cache_key(self, corpus_fingerprint: str) -> str:
        description = json.dumps({"recipe": _jsonable(self), "corpus": corpus_fingerprint, "format": CACHE_FORMAT},
                                 sort_keys=True)
        return hashlib.sha256(description.encode("utf-8")).hexdigest()[:16]


def corpus_config(config_type: type, **sizes: Any) -> Any:
    """``config_type(vocab_size=<the corpus vocabulary's size>, **sizes)``."""
    return config_type(vocab_size=text_corpus.corpus_vocabulary().size, **sizes)


def tiny_recipe(name: str, config_type: type, *, epochs: int, train_limit: int, validation_limit: int,
                batch_size: int) -> TextTrainingRecipe:
    """A seconds-long recipe for tests: 1 layer, hidden 32, 2 heads, FFN 64, sequence 32, learning rate 3·10⁻³."""
    config = corpus_config(config_type, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_positions=32)
    return TextTrainingRecipe(name=name, architecture=config, sequence_length=32, epochs=epochs,
                              batch_size=batch_size, learning_rate=3e-3, train_limit=train_limit,
                              validation_limit=validation_limit)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding cached text models (module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENVIRONMENT_VARIABLE):
        return Path(os.environ[CACHE_ENVIRONMENT_VARIABLE]) / "text_models"
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "qgraph" / "text_models"


@dataclass(frozen=True)
class CachedModel:
    """A trained model in the cache: the inference file and what its training measured (``result.json``)."""

    path: Path
    result: dict[str, Any]
    trained_now: bool


def train_cached(
    recipe: TextTrainingRecipe,
    corpus_fingerprint: str,
    train: Callable[[Path], dict[str, Any]],
    *,
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    train_if_missing: bool = True,
) -> CachedModel:
    """The cached model of ``recipe``, training it with ``train(entry_directory)`` first when it is missing.

    ``train`` writes ``model.onnx`` into the folder it is given and returns what goes into ``result.json``.
    """
    key = recipe.cache_key(corpus_fingerprint)
    root = cache_root(cache_dir)
    entry = root / f"{recipe.name}-{key}"
    if not retrain and (entry / "model.onnx").is_file() and (entry / "result.json").is_file():
        logger.info("using the cached %s at %s", recipe.name, entry)
        return CachedModel(entry / "model.onnx", json.loads((entry / "result.json").read_text()), False)
    if not train_if_missing:
        raise FileNotFoundError(f"no cached {recipe.name} for this recipe at {entry}; train it first "
                                "(python tools/train_text_models.py)")
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-{key}-", dir=root))
    try:
        started = time.perf_counter()
        result = dict(train(scratch))
        result.setdefault("seconds", time.perf_counter() - started)
        result["recipe"] = _jsonable(recipe)
        result["cache_key"] = key
        (scratch / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(scratch, entry)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    logger.info("trained %s in %.0f s, cached at %s", recipe.name, result["seconds"], entry)
    return CachedModel(entry / "model.onnx", result, True)


def training_config(recipe: TextTrainingRecipe, steps_per_epoch: int, threads: int | None):
    """The :class:`qgraph.train.TrainingConfig` of ``recipe`` (AdamW, warm-up + cosine, clipping)."""
    from qgraph.train import CosineSchedule, TrainingConfig

    total = steps_per_epoch * recipe.epochs
    return TrainingConfig(
        epochs=recipe.epochs, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate, optimizer="adamw",
        schedule=CosineSchedule(warmup_steps=max(1, int(round(recipe.warmup_fraction * total))),
                                minimum_ratio=recipe.minimum_learning_rate_ratio),
        weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm, loss="cross_entropy",
        output_name="logits", seed=recipe.seed, shuffle=False, threads=threads, steps_per_epoch=steps_per_epoch,
        log_every_steps=50,
    )


def _best_parameters(model: onnx.ModelProto, recipe: TextTrainingRecipe, training_batches: Callable,
                     steps: int, validation_batches: list, parameter_names: Sequence[str], work: Path, *,
                     threads: int | None, progress: Callable | None = None
                     ) -> tuple[dict[str, np.ndarray], Any]:
    """Train a training-form ``model`` on ``training_batches`` (a callable giving one epoch of ``steps`` batches);
    return the best checkpoint's parameters and the :class:`TrainingResult`.

    The training runs in a forked child process (:func:`_fit_in_child`) that hands back its result through a file:
    onnxruntime-training 1.19.2 corrupts its heap on the encoder's training graph (``double free or corruption``
    or a segmentation fault when the training module is torn down after the last epoch, reproduced from a 1-layer,
    hidden-64 encoder after about 500 steps, with fixed or varying batch shapes), which used to kill the whole
    run with it; the checkpoints on disk are complete by then, so the parent reads the best one and goes on."""
    from qgraph.train import training_api

    config = training_config(recipe, steps, threads)
    logger.info("training %s: %d epochs of %d steps, batch %d, %s", recipe.name, recipe.epochs, steps,
                recipe.batch_size, config.schedule)
    handed_back = work / "training-result.pickle"
    handed_back.unlink(missing_ok=True)
    process = multiprocessing.get_context("fork").Process(
        target=_fit_in_child, args=(model, config, work, training_batches, validation_batches, progress,
                                    handed_back))
    process.start()
    process.join()
    if not handed_back.exists():
        raise QGraphError(f"training {recipe.name} died with exit status {process.exitcode} before it finished "
                          f"(see its output above); its checkpoints are in {work / 'training'}")
    with open(handed_back, "rb") as file:
        outcome = pickle.load(file)
    if isinstance(outcome, BaseException):
        raise outcome
    if process.exitcode != 0:
        logger.warning("the training process of %s ended with exit status %s after handing back its result "
                       "(onnxruntime-training's heap corruption at teardown); its best checkpoint is complete and "
                       "used", recipe.name, process.exitcode)
    state = training_api().api.CheckpointState.load_checkpoint(os.fspath(outcome.best_checkpoint))
    return {name: np.array(state.parameters[name].data, dtype=np.float32) for name in parameter_names}, outcome


def _fit_in_child(model: onnx.ModelProto, config: Any, work: Path, training_batches: Callable,
                  validation_batches: list, progress: Callable | None, handed_back: Path) -> None:
    """The child of :func:`_best_parameters`: train, write the :class:`TrainingResult` (or the error) to
    ``handed_back`` atomically, and leave without tearing onnxruntime's objects down."""
    from qgraph.train import Trainer

    try:
        trainer = Trainer(model, config, work / "training", progress=progress)
        outcome: Any = trainer.fit(training_batches, validation_batches).raise_for_status()
    except Exception as error:  # handed to the parent, which raises it
        traceback.print_exc()
        outcome = error
    partial = handed_back.with_suffix(".partial")
    try:
        with open(partial, "wb") as file:
            pickle.dump(outcome, file)
    except Exception:  # an error that does not pickle: the parent reports the exit status
        traceback.print_exc()
        os._exit(1)
    os.replace(partial, handed_back)
    os._exit(0)


#: ``build(weights, config, form=...)``: a model's graph builder.
GraphBuilder = Callable[..., onnx.ModelProto]
#: ``epoch_batches(epoch)``: the ``(feeds, labels)`` training batches of epoch ``epoch`` (0, 1, …).
EpochBatches = Callable[[int], Iterable[tuple[dict[str, np.ndarray], np.ndarray]]]


def train_text_model(recipe: TextTrainingRecipe, build: GraphBuilder, weights: Mapping[str, np.ndarray],
                     epoch_batches: EpochBatches, steps_per_epoch: int, validation_batches: list,
                     output_path: str | os.PathLike, *, threads: int | None = None,
                     work_directory: str | os.PathLike | None = None, progress: Callable | None = None
                     ) -> dict[str, Any]:
    """Train the training form of ``build`` from the initial ``weights``, write the inference form of the best
    checkpoint to ``output_path`` and return what every text model reports: training seconds, steps, epochs, best
    epoch, parameter count and the per-epoch history ``[epoch, train loss, validation loss, validation
    accuracy]`` (the model adds its own metric)."""
    epochs = itertools.count()

    def training_batches() -> Iterable[tuple[dict[str, np.ndarray], np.ndarray]]:
        return epoch_batches(next(epochs))

    started = time.perf_counter()
    # The training files (artifacts, checkpoints) go next to the output (the cache entry being written), private to
    # the run, rather than into a shared temporary folder that other jobs on the machine may clean.
    with tempfile.TemporaryDirectory(prefix=f".{recipe.name}-training-", dir=Path(output_path).parent) as scratch:
        work = Path(work_directory) if work_directory is not None else Path(scratch)
        training_model = build(dict(weights), recipe.architecture, form="training")
        trained, result = _best_parameters(training_model, recipe, training_batches, steps_per_epoch,
                                           validation_batches, list(weights), work, threads=threads,
                                           progress=progress)
    seconds = time.perf_counter() - started
    onnx.save(build(trained, recipe.architecture, form="inference"), os.fspath(output_path))
    return {
        "seconds": seconds, "steps": result.steps, "epochs": result.epochs_completed,
        "best_epoch": result.best_epoch, "parameters": int(sum(value.size for value in weights.values())),
        "history": [[record.epoch, record.train_loss, record.validation_loss, record.validation_accuracy]
                    for record in result.history],
    }


def cached_text_model(recipe: TextTrainingRecipe, train: Callable[..., dict[str, Any]], *,
                      cache_dir: str | os.PathLike | None = None, retrain: bool = False,
                      train_if_missing: bool = True, threads: int | None = 1, progress: Callable | None = None
                      ) -> CachedModel:
    """:func:`train_cached` over the docstring corpus with ``train(recipe, entry / "model.onnx", threads=…,
    progress=…)``, a model's training function."""
    return train_cached(recipe, text_corpus.corpus_fingerprint(),
                        lambda entry: train(recipe, entry / "model.onnx", threads=threads, progress=progress),
                        cache_dir=cache_dir, retrain=retrain, train_if_missing=train_if_missing)
