"""Compiles Triton kernels ahead of time for an H100 (sm_90), no GPU needed: ptxas ships with
triton. Run as a script, outside TRITON_INTERPRET (test_triton_aot.py does so in a child process):

    python tests/triton_aot.py fastml.ops.sgd.triton_impl:_sgd_kernel ...

Each kernel is compiled for float32, float64, float16 and bfloat16 tensors with every flag of
its launcher on (euclidean for the distance kernels); a line "compiled <kernel> <dtype>" per
success. Exit 3 (UNSUPPORTED) when this triton lacks the ahead-of-time API, 1 on a compile error.
"""

from __future__ import annotations

import importlib
import inspect
import sys

UNSUPPORTED = 3
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Runtime arguments by name (a pointer of "*DT" takes the kernel's element type); every other
# parameter is a constexpr.
RUNTIME_TYPES = {"table_ptr": "*i64", "block_tensor_ptr": "*i32", "block_start_ptr": "*i64", "count": "i32",
                 "n_blocks": "i32", "x1_ptr": "*DT", "x2_ptr": "*DT", "out_ptr": "*DT", "out_j_ptr": "*i64",
                 "P": "i32", "Q": "i32", "R": "i32", "M": "i32", "K": "i32",
                 "x_ptr": "*DT", "idx_ptr": "*i64", "grad_ptr": "*DT", "grad_input_ptr": "*DT",
                 "w_ptr": "*DT", "bias_ptr": "*DT", "grad_weight_ptr": "*DT", "grad_bias_ptr": "*DT",
                 "part_ptr": "*DT", "argmax_ptr": "*i8",
                 # the knn screen's operands are float32 whatever the inputs were (its launcher upcasts)
                 "q_ptr": "*fp32", "r_ptr": "*fp32", "rn_ptr": "*fp32", "cand_ptr": "*i64", "cut_ptr": "*fp32",
                 "Q_BUCKET": "i32", "R_BUCKET": "i32", "M_BUCKET": "i32",
                 **dict.fromkeys(["planes", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW",
                                  "n_outputs", "n_inputs", "C", "groups", "m_per_split", "splits", "length",
                                  "POH", "POW", "PKH", "PKW", "PSH", "PSW"], "i32")}
POINTER_ROWS = {"_sgd_kernel": 3, "_adam_kernel": 5, "_course_kernel": 2}
# input_precision of each kernel's tl.dot where it is not "ieee" (the knn screen's tensor-core product)
PRECISION = {"_screen_kernel": "tf32x3"}
SHORT = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}


def constants_for(kernel, dtype_name: str, tl) -> dict:
    """Every constexpr of a kernel: the dtype, its accumulator, block sizes, flags all on."""
    names = [p for p in inspect.signature(kernel.fn).parameters if p not in RUNTIME_TYPES]
    dtype = getattr(tl, dtype_name)
    values = {"DTYPE": dtype, "ACC": tl.float64 if dtype_name == "float64" else tl.float32, "BLOCK": 2048,
              "POINTER_ROWS": POINTER_ROWS.get(kernel.fn.__name__), "NORM": 2, "BQ": 32, "BR": 32, "BD": 8,
              "KP": 16, "BK": 32, "BLOCK_P": 2,
              "PREC": PRECISION.get(kernel.fn.__name__, "ieee"), "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32,
              "UPCAST": False}
    return {name: values.get(name, True) for name in names}


def signature_for(kernel, dtype_name: str, constants: dict) -> dict:
    runtime = [p for p in inspect.signature(kernel.fn).parameters if p not in constants]
    types = {name: RUNTIME_TYPES[name].replace("DT", SHORT[dtype_name]) for name in runtime}
    return dict(types, **{name: "constexpr" for name in constants})


def main(targets: list[str]) -> int:
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"this triton has no ahead-of-time compile API ({exc})")
        return UNSUPPORTED
    for target in targets:
        module_name, kernel_name = target.split(":")
        kernel = getattr(importlib.import_module(module_name), kernel_name)
        for dtype_name in DTYPES:
            constants = constants_for(kernel, dtype_name, tl)
            signature = signature_for(kernel, dtype_name, constants)
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                      target=GPUTarget("cuda", 90, 32))
            if not compiled.asm.get("cubin"):
                print(f"no cubin for {kernel_name} {dtype_name}")
                return 1
            print(f"compiled {kernel_name} {dtype_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
