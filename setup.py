"""Build the optional native parts; everything else is declared in pyproject.toml.

- ``qgraph/native/observer_loops.c``: the observers' single-pass loops (min-max, histogram binning). Without it
  the observers use their numpy paths, which give the same results about twice as slowly
  (``qgraph.calibrate.observers.base.NATIVE`` tells which one runs).
- ``qgraph/native/quantizer_gradient.c``: not a Python module but an onnxruntime custom-operator library, the fused
  kernels of QAT's learnable activation quantizers (``qgraph.train.fused_gradients``). Without it QAT graphs keep
  onnxruntime's kernels, with the same values, slower.

Every C source and header is in ``qgraph/native/``: ``macros.h`` (the macros all share: CPU multiversioning, the
exported symbol), ``ort_custom_op.h`` (the part of onnxruntime's C API the library uses) and ``bin_loops.h`` (the
binning loops). All are optional: where no C compiler is available the build carries on without them.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtension(build_ext):
    """-O3; -fno-trapping-math (float clamps as vector min/max) and -fopenmp-simd (the min/max reductions), GCC and
    Clang."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args = ["-O3", "-fno-trapping-math", "-fopenmp-simd"]
        super().build_extensions()


def native_extension(name: str, header: str) -> Extension:
    """The optional extension ``qgraph.native._<name>`` built from ``qgraph/native/<name>.c``, which includes
    ``macros.h`` and ``header``."""
    return Extension(
        f"qgraph.native._{name}",
        sources=[f"qgraph/native/{name}.c"],
        include_dirs=["qgraph/native"],
        depends=[f"qgraph/native/{header}", "qgraph/native/macros.h"],
        optional=True,
    )


setup(
    cmdclass={"build_ext": BuildExtension},
    ext_modules=[
        native_extension("observer_loops", "bin_loops.h"),
        # not a Python module: an onnxruntime custom-operator library (qgraph.train.fused_gradients loads it)
        native_extension("quantizer_gradient", "ort_custom_op.h"),
    ],
)
