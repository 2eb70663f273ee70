"""fastml.patch(model, channels_last=True) (fastml/_layout.py): the model's activations in the
channels-last layout, converted once at its input and back at its output, kept by fastml.tune only
where the whole model measured faster so. Patched against unpatched in float64, train and eval."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_close, magnitude, prefer
from torch import nn

import fastml
from fastml import _layout

CL = torch.channels_last


class Probe(nn.Module):
    """Records the layout of what reaches it: what the model's inside sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=CL) and not x.is_contiguous())
        return x


def small_cnn(head: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), Probe(), nn.MaxPool2d(2),
              nn.Conv2d(6, 8, 3, groups=2)]
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def pair(rng, head=True, dtype=torch.float64):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    reference = small_cnn(head).to(dtype)
    model = copy.deepcopy(reference)
    report = fastml.patch(model, channels_last=True)
    return reference, model, report


def outputs_and_gradients(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    grads = torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)).sum(),
                                [x, *model.parameters()])
    return [out.detach(), *grads]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_values_and_gradients_inside_channels_last(rng, mode):
    reference, model, report = pair(rng)
    assert report.layout and "layout" in str(report)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=rng)
    for m in (reference, model):
        getattr(m, mode)()
    for got, expected in zip(outputs_and_gradients(model, x), outputs_and_gradients(reference, x)):
        assert_close(got, expected, scale=magnitude(expected))
    probe = model[3]
    assert probe.seen == [True]  # the inside ran channels-last
    assert not x.is_contiguous(memory_format=CL) or x.is_contiguous()  # the caller's input is untouched


def test_a_4d_output_comes_back_in_the_inputs_layout(rng):
    reference, model, _ = pair(rng, head=False)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=rng)
    out = model(x)
    assert out.is_contiguous() and out.stride() == reference(x).stride()
    assert_close(out, reference(x), scale=magnitude(out))
    already = x.contiguous(memory_format=CL)  # given channels-last: torch's answer is channels-last too
    assert model(already).stride() == reference(already).stride()
    assert model(input=x).is_contiguous()  # a keyword input is converted too


def test_unpatch_removes_the_conversion_and_patching_twice_adds_it_once(rng):
    reference, model, _ = pair(rng)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    again = fastml.patch(model, channels_last=True)
    assert not again.layout and (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    undone = fastml.unpatch(model)
    assert undone.layout and "layout" in str(undone)
    assert not model._forward_pre_hooks and not model._forward_hooks and _layout.of(model) is None
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=rng)
    model(x)
    assert model[3].seen == [False]


def test_copies_and_pickles_keep_the_conversion(rng):
    reference, model, _ = pair(rng)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=rng)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _layout.of(copied) is not None and _layout.of(copied) is not _layout.of(model)
        copied[3].seen.clear()
        assert_close(copied(x), reference(x), scale=magnitude(reference(x)))
        assert copied[3].seen == [True]
        fastml.unpatch(copied)
        assert not copied._forward_pre_hooks
    assert _layout.of(model) is not None  # the original keeps its own


def test_a_failed_call_leaves_nothing_behind(rng):
    _, model, _ = pair(rng)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 9, 10, dtype=torch.float64))  # wrong channel count
    assert _layout.of(model)._converted == []


def test_bad_argument():
    with pytest.raises(TypeError, match="channels_last"):
        fastml.patch(small_cnn(), channels_last="yes")


@pytest.mark.parametrize("winner", ["channels_last", "reference"])
def test_tune_keeps_the_layout_only_where_the_model_measured_faster(monkeypatch, rng, winner):
    prefer(monkeypatch, winner)
    reference, model, _ = pair(rng, dtype=torch.float32)
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 9, 10, generator=rng)
    with torch.no_grad():
        table = fastml.tune(model, x)
        layout_rows = [row for row in table.rows if row.op == "layout"]
        assert [row.choice for row in layout_rows] == [winner]
        assert _layout.of(model).enabled is (winner == "channels_last")
        model[3].seen.clear()
        out = model(x)
        assert model[3].seen == [winner == "channels_last"]
        torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    assert ("channels-last activations" if winner == "channels_last" else "the input's layout") in str(table)
