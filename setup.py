"""Build fastml._C, the C++ (pybind11 + OpenMP) CPU kernels.

The extension is optional: when no working compiler is found, or the build fails, the install
still succeeds and fastml runs on its numba / reference backends. The reason is recorded in
``fastml/_build_info.json`` so that ``fastml.info()`` can say why the cpp backend is missing.

Environment:
  FASTML_CPU_ARCH   value for -march (default "native"; e.g. "x86-64-v3" for a portable wheel,
                    or "" to pass no -march at all)
  FASTML_NO_CPP=1   skip the C++ build entirely
"""

import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent.resolve()
CSRC = HERE / "csrc"
BUILD_INFO = "_build_info.json"


def _extension():
    import pybind11  # only the headers: available in the isolated build through pyproject

    sources = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.cpp"))
    arch = os.environ.get("FASTML_CPU_ARCH", "native")
    # -g0 overrides the -g in Python's own CFLAGS (no debug info: a 10x smaller extension);
    # -ffp-contract=fast lets a * b + c become one FMA in the explicit-vector micro-kernels;
    # -fno-math-errno lets std::sqrt vectorise (the kernels never read errno; results are the
    # same correctly rounded square roots).
    compile_args = ["-O3", "-g0", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp",
                    "-fvisibility=hidden"]
    if arch:
        compile_args.append(f"-march={arch}")
    return Extension(
        "fastml._C",
        sources=sources,
        include_dirs=[pybind11.get_include(), str(CSRC)],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        language="c++",
    )


class OptionalBuildExt(build_ext):
    """build_ext that records failure instead of failing the install."""

    def run(self):
        status = {"cpp": "built", "python": sys.version.split()[0]}
        if os.environ.get("FASTML_NO_CPP"):
            status["cpp"] = "skipped: FASTML_NO_CPP was set at install time"
            self.extensions = []
        else:
            try:
                super().run()
            except Exception as exc:  # compiler missing, OpenMP missing, compile error
                status["cpp"] = f"build failed at install time: {type(exc).__name__}: {exc}"
                print(f"WARNING: fastml C++ extension not built ({exc}); "
                      "fastml will run on its numba / reference backends.", file=sys.stderr)
        self._write_build_info(status)

    def build_extension(self, ext):
        # setuptools swallows nothing here: any compile error propagates to run() above.
        super().build_extension(ext)

    def _write_build_info(self, status):
        targets = [Path(self.build_lib) / "fastml"]
        if self.inplace:
            targets.append(HERE / "fastml")
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / BUILD_INFO).write_text(json.dumps(status, indent=1))


def _ext_modules():
    try:
        return [_extension()]
    except ImportError as exc:  # no pybind11: a non-isolated build in a bare environment
        print(f"WARNING: pybind11 not found ({exc}); building fastml without its C++ kernels.",
              file=sys.stderr)
        return []


setup(
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
    package_data={"fastml": [BUILD_INFO]},
)
