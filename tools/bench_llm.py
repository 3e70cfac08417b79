"""Weight-only 4-bit quantization of a decoder LM: FP32 vs qgraph RTN / GPTQ / AWQ vs onnxruntime's quantizer.

    python tools/bench_llm.py [--model DECODER.onnx --eval EVAL.npz --calib CALIB.npz] [--blocks 32,128]

Without ``--model`` a decoder is built by :mod:`qgraph.models.decoder` (``--hidden``, ``--layers``, ``--vocab``)
with structured random weights; its evaluation and calibration tokens are then sampled from the FP32 model itself
(temperature 1, through the KV cache), so the *perplexity proxy* ``exp(mean −log p(token))`` of a quantized
model on the FP32 model's own samples measures how far its next-token distribution drifts from FP32's. With a
trained decoder (``--model``, ``--eval`` of ``input_ids`` rows from held-out text) it is the perplexity.

For each variant (qgraph ``rtn``, ``gptq``, ``awq``; onnxruntime's ``MatMulNBitsQuantizer`` with its RTN and GPTQ
configurations, ``ort-rtn`` and ``ort-gptq``, on the same calibration prompts, and its default ``ort-default``;
at each block size, asymmetric 4 bits, MatMulNBits) the table gives: perplexity, file size relative to FP32,
prefill latency (batch 1, ``--prefill`` tokens), decode tokens/s (batch 1, KV cache, ``--decode`` steps after a
32-token prompt), and the peak RSS of the quantization (each quantization runs in a fresh subprocess). Timings run
all models alternately in one process, single-threaded, and report medians of ``--repeats``. The ``ort-*``
quantizations run in the latest-runtime interpreter (``--ort-python``, default the newest
``~/.cache/qgraph/latest-runtime/*/bin/python``): the training build's onnxruntime lacks the quantizer's native
binding, and onnxruntime ≥ 1.2x ships the RTN/GPTQ code of Intel Neural Compressor inside
``onnxruntime.quantization.neural_compressor``, so no ``neural_compressor`` package is needed (its GPTQ imports
torch only to convert non-numpy feeds; without torch installed an empty stand-in module satisfies the import).

``--memory MODEL.onnx`` measures only the peak RSS of quantizing ``MODEL`` (say the 2 GB decoder of
``tools/make_large_decoder.py``, streamed from its external data) with qgraph RTN and GPTQ, each in a fresh
subprocess, on ``--calib-rows`` random prompts of ``--length`` tokens::

    python tools/bench_llm.py --memory /tmp/big_decoder/model.onnx --calib-rows 32 --length 64
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import onnx

logger = logging.getLogger("bench_llm")


def _session(path, optimize=True):
    from qgraph import runtime

    return runtime.create_session(Path(path), optimize=optimize, threads=1)


def _past_names(session):
    return [value.name for value in session.get_inputs() if value.name.startswith("past_key_values.")]


def _past_shape(session):
    value = next(value for value in session.get_inputs() if value.name.startswith("past_key_values."))
    return value.shape[1], value.shape[3]


def _step(session, ids, past, start):
    """One call on ``ids [1, S]`` after ``start`` cached tokens; returns logits and the new past."""
    sequence = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], start + sequence), np.int64),
             "position_ids": np.broadcast_to(np.arange(start, start + sequence), ids.shape).astype(np.int64)}
    feeds.update(past)
    outputs = session.run(None, feeds)
    names = [output.name for output in session.get_outputs()]
    new_past = {name.replace("present.", "past_key_values."): array
                for name, array in zip(names, outputs) if name.startswith("present.")}
    return outputs[names.index("logits")], new_past


def _empty_past(session, batch):
    heads, head_dim = _past_shape(session)
    return {name: np.zeros((batch, heads, 0, head_dim), np.float32) for name in _past_names(session)}


def sample_tokens(model_path, rows, length, seed, vocab):
    """``rows`` sequences of ``length`` tokens sampled from the model (temperature 1, KV cache)."""
    session = _session(model_path)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, 1)).astype(np.int64)
    tokens = [ids]
    logits, past = _step(session, ids, _empty_past(session, rows), 0)
    for position in range(1, length):
        last = logits[:, -1].astype(np.float64)
        probabilities = np.exp(last - last.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        ids = np.array([[rng.choice(vocab, p=row)] for row in probabilities], np.int64)
        tokens.append(ids)
        logits, past = _step(session, ids, past, position)
    return np.concatenate(tokens, axis=1)


def perplexity(model_path, tokens, batch=8):
    session = _session(model_path)
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch):
        ids = tokens[start:start + batch]
        logits, _ = _step(session, ids, _empty_past(session, len(ids)), 0)
        logits = logits[:, :-1].astype(np.float64)
        targets = ids[:, 1:]
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        total += float((log_z - picked).sum())
        count += targets.size
    return float(np.exp(total / count))


def timings(paths, prefill, decode, repeats, vocab):
    sessions = {name: _session(path) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, (1, prefill)).astype(np.int64)
    short = prompt[:, :32]
    results = {name: {"prefill": [], "decode": []} for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            started = time.perf_counter()
            _step(session, prompt, _empty_past(session, 1), 0)
            results[name]["prefill"].append(time.perf_counter() - started)
            logits, past = _step(session, short, _empty_past(session, 1), 0)
            started = time.perf_counter()
            for position in range(32, 32 + decode):
                ids = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
                logits, past = _step(session, ids, past, position)
            results[name]["decode"].append(decode / (time.perf_counter() - started))
    return {name: (statistics.median(value["prefill"]) * 1e3, statistics.median(value["decode"]))
            for name, value in results.items()}


def _prefill_feeds(model, input_ids):
    """Prefill feeds of a decoder-with-past ``model`` (a proto) for ``input_ids``: ones as the mask, positions
    0..S-1, empty pasts (their head count and size read from the declared input shapes)."""
    batch, sequence = input_ids.shape
    feeds = {}
    for value in model.graph.input:
        name = value.name
        if name == "input_ids":
            feeds[name] = input_ids.astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, sequence), np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(sequence), (batch, sequence)).astype(np.int64)
        elif name.startswith("past_key_values."):
            dims = [dim.dim_value for dim in value.type.tensor_type.shape.dim]
            feeds[name] = np.zeros((batch, dims[1], 0, dims[3]), np.float32)
    return feeds


def _ort_quantize(variant, block, source, output, calib_path, accuracy_level):
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger().setLevel(logging.WARNING)
    model = onnx.load(source)
    if variant == "ort-default":
        quantizer = nbits.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False,
                                               accuracy_level=accuracy_level or None)
    else:
        if variant == "ort-rtn":
            config = nbits.RTNWeightOnlyQuantConfig()
        else:
            ids = dict(np.load(calib_path))["input_ids"]

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter([_prefill_feeds(model, ids[i:i + 8]) for i in range(0, len(ids), 8)])

                def get_next(self):
                    return next(self.batches, None)

            if importlib.util.find_spec("torch") is None:
                # onnxruntime's vendored to_numpy imports torch before it checks for an ndarray, which these
                # feeds are: an empty module stands in, so GPTQ runs on numpy without a torch install
                sys.modules["torch"] = types.ModuleType("torch")
            config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())
        quantizer = nbits.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False, algo_config=config,
                                               accuracy_level=accuracy_level or None)
    quantizer.process()
    quantizer.model.save_model_to_file(output, use_external_data_format=False)


def _last_json(stdout):
    """The JSON object a --quantize-only child printed last (onnxruntime's progress bar ends without a newline)."""
    last = stdout.strip().splitlines()[-1]
    return json.loads(last[last.rindex("{"):])


def latest_runtime_python():
    found = sorted(glob.glob(os.path.expanduser("~/.cache/qgraph/latest-runtime/*/bin/python")))
    return found[-1] if found else None


def quantize_variant(variant, block, source, output, calib_path, accuracy_level=0):
    """Run one quantization in this process (called in a fresh subprocess); prints peak RSS and seconds."""
    started = time.perf_counter()
    if variant in ("ort-rtn", "ort-gptq"):
        _ort_quantize(variant, block, source, output, calib_path, accuracy_level)
    elif variant == "ort-default":
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer

        logging.getLogger().setLevel(logging.WARNING)
        quantizer = MatMul4BitsQuantizer(onnx.load(source), block_size=block, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(output, use_external_data_format=False)
    else:
        from qgraph.pipeline import OptimizeOptions, optimize
        from qgraph.weight_only.options import WeightOnlyOptions

        options = WeightOnlyOptions(algorithm=variant, block_size=block, samples=None, batch_size=8,
                                    accuracy_level=accuracy_level)
        calibration = dict(np.load(calib_path)) if options.needs_calibration else None
        batches = None
        if calibration is not None:
            ids = calibration["input_ids"]
            batches = [{"input_ids": ids[i:i + 8]} for i in range(0, len(ids), 8)]
        optimize(source, output, OptimizeOptions(weight_only=options), calibration_data=batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a decoder-with-past .onnx (default: build one)")
    parser.add_argument("--eval", type=Path, help=".npz with input_ids rows to measure perplexity on")
    parser.add_argument("--calib", type=Path, help=".npz with input_ids calibration prompts")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--variants", default="rtn,gptq,awq,ort-rtn,ort-gptq")
    parser.add_argument("--accuracy-level", type=int, default=0,
                        help="MatMulNBits accuracy_level of every variant (4: int8 compute of the activations)")
    parser.add_argument("--ort-python", default=latest_runtime_python(),
                        help="interpreter with onnxruntime's quantizer for the ort-* variants")
    parser.add_argument("--memory", type=Path, metavar="MODEL",
                        help="only measure the peak RSS of qgraph RTN and GPTQ on MODEL (see the docstring)")
    parser.add_argument("--calib-rows", type=int, default=32)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temporary one)")
    parser.add_argument("--quantize-only", nargs=5, metavar=("VARIANT", "BLOCK", "SOURCE", "OUTPUT", "CALIB"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize_only:
        variant, block, source, output, calib = args.quantize_only
        quantize_variant(variant, int(block), source, output, calib, args.accuracy_level)
        return
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_llm_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.memory:
        memory_only(args, work)
        return

    from qgraph.pipeline import optimize

    if args.model is None:
        from qgraph.models.decoder import DecoderConfig, build_decoder, random_weights

        config = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=max(1, args.hidden // 64),
                               intermediate_size=int(args.hidden * 2.75) // 16 * 16,
                               max_positions=max(args.prefill, args.length) + args.decode + 32)
        source = work / "decoder.fp32.onnx"
        onnx.save(build_decoder(config, random_weights(config, seed=0)), source)
        vocab = config.vocab_size
        print(f"decoder: {config}")
    else:
        source, vocab = args.model, None
    fp32 = work / "fp32.onnx"  # canonical FP32 (the tied head's Transpose folded), the quantizers' common input
    optimize(source, fp32)
    if vocab is None:
        vocab = next(output for output in _session(fp32).get_outputs() if output.name == "logits").shape[-1]
    evaluation = (dict(np.load(args.eval))["input_ids"] if args.eval else
                  sample_tokens(fp32, args.eval_rows, args.length, 1, vocab))
    calib = work / "calib.npz"
    if args.calib:
        calib = args.calib
    else:
        np.savez(calib, input_ids=sample_tokens(fp32, args.calib_rows, args.length, 2, vocab))
    paths = {"fp32": fp32}
    memory = {}
    for block in (int(size) for size in args.blocks.split(",")):
        for variant in args.variants.split(","):
            name = f"{variant}/b{block}"
            output = work / f"{variant}_b{block}.onnx"
            python = sys.executable
            if variant in ("ort-rtn", "ort-gptq"):
                if args.ort_python is None:
                    print(f"{name}: not run, no latest-runtime interpreter (--ort-python)")
                    continue
                python = args.ort_python
            done = subprocess.run([python, __file__, "--accuracy-level", str(args.accuracy_level), "--quantize-only",
                                   variant, str(block), str(fp32), str(output), str(calib)],
                                  capture_output=True, text=True)
            if done.returncode:
                reason = done.stderr.strip().splitlines()[-1]
                if "quantize_matmul_4bits" in reason:
                    reason = ("not available: this onnxruntime build (onnxruntime-training) lacks the "
                              "quantize_matmul_4bits binding its default RTN calls")
                print(f"{name}: {reason}")
                continue
            memory[name] = _last_json(done.stdout)
            paths[name] = output
    speed = timings(paths, args.prefill, args.decode, args.repeats, vocab)
    base_size = os.path.getsize(paths["fp32"])
    print(f"\n{'model':<18}{'ppl':>10}{'size':>8}{'prefill ms':>12}{'decode tok/s':>14}"
          f"{'quant s':>9}{'peak RSS MB':>13}")
    for name, path in paths.items():
        ppl = perplexity(path, evaluation)
        prefill, decode = speed[name]
        info = memory.get(name, {})
        print(f"{name:<18}{ppl:>10.3f}{os.path.getsize(path) / base_size:>8.3f}{prefill:>12.2f}{decode:>14.1f}"
              f"{info.get('seconds', float('nan')):>9.1f}{info.get('peak_rss_mb', float('nan')):>13.0f}")
    print(f"\nFP32 file {base_size / 1e6:.1f} MB; models in {work}")


def memory_only(args, work):
    """Peak RSS of qgraph RTN and GPTQ on ``args.memory``, each in a fresh subprocess."""
    vocab = next(int(dim.dim_value) for output in onnx.load(args.memory, load_external_data=False).graph.output
                 if output.name == "logits" for dim in output.type.tensor_type.shape.dim[-1:])
    calib = work / "calib.npz"
    ids = np.random.default_rng(2).integers(0, vocab, (args.calib_rows, args.length))
    np.savez(calib, input_ids=ids)
    print(f"{args.memory}: {args.calib_rows} calibration prompts of {args.length} tokens, blocks of "
          f"{args.blocks.split(',')[-1]}")
    for variant in ("rtn", "gptq"):
        output = work / f"{variant}" / "model.onnx"
        output.parent.mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, __file__, "--quantize-only", variant, args.blocks.split(",")[-1],
                               str(args.memory), str(output), str(calib)], capture_output=True, text=True)
        if done.returncode:
            print(f"{variant}: failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        info = _last_json(done.stdout)
        print(f"{variant}: peak RSS {info['peak_rss_mb']:.0f} MB ({info['peak_rss_mb'] / 1024:.2f} GiB), "
              f"{info['seconds']:.0f} s")


if __name__ == "__main__":
    main()
