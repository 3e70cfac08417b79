"""Build a Llama-style decoder with over 2 GB of float32 weights in external data, one tensor at a time.

The graph is :func:`qgraph.models.decoder.build_decoder`'s (KV cache, RMSNorm, rotary positions, gated MLP, an
untied LM head) at opset 21, so weight-only quantization needs no opset conversion. ``build_decoder`` is given
placeholders (objects with the right ``shape`` whose array is a single zero), so the graph is built with 4-byte
initializers; each of them is then pointed at the external data file, into which its random weights are generated
and written one tensor at a time (``N(0, 1/fan_in)`` projections, ``N(0, 1/16)`` embeddings, unit norm gains with
a little noise). At most one weight (the 262 MB embedding at the defaults) is in memory at once; the ``.onnx``
file holds only references (a few hundred kB, the rotary tables inline).

The number of layers is chosen to reach ``--size-gb`` (decimal GB) of weights: at the defaults (hidden 2048,
intermediate 4096, vocab 32000) a layer holds 168 MB and the two vocabulary tables 524 MB, so 2.3 GB takes 11
layers (2.37 GB, 2.21 GiB: over protobuf's 2 GiB limit).

Usage::

    python tools/make_large_decoder.py --out /tmp/large-decoder [--size-gb 2.3] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from qgraph.models.decoder import DecoderConfig, build_decoder, weight_shapes

DATA_NAME = "model.onnx.data"


class _Placeholder:
    """Stands in for a weight while the graph is built: the right shape, a one-element array."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __array__(self, dtype=None, copy=None):
        return np.zeros(1, dtype or np.float32)


def layer_bytes(config: DecoderConfig) -> int:
    hidden, inner = config.hidden_size, config.intermediate_size
    return 4 * (4 * hidden * hidden + 3 * hidden * inner + 2 * hidden)


def config_for_size(size_gb: float, *, hidden: int, intermediate: int, vocab: int, heads: int) -> DecoderConfig:
    base = DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_heads=heads,
                         num_layers=1, max_positions=2048, tie_embeddings=False, opset=21)
    fixed = 4 * (2 * vocab * hidden + hidden)
    layers = max(1, math.ceil((size_gb * 1e9 - fixed) / layer_bytes(base)))
    return DecoderConfig(**{**base.__dict__, "num_layers": layers})


def _random_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    scale = 0.25 if "embed" in name else 1.0 / math.sqrt(shape[0])
    array = rng.standard_normal(shape, dtype=np.float32)
    array *= np.float32(scale)
    return array


def build(folder: Path, config: DecoderConfig, *, seed: int = 0) -> Path:
    """Write ``model.onnx`` and ``model.onnx.data`` into ``folder``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = weight_shapes(config)
    proto = build_decoder(config, {name: _Placeholder(shape) for name, shape in shapes.items()})
    rng = np.random.default_rng(seed)
    with open(folder / DATA_NAME, "wb") as data_file:
        for tensor in proto.graph.initializer:
            if tensor.name not in shapes:
                continue
            shape = shapes[tensor.name]
            array = _random_weight(tensor.name, shape, rng)
            offset = data_file.tell()
            array.tofile(data_file)
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            del tensor.dims[:]
            tensor.dims.extend(shape)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            del array
    path = folder / "model.onnx"
    onnx.save(proto, os.fspath(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model.onnx and model.onnx.data")
    parser.add_argument("--size-gb", type=float, default=2.3, help="float32 weights to reach, decimal GB")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    config = config_for_size(arguments.size_gb, hidden=arguments.hidden, intermediate=arguments.intermediate,
                             vocab=arguments.vocab, heads=arguments.heads)
    started = time.perf_counter()
    path = build(arguments.out, config, seed=arguments.seed)
    data = (arguments.out / DATA_NAME).stat().st_size
    print(f"{path}: {config.num_layers} layers, hidden {config.hidden_size}, intermediate "
          f"{config.intermediate_size}, vocab {config.vocab_size}; {path.stat().st_size} bytes of graph, "
          f"{data / 1e9:.2f} GB ({data / 2**30:.2f} GiB) of weights in {DATA_NAME}; "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
