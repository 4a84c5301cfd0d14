"""Builds the optional host-side extension glmrt._C (pybind11, C++17, no CUDA).

Metadata lives in pyproject.toml. If the compiler is missing the package still installs and
glmrt falls back to the numpy twins of each C++ function.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler must not block installing the runtime
            print(f"warning: glmrt._C was not built ({exc}); using the numpy fallbacks")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} was not built ({exc}); using the numpy fallbacks")


ext_modules = [
    Pybind11Extension(
        "glmrt._C",
        sorted(["csrc/bindings.cpp", "csrc/contours.cpp", "csrc/patchify.cpp"]),
        cxx_std=17,
        # no fused multiply-add: the layout polygons compare distances exactly as their Python twins
        extra_compile_args=["-O3", "-ffp-contract=off"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
