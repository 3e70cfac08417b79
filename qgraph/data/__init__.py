"""Readers and validation for calibration, training and evaluation data, and the Fashion-MNIST loader.

- :mod:`qgraph.data.storage`: shards (one ``.npz``, a directory of ``.npy``, an ONNX ``test_data_set_*``, arrays in
  memory) that know shapes from file headers and open arrays lazily, memory-mapped where the format allows;
- :mod:`qgraph.data.layout`: :class:`DataLayout`, where each key counts its samples (batch axes, constants, keys
  of inputs that ``--fix-input`` removed);
- :mod:`qgraph.data.readers`: the :class:`Dataset` protocol, :class:`ShardedDataset` and :func:`open_dataset`;
- :mod:`qgraph.data.validate`: checks against a model's input signature, raising :class:`~qgraph.errors.DataError`;
- :mod:`qgraph.data.fashion_mnist`: the IDX parser and loader for Debian's ``dataset-fashion-mnist``.
"""

from qgraph.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    write_fashion_mnist_npz,
)
from qgraph.data.layout import DataLayout, is_state_name, parse_batch_axis
from qgraph.data.readers import Dataset, ShardedDataset, batch_axes_of, dataset_from_arrays, open_dataset
from qgraph.data.storage import ArrayInfo
from qgraph.data.validate import (
    CastingDataset,
    InputSpec,
    KeysLeftOut,
    input_signature,
    validate_batch,
    validate_dataset,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ArrayInfo",
    "CastingDataset",
    "DataLayout",
    "Dataset",
    "InputSpec",
    "KeysLeftOut",
    "ShardedDataset",
    "batch_axes_of",
    "dataset_from_arrays",
    "input_signature",
    "is_state_name",
    "load_fashion_mnist",
    "open_dataset",
    "parse_batch_axis",
    "validate_batch",
    "validate_dataset",
    "write_fashion_mnist_npz",
]
