"""Writing a model atomically, with external data when it is large, never over its own input.

The model (and its external data file, if any) is first written into a temporary folder beside the destination and
then moved into place with ``os.replace``: a failure half-way leaves the destination as it was, never half-written.
Protobuf cannot hold more than 2 GB, so a model whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD` is saved with
its tensors in ``<name>.data`` unless the caller forbids external data, which is then refused with the size.

What is written runs in the installed onnxruntime (:func:`qgraph.ir.versions.supported_versions`): an IR version
above the runtime's is written as the runtime's (the model object is left as it was), and a default-domain opset
above it is refused naming both, since converting it is :func:`qgraph.ir.load_model`'s work.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from qgraph.errors import OutputPathError, UnsupportedModelError
from qgraph.ir import versions

logger = logging.getLogger(__name__)

#: Tensor bytes above which the model is saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PROTOBUF_LIMIT = 2**31 - 1


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of every initializer in the model, subgraphs included."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _external_files(model: ir.Model) -> set[Path]:
    """The files that the model's external (memory-mapped) initializers are read from."""
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                files.add(Path(value.const_value.path).resolve())
    return files


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.resolve() or (second.exists() and first.exists() and first.samefile(second))
    except OSError:
        return False


def _runtime_ir_version(model: ir.Model, destination: Path) -> int:
    """The IR version to write ``model`` with; refuses an opset newer than the installed onnxruntime runs."""
    supported = versions.supported_versions()
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset > supported.opset:
        raise UnsupportedModelError(
            f"{destination}: the model's opset {opset} is newer than the installed {supported.describe()} runs; "
            "load it with qgraph.ir.load_model, which converts it down"
        )
    if model.ir_version > supported.ir_version:
        logger.info("writing IR version %d instead of %d for %s", supported.ir_version, model.ir_version,
                    supported.describe())
    return min(model.ir_version, supported.ir_version)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
    allow_overwrite_input: bool = False,
) -> Path:
    """Save ``model`` to ``path`` atomically and return the path.

    ``external_data``: ``None`` decides by size, ``True`` always writes ``<name>.data``, ``False`` refuses a model
    larger than protobuf's 2 GB limit. ``input_path`` (defaults to the path the model was loaded from) is never
    overwritten unless ``allow_overwrite_input`` is set.
    """
    destination = Path(path)
    source = input_path if input_path is not None else model.meta.get("qgraph.source_path")
    if source is not None and not allow_overwrite_input and _same_file(Path(source), destination):
        raise OutputPathError(f"{destination}: the output path is the input model; choose another output path")
    if destination.is_dir():
        raise OutputPathError(f"{destination}: is a folder; give a file name for the output model")
    if not destination.parent.exists():
        raise OutputPathError(f"{destination.parent}: output folder does not exist")

    ir_version = _runtime_ir_version(model, destination)
    size = tensor_bytes(model)
    # A model whose tensors were streamed to external data (weight-only quantization of a model with external
    # data) stays external: inlining would read every tensor into memory at once.
    streamed = model.meta.get("qgraph.streamed_external_data") == "true"
    use_external = external_data if external_data is not None else (size > EXTERNAL_DATA_THRESHOLD or streamed)
    if not use_external and size > PROTOBUF_LIMIT:
        raise OutputPathError(
            f"{destination}: the model holds {size / 2**30:.2f} GiB of tensors, over protobuf's 2 GiB limit; "
            "save it with external data"
        )
    data_name = destination.name + ".data"
    if use_external and not allow_overwrite_input:
        target_data = destination.parent / data_name
        if any(_same_file(read_from, target_data) for read_from in _external_files(model)):
            raise OutputPathError(f"{destination}: its external data would overwrite the input's {data_name}")

    temporary = Path(tempfile.mkdtemp(prefix=".qgraph-", dir=destination.parent))
    model_ir_version, model.ir_version = model.ir_version, ir_version
    try:
        staged = temporary / destination.name
        if use_external:
            ir.save(model, staged, external_data=data_name, size_threshold_bytes=1024)
        else:
            # Tensors still memory-mapped from the input's external data go inline: their locations are relative
            # to the input's folder and would dangle beside the output.
            ir.external_data.load_to_model(model)
            ir.save(model, staged)
        if (temporary / data_name).exists():
            os.replace(temporary / data_name, destination.parent / data_name)
        os.replace(staged, destination)
    finally:
        model.ir_version = model_ir_version
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("saved %s (%.1f MB of tensors%s)", destination, size / 1e6, ", external data" if use_external else "")
    return destination
