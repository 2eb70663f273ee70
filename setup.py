"""Build fastml's C++ (pybind11 + OpenMP) CPU kernels.

The extension is optional: when no working compiler is found, or the build fails, the install
still succeeds and fastml runs on its numba / reference backends. What happened is recorded in
``fastml/_build_info.json`` so that ``fastml.info()`` can say why the cpp backend is missing, and
a failure is loud in the build log: every source file is compiled on its own, so a file that
does not compile is named there with the compiler's error, and in the build record.

Two layouts, chosen by FASTML_CPU_ARCH:

- one machine (the default, ``native``, or any -march value such as ``x86-64-v3``): one module,
  fastml._C, compiled with ``-march=$FASTML_CPU_ARCH`` (``""``: no -march at all).
- ``dispatch``, for a wheel that runs well on any x86-64 CPU: the same sources compiled once per
  x86-64 micro-architecture level into fastml._C_x86_64_v2 (SSE4.2), fastml._C_x86_64_v3 (AVX2,
  FMA) and fastml._C_x86_64_v4 (AVX-512). At import, fastml/_cpp.py reads the flags the CPU
  reports and loads the highest level whose instructions are all there (FASTML_CPU_LEVEL may ask
  for a lower one); ``fastml.cpu_level()`` says which and why. On another architecture (aarch64)
  ``dispatch`` builds one fastml._C for the compiler's default target.

Environment:
  FASTML_CPU_ARCH    -march value, or "dispatch" (above); default "native"
  FASTML_NO_CPP=1    skip the C++ build entirely
  FASTML_BUILD_JOBS  source files compiled at once (default: setuptools' -j, else the CPU count)
"""

import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, ExecError

HERE = Path(__file__).parent.resolve()
CSRC = HERE / "csrc"
BUILD_INFO = "_build_info.json"
DISPATCH = "dispatch"
# The x86-64 levels of a dispatch build, lowest first; fastml/_cpp.py knows the CPU flags each
# one needs (tests/test_build.py checks that both name the same levels).
X86_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")


def level_module(level: str) -> str:
    """fastml._C_x86_64_v3 for x86-64-v3."""
    return "_C_" + level.replace("-", "_")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _extension(name: str, march: str):
    import pybind11  # only the headers: available in the isolated build through pyproject

    sources = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.cpp"))
    headers = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.h"))
    # -g0 overrides the -g in Python's own CFLAGS (no debug info: a 10x smaller extension);
    # -ffp-contract=fast lets a * b + c become one FMA in the explicit-vector micro-kernels;
    # -fno-math-errno lets std::sqrt vectorise (the kernels never read errno; results are the
    # same correctly rounded square roots).
    # -Wno-psabi: below AVX-512, GCC notes at every 64-byte vector argument that its ABI differs;
    # such functions never cross a module's boundary, and the notes buried real errors in the log.
    compile_args = ["-O3", "-g0", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp",
                    "-fvisibility=hidden", "-Wno-psabi"]
    if march:
        compile_args.append(f"-march={march}")
    ext = Extension(
        f"fastml.{name}",
        sources=sources,
        depends=headers,  # an edited header rebuilds the module
        include_dirs=[pybind11.get_include(), str(CSRC)],
        define_macros=[("FASTML_MODULE_NAME", name)],  # the module's init function (bindings.cpp)
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        language="c++",
    )
    ext.march = march  # for the build log and record
    return ext


def _extensions():
    """(layout, extensions) for FASTML_CPU_ARCH."""
    arch = os.environ.get("FASTML_CPU_ARCH", "native").strip()
    if arch != DISPATCH:
        return "single", [_extension("_C", arch)]
    if not _is_x86():
        # The levels are x86's; elsewhere one module for the compiler's default target.
        return "single", [_extension("_C", "")]
    return DISPATCH, [_extension(level_module(level), level) for level in X86_LEVELS]


def _first_errors(output: str, limit: int = 3) -> str:
    """The compiler's first error lines (else its last lines): what the build record keeps."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    picked = (errors or lines[-limit:])[:limit]
    return " | ".join(picked) if picked else "no output"


class _CommandFailed(ExecError, subprocess.CalledProcessError):
    """A compiler command that failed, with what it said. Both kinds, because setuptools' compilers
    catch DistutilsExecError from spawn (older) or CalledProcessError from call (newer) to raise
    CompileError / LinkError, which then carries this text."""

    def __init__(self, cmd, returncode, message):
        subprocess.CalledProcessError.__init__(self, returncode, cmd)
        self.message = message

    def __str__(self):
        return self.message


def _run_captured(cmd, env=None, **kwargs):
    """The compiler's spawn / call, with its output captured: echoed to the log as usual, and its
    error lines carried in the exception, so the failing file's error reaches the build record."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:  # no such compiler
        raise _CommandFailed(cmd, 127, f"{cmd[0]!r} could not run: {exc}") from exc
    if proc.stdout:
        sys.stderr.write(proc.stdout)
    if proc.returncode:
        raise _CommandFailed(cmd, proc.returncode, f"exit status {proc.returncode}: {_first_errors(proc.stdout)}")


