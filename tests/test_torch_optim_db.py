"""fastml.optim's SGD, Adam and AdamW on PyTorch's own optimizer test configurations.

``torch.testing._internal.common_optimizers.optim_db`` is the table PyTorch's test_optim.py runs
every optimizer over: constructor kwargs (tensor lr, weight decay, momentum, dampening, nesterov,
maximize, amsgrad, ...) and the arguments each must reject. Each fastml optimizer runs beside its
torch twin on every configuration, in float32, float64 and complex64, one param group or two, on a
parameter list that mixes what the kernels walk directly with what they must stage (0-dim, empty,
transposed), a gradient left None on one step. After five steps the parameters, the state and the
param groups must agree; each state_dict loads into the other optimizer; repr matches; the bad
arguments raise the twin's exception with the twin's message.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import raised
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import fastml.optim

TWINS = {torch.optim.SGD: fastml.optim.SGD, torch.optim.Adam: fastml.optim.Adam, torch.optim.AdamW: fastml.optim.AdamW}
ENTRIES = [info for info in optim_db if info.optim_cls in TWINS]
DTYPES = [torch.float32, torch.float64, torch.complex64]
STEPS = 5
# per dtype (rtol, atol) after STEPS steps: a fused a * b + c against torch's two roundings
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-13), torch.complex64: (1e-5, 1e-6)}


def test_optim_db_has_every_twin():
    assert {info.optim_cls for info in ENTRIES} == set(TWINS)


def parameters(dtype):
    """Walkable and staged tensors mixed: 2-D, 1-D, 0-dim, empty, 3-D, transposed."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in [(3, 5), (7,), (), (0, 4), (2, 3, 4)]]
    values.append(torch.randn(6, 4, generator=g, dtype=torch.float64).to(dtype).t())
    return values


def leaves(values):
    """Leaf copies with each value's strides (the transposed one stays transposed)."""
    return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).copy_(v).requires_grad_() for v in values]


def build(cls, params, kwargs, two_groups):
    kwargs = copy.deepcopy(kwargs)  # a tensor lr must not be shared between the twins
    if two_groups:
        return cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.003}], **kwargs)
    return cls(params, **kwargs)


def assert_same(actual, expected, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("two_groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", ENTRIES, ids=lambda i: i.optim_cls.__name__)
def test_steps_match_twin(info, dtype, two_groups):
    configs = info.optim_inputs_func(device="cpu", dtype=dtype)
    assert configs
    for config in configs:
        values = parameters(dtype)
        theirs, ours = leaves(values), leaves(values)
        torch_optimizer = build(info.optim_cls, theirs, config.kwargs, two_groups)
        optimizer = build(TWINS[info.optim_cls], ours, config.kwargs, two_groups)
        assert repr(optimizer).replace(type(optimizer).__name__, "") == \
            repr(torch_optimizer).replace(type(torch_optimizer).__name__, ""), config.desc
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 + step)
            for a, b in zip(theirs, ours):
                grad = torch.randn(a.shape, generator=g, dtype=torch.float64).to(dtype)
                a.grad, b.grad = (None, None) if step == 2 and a.dim() == 1 else (grad.clone(), grad.clone())
            torch_optimizer.step()
            optimizer.step()
        where = f"{config.desc}, {'two groups' if two_groups else 'one group'}"
        assert_same(ours, theirs, dtype, f"{where}: parameters")
        expected, actual = torch_optimizer.state_dict(), optimizer.state_dict()
        assert actual["param_groups"] == expected["param_groups"], where
        assert_same(actual["state"], expected["state"], dtype, f"{where}: state")
        # each state_dict loads into the other optimizer, and steps on from there the same
        build(TWINS[info.optim_cls], leaves(values), config.kwargs, two_groups).load_state_dict(expected)
        build(info.optim_cls, leaves(values), config.kwargs, two_groups).load_state_dict(actual)



@pytest.mark.parametrize("info", [i for i in ENTRIES if i.optim_error_inputs_func is not None],
                         ids=lambda i: i.optim_cls.__name__)
def test_rejects_what_twin_rejects(info):
    cases = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert cases
    rejected = 0
    for case in cases:
        given = case.optimizer_error_input

        def attempt(cls):
            optimizer = cls(given.params, **given.kwargs)
            if case.error_on == OptimizerErrorEnum.STEP_ERROR:
                optimizer.step()

        expected = raised(lambda: attempt(info.optim_cls))
        rejected += isinstance(expected, case.error_type)
        actual = raised(lambda: attempt(TWINS[info.optim_cls]))
        assert type(actual) is type(expected) and str(actual) == str(expected), \
            f"{given.desc}: fastml raised {actual!r}, torch {expected!r}"
    assert rejected, "torch's optimizer rejected none of the table's bad arguments"
