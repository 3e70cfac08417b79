"""Train (or find in the cache) the reference text models and print their metrics; optionally quantize the encoder.

The encoder (BERT-style MLM, :mod:`qgraph.models.text_encoder`) and the decoder (GPT-style LM with a KV cache,
:mod:`qgraph.models.text_decoder`) are trained with qgraph's own training driver on the standard library's
docstrings and cached (see :mod:`qgraph.models.text_transformer` for the cache folder and key). For the decoder the
tool also checks that a prefill of half of each test window with an empty past followed by one-token decode steps
gives the logits of one full forward pass.

``--quantize`` runs ``qgraph optimize ENCODER -o ENCODER.int8-static.onnx --calib CALIB.npz`` (the CLI's defaults:
static INT8 for ort-cpu) and the same with ``--activations dynamic``, with CALIB the first ``--calibration-samples``
packed training sequences, then measures each INT8 file's masked-token accuracy on the same masked test set and the
cosine similarity of its logits to FP32's (one cosine per real token, averaged, and the minimum), and the latency
of the three files at batch 1 and 8 (2 threads, timed in interleaved rounds, medians).

    python tools/train_text_models.py                        # both models: train if not cached, print metrics
    python tools/train_text_models.py --model encoder --quantize
    python tools/train_text_models.py --tiny                 # seconds-long recipes, for a smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qgraph.models import text_decoder, text_encoder
from qgraph.runtime import create_session


def check_kv_cache(model: Path, windows: np.ndarray, prompt_length: int) -> float:
    """Largest |logit difference| between a full forward pass and prefill + one-token decode steps."""
    session = create_session(model, optimize=True, threads=1)
    layout = text_decoder.cache_layout(session)
    inputs = windows[:, :-1]
    full = session.run(["logits"], text_decoder.decoder_feeds(inputs, layout=layout))[0]
    outputs = session.run(None, text_decoder.decoder_feeds(inputs[:, :prompt_length], layout=layout))
    pieces, past = [outputs[0]], text_decoder.presents_as_past(session, outputs, layout)
    for position in range(prompt_length, inputs.shape[1]):
        outputs = session.run(None, text_decoder.decoder_feeds(inputs[:, position:position + 1], layout=layout,
                                                               past=past))
        pieces.append(outputs[0])
        past = text_decoder.presents_as_past(session, outputs, layout)
    return float(np.abs(np.concatenate(pieces, axis=1) - full).max())


def median_latencies(models: list[Path], feeds: dict[str, np.ndarray], repeats: int, rounds: int = 5) -> list[float]:
    """Median latency (ms, 2 threads) of each model, the models timed in turn in ``rounds`` interleaved rounds of
    ``repeats`` runs (so a change in the load of a shared machine reaches all of them alike)."""
    sessions = [create_session(model, optimize=True, threads=2) for model in models]
    for session in sessions:
        session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, samples in zip(sessions, times):
            for _ in range(repeats):
                started = time.perf_counter()
                session.run(None, feeds)
                samples.append(time.perf_counter() - started)
    return [statistics.median(samples) * 1e3 for samples in times]


def logit_cosines(reference: Path, candidate: Path, batches: list) -> tuple[float, float]:
    """Mean and minimum cosine between the two models' logit vectors, one per real (unpadded) token."""
    sessions = [create_session(path, optimize=True, threads=1) for path in (reference, candidate)]
    cosines = []
    for batch in batches:
        first, second = (session.run(["logits"], batch.feeds)[0] for session in sessions)
        real = batch.feeds["attention_mask"].astype(bool)
        first, second = first[real].astype(np.float64), second[real].astype(np.float64)
        cosines.append((first * second).sum(axis=1)
                       / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1) + 1e-30))
    values = np.concatenate(cosines)
    return float(values.mean()), float(values.min())


#: The quantized variants ``--quantize`` writes and compares: a name and the extra ``qgraph optimize`` options.
QUANTIZED_VARIANTS = (("static", ()), ("dynamic", ("--activations", "dynamic")))


