"""fastml.data: the course's synthetic data set and the in-memory minibatch iterator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastml.data import Batches, InvalidArgumentError, batches, synthetic_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seeded(rng: torch.Generator) -> torch.Generator:
    """A new generator seeded from the test's fresh random one (to draw the same thing twice)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=rng)))


# -- synthetic_linear ---------------------------------------------------------------------------

@pytest.mark.parametrize("w", [[2, -3.4], np.array([2.0, -3.4]), torch.tensor([2, -3])], ids=["list", "numpy", "int-tensor"])
def test_synthetic_linear_shapes_and_default_dtype(w, rng):
    X, y = synthetic_linear(w, 4.2, 1000, generator=rng)
    assert X.shape == (1000, 2) and y.shape == (1000, 1)
    assert X.dtype == y.dtype == torch.float32
    assert X.device.type == y.device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_synthetic_linear_follows_a_floating_w(dtype, device, rng):
    w = torch.tensor([1.5, -0.5, 2.0], dtype=dtype, device=device)
    X, y = synthetic_linear(w, torch.tensor(0.7, dtype=torch.float64), 17, generator=rng)
    assert X.shape == (17, 3) and y.shape == (17, 1)
    assert X.dtype == y.dtype == dtype and X.device == y.device == w.device


def test_synthetic_linear_is_the_model_plus_noise(rng):
    w, b = torch.randn(5, generator=rng, dtype=torch.float64), float(torch.randn((), generator=rng))
    X, y = synthetic_linear(w, b, 20000, noise_std=0.1, generator=rng)
    noise = (y - (X @ w).unsqueeze(1) - b).squeeze(1)
    assert abs(noise.mean().item()) < 0.01
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)
    assert X.mean().item() == pytest.approx(0.0, abs=0.02)
    assert X.std().item() == pytest.approx(1.0, rel=0.02)
    # without noise the labels are exactly the linear model
    X0, y0 = synthetic_linear(w, b, 50, noise_std=0.0, generator=rng)
    torch.testing.assert_close(y0, (X0 @ w).unsqueeze(1) + b)


def test_synthetic_linear_is_reproducible_with_a_generator(rng):
    first = seeded(rng)
    again = torch.Generator().manual_seed(first.initial_seed())
    X1, y1 = synthetic_linear([2, -3.4], 4.2, 100, generator=first)
    X2, y2 = synthetic_linear([2, -3.4], 4.2, 100, generator=again)
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    X3, _ = synthetic_linear([2, -3.4], 4.2, 100, generator=first)  # the generator moved on
    assert not torch.equal(X1, X3)


def test_synthetic_linear_with_no_examples():
    X, y = synthetic_linear([1.0, 2.0, 3.0], 0.5, 0)
    assert X.shape == (0, 3) and y.shape == (0, 1)


@pytest.mark.parametrize("num_examples", [-1, 2.5, True, "10"])
def test_synthetic_linear_rejects_bad_num_examples(num_examples):
    with pytest.raises(ValueError, match="num_examples"):
        synthetic_linear([2, -3.4], 4.2, num_examples)


@pytest.mark.parametrize("w", [[[2.0], [-3.4]], torch.ones(2, 1), 3.0, torch.tensor(1.0)], ids=["nested-list", "2-D", "scalar", "0-dim"])
def test_synthetic_linear_rejects_w_not_1d(w):
    with pytest.raises(ValueError, match="w must be 1-D"):
        synthetic_linear(w, 4.2, 10)


def test_synthetic_linear_rejects_complex_w():
    """A complex tensor is refused as a complex list is (torch would drop the imaginary part)."""
    with pytest.raises(InvalidArgumentError, match="w must be real"):
        synthetic_linear(torch.tensor([1 + 5j]), 0.0, 3)


@pytest.mark.parametrize("noise_std", [-0.01, float("nan"), "0.1"])
def test_synthetic_linear_rejects_bad_noise_std(noise_std):
    with pytest.raises(ValueError, match="noise_std"):
        synthetic_linear([2, -3.4], 4.2, 10, noise_std=noise_std)


@pytest.mark.parametrize("b", [torch.ones(2), "4.2", None])
def test_synthetic_linear_rejects_bad_b(b):
    with pytest.raises(ValueError, match="b must be"):
        synthetic_linear([2, -3.4], b, 10)


# -- batches ------------------------------------------------------------------------------------

def indexed(n: int, device="cpu"):
    """Features whose first column is the example's index, labels tied to it: a batch whose rows
    do not line up across tensors, or an example seen twice, shows."""
    X = torch.stack([torch.arange(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)], 1).to(device)
    y = (torch.arange(n) * 3 + 1).to(device)
    return X, y


@pytest.fixture(params=["copy-per-pass", "gather-per-batch"])
def strategy(request, monkeypatch):
    """Both ways a shuffled pass is cut: one gather then views, or one gather per minibatch."""
    if request.param == "gather-per-batch":
        monkeypatch.setattr(Batches, "COPY_LIMIT_BYTES", 0)
    return request.param


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n, batch_size", [(1000, 10), (37, 5), (10, 3), (7, 7), (5, 8), (1, 1), (0, 4), (64, 1)])
def test_every_example_once_per_pass(n, batch_size, shuffle, drop_last, strategy, rng):
    X, y = indexed(n)
    loader = batches(X, y, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=rng)
    expected_len = n // batch_size if drop_last else math.ceil(n / batch_size)
    assert len(loader) == expected_len
    for _ in range(2):  # re-iterable
        seen, sizes = [], []
        for batch in loader:
            assert isinstance(batch, tuple) and len(batch) == 2
            Xb, yb = batch
            assert Xb.shape[1:] == (2,) and Xb.shape[0] == yb.shape[0]
            assert Xb.dtype == torch.float64 and yb.dtype == torch.int64
            idx = Xb[:, 0].long()
            assert torch.equal(yb, idx * 3 + 1), "rows of X and y do not line up"
            seen.append(idx)
            sizes.append(Xb.shape[0])
        assert len(sizes) == expected_len
        assert all(s == batch_size for s in sizes[:-1])
        if sizes:
            assert sizes[-1] == (batch_size if drop_last or n % batch_size == 0 else n % batch_size)
        seen = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
        covered = expected_len * batch_size if drop_last else n
        assert seen.numel() == covered
        assert seen.unique().numel() == covered, "an example came twice in one pass"
        if not shuffle:
            assert torch.equal(seen, torch.arange(covered))