class OptionalBuildExt(build_ext):
    """build_ext that compiles file by file, and records failure instead of failing the install."""

    def run(self):
        self._modules = {}
        status = {"cpp": "built", "python": sys.version.split()[0],
                  "arch": os.environ.get("FASTML_CPU_ARCH", "native").strip(), "layout": LAYOUT}
        if os.environ.get("FASTML_NO_CPP"):
            status["cpp"] = "skipped: FASTML_NO_CPP was set at install time"
            self.extensions = []
        elif not self.extensions:
            status["cpp"] = "skipped: pybind11 was not importable at build time"
        else:
            try:
                super().run()
            except Exception as exc:  # compiler missing, OpenMP missing, a failed link
                self._fail_all(exc)
            status["cpp"] = self._summary()
        status["modules"] = self._modules
        self._write_build_info(status)

    def build_extensions(self):
        # Each module on its own: in a dispatch build, a level that fails (an old compiler that
        # cannot target AVX-512) leaves the others installed. Failed ones leave self.extensions,
        # so that setuptools neither copies nor lists a file that was never made.
        self.check_extensions_list(self.extensions)
        built = []
        for ext in self.extensions:
            name = ext.name.rsplit(".", 1)[-1]
            try:
                self.build_extension(ext)
            except Exception as exc:
                self._modules[name] = {"march": ext.march, "status": f"build failed: {type(exc).__name__}: {exc}"}
                print(f"WARNING: fastml C++ module {name} (-march={ext.march or 'default'}) was not built: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
            else:
                self._modules[name] = {"march": ext.march, "status": "built"}
                built.append(ext)
        self.extensions = built
        if not built:
            print("WARNING: no fastml C++ module was built; fastml will run on its numba / reference backends.",
                  file=sys.stderr)

    def build_extension(self, ext):
        # Compile every source file on its own (FASTML_BUILD_JOBS at once), each into a folder of
        # its module's (the levels of a dispatch build share file names), and go on past a
        # failure: the error then names each file that failed, and what the compiler said.
        compiler = self.compiler
        compile_all = compiler.compile
        jobs = int(os.environ.get("FASTML_BUILD_JOBS") or 0) or (self.parallel if isinstance(self.parallel, int)
                                                                   and self.parallel > 1 else os.cpu_count() or 1)

        def compile_each(sources, output_dir=None, **kwargs):
            folder = os.path.join(output_dir or self.build_temp, ext.name)

            def one(source):
                try:
                    return compile_all([source], output_dir=folder, **kwargs), None
                except CompileError as exc:
                    return [], f"{source}: {exc}"

            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                results = list(pool.map(one, sources))
            failed = [failure for _, failure in results if failure]
            if failed:
                shown = "; ".join(failed[:4]) + (f"; and {len(failed) - 4} more" if len(failed) > 4 else "")
                raise CompileError(f"{len(failed)} of {len(sources)} files failed with -march="
                                   f"{ext.march or 'default'}: {shown}")
            return [obj for objects, _ in results for obj in objects]

        compiler.compile = compile_each
        compiler.spawn = compiler.call = _run_captured
        try:
            super().build_extension(ext)
        finally:
            del compiler.compile, compiler.spawn, compiler.call  # back to the class's methods

    def _fail_all(self, exc):
        for ext in self.extensions:
            name = ext.name.rsplit(".", 1)[-1]
            if self._modules.get(name, {}).get("status") != "built":
                self._modules[name] = {"march": ext.march, "status": f"build failed: {type(exc).__name__}: {exc}"}
        self.extensions = []
        print(f"WARNING: fastml C++ extension not built ({type(exc).__name__}: {exc}); "
              "fastml will run on its numba / reference backends.", file=sys.stderr)

    def _summary(self) -> str:
        """The build record's one line: "built", what failed beside what was built, or why
        nothing was (those lines start with "build failed at install time")."""
        failed = {name: m for name, m in self._modules.items() if m["status"] != "built"}
        if not failed:
            return "built"
        what = "; ".join(f"{name} (-march={m['march'] or 'default'}): {m['status']}" for name, m in failed.items())
        if len(failed) == len(self._modules):
            return f"build failed at install time: {what}"
        return f"built, except {what}"

    def _write_build_info(self, status):
        targets = [Path(self.build_lib) / "fastml"]
        if self.inplace:
            targets.append(HERE / "fastml")
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / BUILD_INFO).write_text(json.dumps(status, indent=1))


def _ext_modules():
    try:
        return _extensions()
    except ImportError as exc:  # no pybind11: a non-isolated build in a bare environment
        print(f"WARNING: pybind11 not found ({exc}); building fastml without its C++ kernels.",
              file=sys.stderr)
        return "none", []


LAYOUT, EXT_MODULES = _ext_modules()

setup(
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": OptionalBuildExt},
    package_data={"fastml": [BUILD_INFO]},
)
