"""Masked-token accuracy (%) of the reference text encoder's interface on its held-out test modules, last line.

The scorer for tuning on the trained text encoder (``--eval "python tools/score_text_encoder.py {model}"``): the
test modules of :mod:`qgraph.models.text_encoder`'s corpus (the installed standard library's docstrings), packed to
the recipe's sequence length and masked once with the fixed validation seed at the recipe's rate, as
``tools/train_text_models.py`` measures them. onnxruntime runs with as many intra-op threads as ``QGRAPH_THREADS``
says (qgraph's tuning sets it to cores / workers for each trial), all of them when it is unset.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from qgraph.models import text_encoder


def accuracy(path: str, *, limit: int | None = None) -> float:
    recipe = text_encoder.reference_recipe()
    batches = text_encoder.held_out_batches("test", recipe.sequence_length, limit=limit, rate=recipe.mask_rate)
    threads = int(os.environ.get("QGRAPH_THREADS", "0")) or None
    return 100 * text_encoder.masked_token_accuracy(path, batches, threads=threads).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--limit", type=int, help="the first LIMIT test sequences only (default: all)")
    arguments = parser.parse_args()
    if not Path(arguments.model).is_file():
        raise SystemExit(f"score_text_encoder: {arguments.model}: no such file")
    import onnx

    graph = onnx.load(arguments.model, load_external_data=False).graph
    inputs = {value.name for value in graph.input}
    if not {"input_ids", "attention_mask"} <= inputs or text_encoder.OUTPUT_NAME not in {
            value.name for value in graph.output}:
        raise SystemExit(f"score_text_encoder: {arguments.model} is not the text encoder's interface (inputs "
                         f"input_ids and attention_mask, output {text_encoder.OUTPUT_NAME}); it has inputs "
                         f"{', '.join(sorted(inputs))}")
    print(f"{accuracy(arguments.model, limit=arguments.limit):.2f}")


if __name__ == "__main__":
    main()
