"""Train the reference models on Fashion-MNIST with their recipes and write them to ``models/trained/``.

Each model is trained with :func:`qgraph.models.recipes.train_recipe` (validation on the last 5000 training images,
best checkpoint by validation accuracy, BatchNormalization kept in the exported model), then its top-1 accuracy on
the 10 000 test images is measured in plain onnxruntime. Models train one after another; a table closes the run.

    python tools/train_reference_models.py --model all --output-dir models/trained
    python tools/train_reference_models.py --model resnet --epochs 1 --train-limit 2000   # a quick check
    python tools/train_reference_models.py --write-data    # only rewrite the subsets in models/data/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qgraph.models.recipes import DATA_DIRECTORY, RECIPES, RecipeResult, get_recipe, train_recipe, write_bundled_data
from qgraph.train import ProgressEvent

REPOSITORY = Path(__file__).resolve().parent.parent


def print_epoch(event: ProgressEvent) -> None:
    if event.kind == "epoch":
        print(f"  epoch {event.epoch}: train loss {event.loss:.4f}, {event.metric_name} {event.metric:.4f}, "
              f"{event.samples_per_second:.1f} samples/s", flush=True)


def print_table(results: list[RecipeResult]) -> None:
    header = (f"| {'model':<12} | {'params':>8} | {'epochs':>6} | {'train samples':>13} | {'wall time':>9} | "
              f"{'val acc':>7} | {'test acc':>8} | {'goal':>5} | {'size':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for result in results:
        minutes = f"{result.seconds / 60:.1f} min"
        validation = "-" if result.validation_accuracy is None else f"{100 * result.validation_accuracy:.2f}%"
        size = f"{result.output_path.stat().st_size / 1e6:.2f} MB"
        print(f"| {result.recipe.name:<12} | {result.parameters:>8,} | {result.epochs:>6} | "
              f"{result.train_samples:>13,} | {minutes:>9} | {validation:>7} | {100 * result.test_accuracy:>7.2f}% | "
              f"{result.recipe.goal_accuracy:>4.0f}% | {size:>8} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--output-dir", default=str(REPOSITORY / "models" / "trained"))
    parser.add_argument("--train-limit", type=int, help="train on the first N training images only")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (on a shared CPU one thread beats two spinning ones)")
    parser.add_argument("--root", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--write-data", action="store_true",
                        help=f"write the Fashion-MNIST subsets to {DATA_DIRECTORY} and exit (trains nothing)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every 50 steps")
    arguments = parser.parse_args()
    # force: importing onnxruntime(-training) already put a WARNING handler on the root logger
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)

    if arguments.write_data:
        for path in write_bundled_data(root=arguments.root):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return
    names = list(RECIPES) if arguments.model == "all" else [arguments.model]
    output_directory = Path(arguments.output_dir)
    results: list[RecipeResult] = []
    for name in names:
        recipe = get_recipe(name)
        output = output_directory / recipe.output_name
        print(f"training {name} -> {output}", flush=True)
        result = train_recipe(recipe, output, epochs=arguments.epochs, train_limit=arguments.train_limit,
                              progress=print_epoch, threads=arguments.threads, root=arguments.root)
        results.append(result)
        print(f"  {name}: test accuracy {100 * result.test_accuracy:.2f}% on {result.test_samples} images, "
              f"{result.seconds / 60:.1f} min", flush=True)
    print()
    print(f"$ python tools/train_reference_models.py {' '.join(sys.argv[1:])}")
    print_table(results)


if __name__ == "__main__":
    main()
