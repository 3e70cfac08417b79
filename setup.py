"""Build the optional native observer loops; everything else is declared in pyproject.toml.

``qgraph/quant/observers/_native.c`` holds the observers' single-pass loops (min-max, histogram binning). It is
optional: where no C compiler is available the build carries on without it and the observers use their numpy paths,
which give the same results about twice as slowly (``qgraph.quant.observers.base.NATIVE`` tells which one runs).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtension(build_ext):
    """-O3; -fno-trapping-math (float clamps as vector min/max) and -fopenmp-simd (the min/max reductions), GCC and Clang."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args = ["-O3", "-fno-trapping-math", "-fopenmp-simd"]
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExtension},
    ext_modules=[
        Extension(
            "qgraph.quant.observers._native",
            sources=["qgraph/quant/observers/_native.c"],
            optional=True,
        ),
        # not a Python module: an onnxruntime custom-operator library (qgraph.train.fused_gradients loads it)
        Extension(
            "qgraph.train._quantizer_gradient",
            sources=["qgraph/train/_quantizer_gradient.c"],
            optional=True,
        ),
    ],
)
