"""How long Python and autograd take right after a burst of wide-vector FMAs.

On some CPUs a core running 512-bit FMAs lowers its clock and keeps it lowered for a while after
the last one (Intel's AVX-512 frequency licences): the Python around a kernel then runs slower,
which no timing of the kernel alone sees. This times ``w.sum().backward()`` (a 3-element tensor:
Python, the autograd engine, two nodes) right after each of: nothing, a burst of 512-bit FMAs,
one of 256-bit FMAs, and one of integer adds (each some tens of microseconds, as a kernel of a
small training step), rounds interleaved. Needs g++; the FMA loops are compiled here with
-march=native (the 512-bit burst is skipped where the CPU has no AVX-512).

    python bench/wide_vector_after_effect.py
"""

from __future__ import annotations

import ctypes
import pathlib
import statistics
import subprocess
import tempfile
import time

import torch

SOURCE = r"""
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
template <typename V> static float fmas(long iterations) {
    V acc[12], x, y;
    for (int i = 0; i < 12; ++i) for (unsigned l = 0; l < sizeof(V) / 4; ++l) acc[i][l] = float(i);
    for (unsigned l = 0; l < sizeof(V) / 4; ++l) { x[l] = 0.999f; y[l] = 0.001f; }
    for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = acc[i] * x + y;
        asm volatile("" :: "v"(x));
    }
    float s = 0; for (int i = 0; i < 12; ++i) s += acc[i][0]; return s;
}
extern "C" float fma512(long n) {
#if defined(__AVX512F__)
    return fmas<v16>(n);
#else
    return fmas<v8>(n);
#endif
}
extern "C" int has_avx512() {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
extern "C" float fma256(long n) { return fmas<v8>(n); }
extern "C" long int_adds(long n) { long s = 0; for (long i = 0; i < n; ++i) { s += 3 * i; asm volatile("" : "+r"(s)); } return s; }
"""


def build() -> ctypes.CDLL:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="fastml_after_effect_"))
    (folder / "bursts.cpp").write_text(SOURCE)
    subprocess.run(["g++", "-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC",
                    str(folder / "bursts.cpp"), "-o", str(folder / "bursts.so")], check=True)
    lib = ctypes.CDLL(str(folder / "bursts.so"))
    lib.fma512.restype = lib.fma256.restype = ctypes.c_float
    lib.fma512.argtypes = lib.fma256.argtypes = lib.int_adds.argtypes = [ctypes.c_long]
    return lib


def main() -> None:
    lib = build()
    w = torch.zeros(3, requires_grad=True)
    bursts = {"nothing": lambda: None, "256-bit FMAs": lambda: lib.fma256(10000),
              "integer adds": lambda: lib.int_adds(30000)}
    if lib.has_avx512():
        bursts["512-bit FMAs"] = lambda: lib.fma512(10000)
    for name, burst in bursts.items():
        start = time.perf_counter()
        for _ in range(100):
            burst()
        print(f"{name}: {(time.perf_counter() - start) / 100 * 1e6:.1f} us a burst")
    times = {name: [] for name in bursts}
    for _ in range(15):
        for name, burst in bursts.items():
            total = 0.0
            for _ in range(300):
                burst()
                start = time.perf_counter()
                w.sum().backward()
                total += time.perf_counter() - start
            times[name].append(total / 300 * 1e6)
    for name, values in times.items():
        print(f"after {name:>12}: w.sum().backward() median {statistics.median(values):.1f} us, min {min(values):.1f} us")


if __name__ == "__main__":
    main()
