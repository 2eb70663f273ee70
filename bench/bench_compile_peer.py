"""The course's models, one training step each, against torch.compile: a peer that also removes
eager torch's per-op overhead and fuses elementwise work, by code generation rather than
hand-written kernels. fastml should be at least as fast where a course user could reach for it.

One step: forward, cross-entropy, backward, SGD (lr 0.05), batch 256 of 28x28 images.
- softmax regression: Flatten, Linear(784, 10);
- MLP: Flatten, Linear(784, 256), ReLU, Linear(256, 10);
- LeNet: conv 1→6 5x5 (padding 2), ReLU, pool 2, conv 6→16 5x5, ReLU, pool 2, 400→120→84→10.

Implementations:
- torch: the eager model, nn.CrossEntropyLoss, torch.optim.SGD;
- torch-compile: ``torch.compile`` (inductor, default mode) of the model and loss together, so
  forward and backward are generated code; torch.optim.SGD after it. Compiled before timing;
  skipped with inductor's error where it cannot compile here (no C++ compiler);
- auto / cpp / numba: ``fastml.patch`` of the eager model (LeNet: fastml's fused conv blocks, as
  the course profile's LeNet step), fastml.nn.CrossEntropyLoss, fastml.optim.SGD; auto tuned
  (``fastml.tune``) before timing.

    python -m pytest bench/bench_compile_peer.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import fastml
from fastml import _bench

BATCH = 256
MODELS = ("softmax_regression", "mlp", "lenet")

pytestmark = [pytest.mark.ops("linear", "cross_entropy", "sgd", "conv2d_relu_max_pool2d"),
              pytest.mark.baselines("torch-compile"), pytest.mark.devices("cpu")]


def build(name: str, fast: bool) -> torch.nn.Module:
    if name == "lenet":
        return _bench.lenet(fast)
    if name == "softmax_regression":
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    else:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 10))
    if fast:
        fastml.patch(model)
    return model


class WithLoss(torch.nn.Module):
    """The model and its loss as one module, for torch.compile to see both."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, labels):
        return self.loss(self.model(images), labels)


@pytest.mark.parametrize("name", MODELS)
def test_course_step(benchmark, backend, device, name):
    benchmark.group = f"course step {name} batch {BATCH}"
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (BATCH,), generator=gen)
    torch.manual_seed(0)
    state = build(name, False).state_dict()
    fast = backend not in ("torch", "torch-compile")
    model = build(name, fast)
    model.load_state_dict(dict(zip(model.state_dict(), state.values())))
    loss = WithLoss(model, fastml.nn.CrossEntropyLoss() if fast else torch.nn.CrossEntropyLoss())
    if backend == "torch-compile":
        loss = torch.compile(loss)
    optimizer = (fastml.optim.SGD if fast else torch.optim.SGD)(model.parameters(), lr=0.05)

    def step():
        value = loss(images, labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        return value

    try:
        step()  # compiles (torch.compile), loads kernels and settles the measured choice (fastml)
    except Exception as error:  # noqa: BLE001  (inductor's failures have many types)
        if backend != "torch-compile":
            raise
        pytest.skip(f"torch.compile cannot compile here: {type(error).__name__}: {error}"[:300])
    if backend == "auto":
        fastml.tune(model, images)  # the layers' measured choices, forward and backward, before timing
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)
