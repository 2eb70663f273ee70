"""Every op forward and backward on the cpp backend against a float64 torch reference, small odd
sizes: the slice tests/test_build.py runs on a separate build of the C++ kernels (one -march, or
one forced level of a dispatch build), in a subprocess whose fastml is that build.

Run as ``python isa_ops_check.py [expected isa feature ...]``: prints the module used and "ok",
or fails on the first mismatch. The tolerances are tests/conftest.py's.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as TF
from conftest import STEP_TOLERANCES, assert_close, rand, upcast

import fastml
from fastml import _backend, _cpp
from fastml import functional as F

DTYPES = (torch.float32, torch.float64)


def grads(*tensors):
    return [t.grad for t in tensors if t is not None and t.requires_grad]


def compare(fast_fn, ref_fn, inputs, dtype, out_index=None):
    """fast_fn on cpp with `inputs` (dtype, requiring grad where they do) against ref_fn on their
    float64 copies: the output, then every input's gradient for a random output gradient."""
    # Fresh leaves: inputs shared between cases would accumulate gradients.
    inputs = [t if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref_inputs = upcast(*inputs)
    with fastml.use_backend("cpp"):
        out = fast_fn(*inputs)
    ref = ref_fn(*ref_inputs)
    if out_index is not None:
        out, ref = out[out_index], ref[out_index]
    assert_close(out, ref, dtype)
    if not any(t is not None and t.requires_grad for t in inputs):
        return
    seed = rand(*out.shape, dtype=torch.float64)
    with fastml.use_backend("cpp"):
        (out * seed.to(dtype)).sum().backward()
    (ref * seed).sum().backward()
    for got, want in zip(grads(*inputs), grads(*ref_inputs)):
        assert_close(got, want, dtype, scale=want.abs().max().item() + 1)


def check_ops(dtype):
    g = dict(dtype=dtype, requires_grad=True)
    # linear, the fused linear + squared loss, the squared loss
    x, w, b = rand(13, 7, **g), rand(5, 7, **g), rand(5, **g)
    compare(F.linear, TF.linear, (x, w, b), dtype)
    y = rand(13, 5, dtype=dtype)
    compare(F.linear_mse, lambda x, w, b, y: TF.mse_loss(TF.linear(x, w, b), y), (x, w, b, y), dtype)
    compare(F.mse_loss, TF.mse_loss, (rand(37, **g), rand(37, dtype=dtype)), dtype)
    # softmax cross-entropy, alone and fused with its linear layer
    target = torch.randint(0, 11, (19,))
    compare(lambda z: F.cross_entropy(z, target), lambda z: TF.cross_entropy(z, target), (rand(19, 11, **g),), dtype)
    x, w, b = rand(19, 9, **g), rand(11, 9, **g), rand(11, **g)
    compare(lambda x, w, b: F.linear_cross_entropy(x, w, target, linear_bias=b),
            lambda x, w, b: TF.cross_entropy(TF.linear(x, w, b), target), (x, w, b), dtype)
    # rows of 3 classes, at most one vector on every build: four at a time (cross_entropy_short_rows)
    short = torch.randint(0, 3, (10,))
    compare(lambda z: F.cross_entropy(z, short, label_smoothing=0.1),
            lambda z: TF.cross_entropy(z, short, label_smoothing=0.1), (rand(10, 3, **g),), dtype)
    x, w, b = rand(10, 9, **g), rand(3, 9, **g), rand(3, **g)
    compare(lambda x, w, b: F.linear_cross_entropy(x, w, short, linear_bias=b),
            lambda x, w, b: TF.cross_entropy(TF.linear(x, w, b), short), (x, w, b), dtype)
    # distances and neighbours (20 coordinates: past the int8 tiles' lower limit, where built)
    q, r = rand(7, 20, **g), rand(45, 20, **g)
    compare(F.cdist, torch.cdist, (q, r), dtype)
    q, r = rand(7, 20, dtype=dtype), rand(400, 20, dtype=dtype)  # 64·k <= 400: the int8 path
    with fastml.use_backend("cpp"):
        dist, idx = F.knn(q, r, 5)
    ref_dist, ref_idx = torch.cdist(*upcast(q, r)).topk(5, largest=False)
    assert_close(dist, ref_dist, dtype)
    assert torch.equal(idx, ref_idx), (idx, ref_idx)
    # pooling, convolution (row layout for a small batch, batch-innermost for 31 images) and
    # the fused conv + bias + ReLU + max-pool block
    compare(lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: TF.max_pool2d(x, 3, 2, 1), (rand(3, 2, 11, 9, **g),), dtype)
    # training batch norm with its fused ReLU, both layouts (17 channels: a vector and a tail)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = rand(3, 17, 5, 7, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
        compare(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, relu=True),
                lambda x, w, b: torch.relu(TF.batch_norm(x, None, None, w, b, training=True)),
                (x, rand(17, **g), rand(17, **g)), dtype)
    for n in (3, 31):
        x, w, b = rand(n, 4, 11, 10, **g), rand(6, 4, 3, 3, **g), rand(6, **g)
        compare(lambda x, w, b: F.conv2d(x, w, b, 1, 1), lambda x, w, b: TF.conv2d(x, w, b, 1, 1), (x, w, b), dtype)
        x, w, b = rand(n, 6, 9, 9, **g), rand(16, 6, 5, 5, **g), rand(16, **g)
        compare(lambda x, w, b: F.conv2d_relu_max_pool2d(x, w, b),
                lambda x, w, b: TF.max_pool2d(torch.relu(TF.conv2d(x, w, b)), 2), (x, w, b), dtype)


def check_optimizers(dtype):
    rtol, atol = STEP_TOLERANCES[dtype]
    for fast_cls, torch_cls, kwargs in ((fastml.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                        (fastml.optim.Adam, torch.optim.Adam, dict(lr=0.01))):
        start = [rand(17, 3, dtype=dtype), rand(29, dtype=dtype)]
        ours = [p.clone().requires_grad_() for p in start]
        theirs = [p.clone().requires_grad_() for p in start]
        fast, ref = fast_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
        for _ in range(5):
            step_grads = [rand(*p.shape, dtype=dtype) for p in start]
            for params, opt in ((ours, fast), (theirs, ref)):
                for p, grad in zip(params, step_grads):
                    p.grad = grad.clone()
                with fastml.use_backend("cpp"):
                    opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


def expected_vector_bytes(isa: list[str]) -> int:
    """The SIMD vector of a build whose predefined macros are ``isa`` (fastml._C.isa.split())."""
    return 64 if "avx512f" in isa else 32 if "avx2" in isa else 16


def main(expected_isa):
    status = _backend.status("cpp")
    assert status.present, status.reason
    loaded = _cpp.module()
    isa = loaded.isa.split()
    # "avx2": the module must have been compiled for it; "-avx512f": must not have been.
    wrong = [f for f in expected_isa if (f[1:] in isa if f.startswith("-") else f not in isa)]
    assert not wrong, f"{loaded.__name__} was compiled for [{loaded.isa}], against {wrong}"
    # Its register tiles are sized for that target's vectors (AVX2: 32 bytes, not AVX-512's 64).
    assert loaded.vector_bytes == expected_vector_bytes(isa), \
        f"{loaded.__name__} [{loaded.isa}] has {loaded.vector_bytes}-byte vectors"
    for dtype in DTYPES:
        check_ops(dtype)
        check_optimizers(dtype)
    print(f"{loaded.__name__} [{loaded.isa}] level {_cpp.cpu_level()['level']}: ok")


if __name__ == "__main__":
    main(sys.argv[1:])