def test_each_pass_reshuffles(strategy, rng):
    X, y = indexed(200)
    loader = batches(X, y, batch_size=16, generator=rng)
    orders = [torch.cat([Xb[:, 0] for Xb, _ in loader]) for _ in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert not torch.equal(orders[0], torch.arange(200, dtype=torch.float64))


def test_shuffle_is_reproducible_with_a_generator(strategy, rng):
    X, y = indexed(101)
    first = seeded(rng)
    again = torch.Generator().manual_seed(first.initial_seed())
    a = [Xb[:, 0] for _ in range(2) for Xb, _ in batches(X, y, batch_size=10, generator=first)]
    b = [Xb[:, 0] for _ in range(2) for Xb, _ in batches(X, y, batch_size=10, generator=again)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_global_seed_reproduces_without_a_generator():
    X, y = indexed(50)
    torch.manual_seed(1234)
    a = [Xb for Xb, _ in batches(X, y, batch_size=7)]
    torch.manual_seed(1234)
    b = [Xb for Xb, _ in batches(X, y, batch_size=7)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_a_single_tensor_still_yields_tuples(rng):
    X = torch.randn(23, 4, generator=rng)
    out = list(batches(X, batch_size=5, shuffle=False))
    assert all(isinstance(batch, tuple) and len(batch) == 1 for batch in out)
    assert torch.equal(torch.cat([b for (b,) in out]), X)


def test_unshuffled_batches_are_views(rng):
    X = torch.randn(30, 3, generator=rng)
    (first,) = next(iter(batches(X, batch_size=8, shuffle=False)))
    assert first.data_ptr() == X.data_ptr()


def test_many_tensors_of_any_rank_and_dtype(strategy, rng):
    images = torch.randn(41, 1, 5, 5, generator=rng)
    labels = torch.randint(0, 10, (41,), generator=rng)
    masks = torch.rand(41, 3, generator=rng) > 0.5
    total = 0
    for xb, lb, mb in batches(images, labels, masks, batch_size=6, generator=rng):
        assert xb.shape[1:] == (1, 5, 5) and lb.dtype == torch.int64 and mb.dtype == torch.bool
        match = (images.unsqueeze(0) == xb.unsqueeze(1)).flatten(2).all(2)  # (batch, 41)
        rows = match.float().argmax(1)
        assert torch.equal(labels[rows], lb) and torch.equal(masks[rows], mb)
        total += xb.shape[0]
    assert total == 41


@pytest.mark.parametrize("device", DEVICES)
def test_batches_stay_on_the_tensors_device(device, strategy, rng):
    X, y = indexed(33, device)
    for Xb, yb in batches(X, y, batch_size=4, generator=rng if device == "cpu" else None):
        assert Xb.device == yb.device == X.device


def test_non_contiguous_inputs(strategy, rng):
    X = torch.randn(12, 40, generator=rng).T  # (40, 12), not contiguous
    seen = torch.cat([xb for (xb,) in batches(X, batch_size=9, generator=rng)])
    assert torch.equal(seen[seen[:, 0].argsort()], X[X[:, 0].argsort()])


def test_repr_and_len():
    loader = batches(torch.zeros(10, 2), torch.zeros(10), batch_size=4, drop_last=True)
    assert len(loader) == 2 and "batch_size=4" in repr(loader)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, 10.0, True, None, "10"])
def test_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        batches(torch.zeros(10, 2), batch_size=batch_size)


def test_batch_size_is_keyword_only():
    with pytest.raises(TypeError):
        batches(torch.zeros(10, 2), torch.zeros(10), 5)


def test_rejects_no_tensors():
    with pytest.raises(ValueError, match="tensors"):
        batches(batch_size=4)


def test_rejects_different_first_dims():
    with pytest.raises(ValueError, match="first dimension.*tensors\\[1\\] has 9"):
        batches(torch.zeros(10, 2), torch.zeros(9), batch_size=4)


@pytest.mark.parametrize("bad", [np.zeros(10), list(range(10)), 3.0])
def test_rejects_non_tensors(bad):
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a torch.Tensor"):
        batches(torch.zeros(10, 2), bad, batch_size=4)
    with pytest.raises(TypeError):  # also a TypeError, for code that expects one
        batches(torch.zeros(10, 2), bad, batch_size=4)


def test_rejects_0dim_tensor():
    with pytest.raises(ValueError, match=r"tensors\[0\] is 0-dim"):
        batches(torch.tensor(1.0), batch_size=1)


def test_rejects_bad_generator():
    with pytest.raises(ValueError, match="generator"):
        batches(torch.zeros(10, 2), batch_size=4, generator=0)


def test_errors_are_invalid_argument_errors():
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, TypeError)