def quantize_encoder(model: Path, recipe, calibration_samples: int, output_directory: Path) -> None:
    input_ids, attention_mask = text_encoder.encoder_sequences("train", recipe.sequence_length,
                                                               limit=calibration_samples)
    calibration = output_directory / "text_encoder_calibration.npz"
    np.savez(calibration, input_ids=input_ids, attention_mask=attention_mask,
             token_type_ids=np.zeros_like(input_ids))
    test = text_encoder.held_out_batches("test", recipe.sequence_length, rate=recipe.mask_rate)
    fp32 = text_encoder.masked_token_accuracy(model, test, threads=1)
    print(f"FP32 {model} ({model.stat().st_size / 1e6:.2f} MB): masked-token accuracy {100 * fp32.accuracy:.2f}% "
          f"on {fp32.masked_tokens} test tokens, loss {fp32.loss:.4f}")
    quantized_models = []
    for name, options in QUANTIZED_VARIANTS:
        quantized = output_directory / f"text_encoder.int8-{name}.onnx"
        command = [sys.executable, "-m", "qgraph.cli", "optimize", str(model), "-o", str(quantized),
                   "--calib", str(calibration), *options]
        print("$ " + " ".join(["qgraph", *command[3:]]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        int8 = text_encoder.masked_token_accuracy(quantized, test, threads=1)
        mean_cosine, minimum_cosine = logit_cosines(model, quantized, test)
        print(f"INT8 {name}: quantized in {seconds:.0f} s, {quantized.stat().st_size / 1e6:.2f} MB; masked-token "
              f"accuracy {100 * int8.accuracy:.2f}% ({100 * (int8.accuracy - fp32.accuracy):+.2f} points), loss "
              f"{int8.loss:.4f}; logit cosine to FP32 per real token: mean {mean_cosine:.4f}, min "
              f"{minimum_cosine:.4f}", flush=True)
        quantized_models.append(quantized)
    for batch_size in (1, 8):
        sequences = text_encoder.encoder_sequences("test", recipe.sequence_length, limit=batch_size)
        feeds = {"input_ids": sequences[0], "attention_mask": sequences[1],
                 "token_type_ids": np.zeros_like(sequences[0])}
        latencies = median_latencies([model, *quantized_models], feeds, 20)
        ratios = ", ".join(f"INT8 {name} {latency:.2f} ms ({latencies[0] / latency:.2f}x)"
                           for (name, _), latency in zip(QUANTIZED_VARIANTS, latencies[1:]))
        print(f"latency batch {batch_size}, sequence {recipe.sequence_length}, 2 threads, medians of interleaved "
              f"rounds: FP32 {latencies[0]:.2f} ms, {ratios}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["encoder", "decoder", "all"], default="all")
    parser.add_argument("--cache-dir", help="cache folder (default: $QGRAPH_CACHE_DIR/text_models or "
                                            "~/.cache/qgraph/text_models)")
    parser.add_argument("--retrain", action="store_true", help="train even if the cache holds the model")
    parser.add_argument("--tiny", action="store_true", help="the seconds-long test recipes")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for training")
    parser.add_argument("--quantize", action="store_true",
                        help="quantize the encoder with `qgraph optimize --calib` and compare with FP32")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--output-dir", help="where --quantize writes (default: a temporary folder)")
    parser.add_argument("-v", "--verbose", action="store_true")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)

    rows = []
    if arguments.model in ("encoder", "all"):
        recipe = text_encoder.tiny_recipe() if arguments.tiny else text_encoder.reference_recipe()
        encoder = text_encoder.trained_text_encoder(recipe, cache_dir=arguments.cache_dir, retrain=arguments.retrain,
                                                    threads=arguments.threads)
        result = encoder.result
        rows.append((recipe, encoder, f"masked-token accuracy {100 * result['masked_token_accuracy']:.2f}% "
                                      f"({result['test_masked_tokens']} test tokens)"))
    if arguments.model in ("decoder", "all"):
        recipe = text_decoder.tiny_recipe() if arguments.tiny else text_decoder.reference_recipe()
        decoder = text_decoder.trained_text_decoder(recipe, cache_dir=arguments.cache_dir, retrain=arguments.retrain,
                                                    threads=arguments.threads)
        result = decoder.result
        rows.append((recipe, decoder, f"perplexity {result['perplexity']:.3f} ({result['test_tokens']} test tokens)"))
        windows = text_decoder.decoder_windows("test", recipe.sequence_length, limit=4)
        difference = check_kv_cache(decoder.path, windows, recipe.sequence_length // 2)
        print(f"decoder KV cache: prefill {recipe.sequence_length // 2} + one-token steps vs full forward, "
              f"max |logit difference| {difference:.2e}")
    print(f"| {'model':<18} | {'params':>9} | {'size':>8} | {'epochs':>6} | {'steps':>6} | {'train time':>10} | "
          "metric (held-out test modules) |")
    print("|" + "|".join(["-" * 20, "-" * 11, "-" * 10, "-" * 8, "-" * 8, "-" * 12, "-" * 32]) + "|")
    for recipe, cached, metric in rows:
        result = cached.result
        print(f"| {recipe.name:<18} | {result['parameters']:>9,} | {cached.path.stat().st_size / 1e6:>5.2f} MB | "
              f"{result['epochs']:>6} | {result['steps']:>6} | {result['seconds'] / 60:>6.1f} min | {metric} |")
        print(f"  {cached.path}{' (trained now)' if cached.trained_now else ' (cached)'}")

    if arguments.quantize:
        recipe = text_encoder.tiny_recipe() if arguments.tiny else text_encoder.reference_recipe()
        encoder = text_encoder.trained_text_encoder(recipe, cache_dir=arguments.cache_dir, train_if_missing=True,
                                                    threads=arguments.threads)
        with tempfile.TemporaryDirectory(prefix="qgraph-text-quantize-") as scratch:
            directory = Path(arguments.output_dir) if arguments.output_dir else Path(scratch)
            directory.mkdir(parents=True, exist_ok=True)
            quantize_encoder(encoder.path, recipe, arguments.calibration_samples, directory)


if __name__ == "__main__":
    main()
