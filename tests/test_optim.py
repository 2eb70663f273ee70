"""fastml.optim: SGD, Adam, AdamW and sgd_ against torch.optim and the course's sgd, on every
backend. Each fastml optimizer runs beside its torch twin on identical parameters and gradients;
after every run the parameters and the optimizer state must agree (conftest.STEP_TOLERANCES).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from conftest import STEP_TOLERANCES, assert_steps_close, prefer, rand

import fastml
from fastml import optim

STEPS = 20
# The Triton interpreter takes ~30 ms a launch: there run_twins takes 6 steps, which still pass a
# fresh and a running momentum buffer, gradients that arrive late, and changing bias corrections
# (its 69 cases took 44 s of the default run at 20 steps).
INTERPRETED_STEPS = 6
# Many shapes in one group: 0-dim, one element, odd and prime sizes, and one spanning several
# blocks of the Triton launch under the interpreter (1024 elements each).
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (33, 17), (1031,)]

SGD_GRID = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
            for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.05),
                                                     (False, True))]
ADAM_GRID = [dict(weight_decay=wd, amsgrad=a, maximize=mx)
             for wd, a, mx in itertools.product((0.0, 0.1), (False, True), (False, True))]


def _sgd_allowed(kw) -> bool:
    return not kw["nesterov"] or (kw["momentum"] > 0 and kw["dampening"] == 0)


def make_params(dtype, device, gen, shapes=SHAPES):
    return [rand(*s, dtype=dtype, device=device, generator=gen) for s in shapes]


def twin_params(values):
    """Two independent leaf copies of the same values: one for fastml, one for torch."""
    return ([v.clone().requires_grad_() for v in values], [v.clone().requires_grad_() for v in values])


def set_grads(ours, theirs, gen, skip=(), layout=lambda i, g: g):
    """The same fresh random gradient on both copies (none for the indices in ``skip``);
    ``layout(i, g)`` may re-lay the gradient of tensor i out in memory."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i in skip:
            a.grad = b.grad = None
            continue
        if a.dtype.is_complex:
            g = torch.randn(a.shape, dtype=a.dtype, generator=gen).to(a.device)
        else:
            g = rand(*a.shape, dtype=a.dtype, device=a.device, generator=gen)
        g = layout(i, g)
        a.grad, b.grad = g.clone(), g.clone()


def assert_same_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, params_ours, params_theirs):
    for a, b in zip(params_ours, params_theirs):
        assert_steps_close(a, b)
        sa, sb = ours.state.get(a, {}), theirs.state.get(b, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sb[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device, key
                assert_steps_close(sa[key], sb[key])
            else:
                assert sa[key] == sb[key], key


def run_twins(backend, fastml_cls, torch_cls, kwargs, dtype, gen, steps=None, late=(), shapes=SHAPES, values=None):
    """``steps`` steps (default STEPS, INTERPRETED_STEPS on the Triton interpreter) of both
    optimizers on the same problem (``values``, or random ones of ``shapes``); parameters in
    ``late`` get no gradient during the first half."""
    if steps is None:
        steps = INTERPRETED_STEPS if backend.interpreted else STEPS
    if values is None:
        values = make_params(dtype, backend.device, gen, shapes)
    ours, theirs = twin_params(values)
    opt_ours, opt_theirs = fastml_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(steps):
        set_grads(ours, theirs, gen, skip=late if step < steps // 2 else ())
        opt_ours.step()
        opt_theirs.step()
    assert_same_state(opt_ours, opt_theirs, ours, theirs)
    return opt_ours, ours


# ---------------------------------------------------------------------------------------- SGD


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", SGD_GRID, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_matches_torch(backend, rng, dtype, kwargs):
    if not _sgd_allowed(kwargs):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
            optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, **kwargs)
        return
    run_twins(backend, optim.SGD, torch.optim.SGD, dict(lr=0.05, **kwargs), dtype, rng, late=(1, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
    (dict(lr=0.1, weight_decay=-1e-4), "Invalid weight_decay value"),
    (dict(lr=0.1, nesterov=True), "Nesterov momentum requires"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
])
def test_sgd_refuses_what_torch_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=message):
        optim.SGD([torch.zeros(1, requires_grad=True)], **kwargs)


def test_sgd_is_a_torch_sgd():
    p = torch.zeros(3, requires_grad=True)
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults == torch.optim.SGD([p], lr=0.1, momentum=0.9).defaults
    assert "SGD (" in repr(opt)


# ---------------------------------------------------------------------------------------- Adam


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", ADAM_GRID, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("pair", [(optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)],
                         ids=["Adam", "AdamW"])
def test_adam_matches_torch(backend, rng, dtype, kwargs, pair):
    run_twins(backend, *pair, dict(lr=0.05, betas=(0.8, 0.95), **kwargs), dtype, rng, late=(0, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ours_cls, torch_cls", [(optim.Adam, torch.optim.Adam), (optim.SGD, torch.optim.SGD)],
                         ids=["Adam", "SGD"])
def test_weight_decay_that_cancels_the_gradient(backend, dtype, ours_cls, torch_cls):
    """Gradients within a millionth of -weight_decay · p: the decayed sum keeps a few bits, and
    Adam's first step divides it by its own magnitude, so rounding weight_decay · p before the
    add (torch rounds once: grad.add(param, alpha=...)) moved a float32 parameter by up to ~1e-4
    of lr (a random test met one at 2.7e-7 left of terms of 0.089)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4099, dtype=dtype, generator=gen)
    g = -0.1 * p * (1 + 1e-6 * torch.randn(4099, dtype=dtype, generator=gen))
    ours, theirs = twin_params([p.to(backend.device)])
    kwargs = dict(lr=0.05, weight_decay=0.1, maximize=True)
    extra = dict(betas=(0.8, 0.95)) if ours_cls is optim.Adam else dict(momentum=0.9)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs, **extra), torch_cls(theirs, **kwargs, **extra)
    for _ in range(3):
        ours[0].grad, theirs[0].grad = (-g).to(backend.device), (-g).to(backend.device)
        opt_ours.step()
        opt_theirs.step()
    assert_same_state(opt_ours, opt_theirs, ours, theirs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "Invalid learning rate"),
    (dict(eps=-1.0), "Invalid epsilon value"),
    (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value"),
])
@pytest.mark.parametrize("pair", [(optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)],
                         ids=["Adam", "AdamW"])
def test_adam_refuses_what_torch_refuses(kwargs, message, pair):
    for cls in pair:
        with pytest.raises(ValueError, match=message):
            cls([torch.zeros(1, requires_grad=True)], **kwargs)


def test_adam_lerp_weight_at_or_above_half(backend, rng):
    """beta1 <= 0.5 puts torch.lerp on its second formula; the kernels follow it."""
    run_twins(backend, optim.Adam, torch.optim.Adam, dict(lr=0.05, betas=(0.3, 0.9)), torch.float32, rng)


def test_adamw_default_weight_decay_and_state():
    p = torch.zeros(3, requires_grad=True)
    opt = optim.AdamW([p])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults == torch.optim.AdamW([p]).defaults


# ------------------------------------------------------------------------ shared behaviour


OPTIMIZERS = [
    (optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
    (optim.Adam, torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=0.05)),
]
OPT_IDS = ["SGD", "Adam", "AdamW"]


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_noncontiguous_parameters(backend, rng, ours_cls, torch_cls, kwargs):
    """Transposed parameters with gradients laid out alike (walked in place) or contiguous
    (staged), and a strided slice (staged)."""
    dtype, device = torch.float32, backend.device
    base = [rand(9, 5, dtype=dtype, device=device, generator=rng).t(),
            rand(6, 4, 3, dtype=dtype, device=device, generator=rng).permute(2, 0, 1),
            rand(8, 10, dtype=dtype, device=device, generator=rng)[:, ::3]]
    ours = [b.clone().requires_grad_() if i < 2 else b.detach().requires_grad_() for i, b in enumerate(base)]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    assert not any(t.is_contiguous() for t in ours)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(STEPS):
        # Tensor 0's gradient alternates: laid out like the parameter (.clone() keeps a dense
        # layout), or contiguous.
        set_grads(ours, theirs, rng, layout=lambda i, g: g.t().contiguous().t() if i == 0 and step % 2 else g)
        opt_ours.step()
        opt_theirs.step()
    assert_same_state(opt_ours, opt_theirs, ours, theirs)


def set_expanded_grads(ours, theirs, gen):
    """set_grads, with the gradient of tensor 1 a broadcast of one value on both copies (its
    elements share one memory location), as ``grad.expand`` leaves it."""
    set_grads(ours, theirs, gen)
    for params in (ours, theirs):
        grad = params[1].grad
        params[1].grad = grad.reshape(-1)[:1].expand(grad.shape)
    assert torch._debug_has_internal_overlap(ours[1].grad) == 1


@pytest.mark.parametrize("zero_grad", [False, True])
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_expanded_gradients(backend, rng, ours_cls, torch_cls, kwargs, zero_grad):
    """A gradient whose elements overlap in memory: torch's steps read it, and zero it; a kernel's
    staged copy could not be written back into it (copy_ refused it: a RuntimeError)."""
    values = [rand(6, 4, generator=rng), rand(5, 3, generator=rng), rand(7, generator=rng)]
    ours, theirs = twin_params(values)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for _ in range(3):
        set_expanded_grads(ours, theirs, rng)
        opt_ours.step(zero_grad=zero_grad)
        opt_theirs.step()
        if zero_grad:
            assert all(torch.count_nonzero(p.grad) == 0 for p in ours)
            for p in theirs:
                p.grad.zero_()
        assert_same_state(opt_ours, opt_theirs, ours, theirs)


def test_sgd_underscore_takes_expanded_gradients(backend, rng):
    """The course's loop reads an expanded gradient and zeroes it; so must sgd_."""
    values = make_params(torch.float32, backend.device, rng, [(6, 4), (5, 3)])
    ours, theirs = twin_params(values)
    for _ in range(3):
        set_expanded_grads(ours, theirs, rng)
        optim.sgd_(ours, 0.03, 10)
        course_sgd(theirs, 0.03, 10)
        assert all(torch.count_nonzero(p.grad) == 0 for p in ours)
    for a, b in zip(ours, theirs):
        assert_steps_close(a, b)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_param_groups_tensor_lr_and_scheduler(backend, rng, ours_cls, torch_cls, kwargs):
    """Groups with their own hyperparameters, one added mid-training, a tensor lr, a scheduler."""
    dtype, device = torch.float64, backend.device
    values = make_params(dtype, device, rng, [(5, 3), (4,), (17,), (2, 2)])
    ours, theirs = twin_params(values)

    def build(cls, ps):
        opt = cls([{"params": ps[:2]}, {"params": [ps[2]], "lr": torch.tensor(0.01, dtype=torch.float64),
                                        "weight_decay": 0.2}], **kwargs)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    (opt_ours, sched_ours), (opt_theirs, sched_theirs) = build(ours_cls, ours), build(torch_cls, theirs)
    for step in range(STEPS):
        if step == 5:
            opt_ours.add_param_group({"params": [ours[3]], "lr": 0.2})
            opt_theirs.add_param_group({"params": [theirs[3]], "lr": 0.2})
        set_grads(ours, theirs, rng, skip=(3,) if step < 5 else ())
        opt_ours.step()
        opt_theirs.step()
        sched_ours.step()
        sched_theirs.step()
    assert_same_state(opt_ours, opt_theirs, ours, theirs)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("pair", [(optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)],
                         ids=["Adam", "AdamW"])
def test_adam_float32_tensor_lr_on_float64_parameters(backend, rng, pair, weight_decay):
    """torch rounds lr / bias_correction1 (and AdamW's 1 - lr·wd) to the tensor lr's dtype: a
    float32 lr on float64 parameters must give torch's values to float64's step tolerance, not
    differ by float32's rounding (4e-10 for Adam, 4e-8 for AdamW, before it was matched)."""
    values = make_params(torch.float64, backend.device, rng, [(5, 3), (17,)])
    ours, theirs = twin_params(values)
    lr = torch.tensor(0.013)  # not exact in float32
    opt_ours = pair[0](ours, lr=lr, weight_decay=weight_decay)
    opt_theirs = pair[1](theirs, lr=lr, weight_decay=weight_decay)
    for _ in range(STEPS):
        set_grads(ours, theirs, rng)
        opt_ours.step()
        opt_theirs.step()
    assert_same_state(opt_ours, opt_theirs, ours, theirs)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("direction", ["torch_to_fastml", "fastml_to_torch"])
def test_state_dict_moves_between_fastml_and_torch(backend, rng, ours_cls, torch_cls, kwargs, direction):
    """Ten steps on one optimizer, its state_dict loaded into the other, ten more steps there:
    the same as twenty steps on torch's alone."""
    dtype, device = torch.float32, backend.device
    values = make_params(dtype, device, rng)
    moved, reference = twin_params(values)
    first, second = (torch_cls, ours_cls) if direction == "torch_to_fastml" else (ours_cls, torch_cls)
    opt_moved, opt_ref = first(moved, **kwargs), torch_cls(reference, **kwargs)
    for step in range(STEPS):
        if step == STEPS // 2:
            state = copy.deepcopy(opt_moved.state_dict())
            opt_moved = second(moved, **kwargs)
            opt_moved.load_state_dict(state)
            assert opt_moved.state_dict()["param_groups"] == state["param_groups"]
        set_grads(moved, reference, rng)
        opt_moved.step()
        opt_ref.step()
    assert_same_state(opt_moved, opt_ref, moved, reference)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_step_with_zero_grad_clears_gradients_in_the_same_pass(backend, rng, ours_cls, torch_cls, kwargs):
    values = make_params(torch.float32, backend.device, rng)
    ours, theirs = twin_params(values)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for _ in range(3):
        set_grads(ours, theirs, rng)
        kept = [p.grad for p in ours]
        opt_ours.step(zero_grad=True)
        opt_theirs.step()
        for p, g in zip(ours, kept):
            assert p.grad is g, "the gradient tensors stay allocated"
            assert torch.count_nonzero(p.grad) == 0
    assert_same_state(opt_ours, opt_theirs, ours, theirs)


def test_one_launch_per_device_and_dtype(backend, rng, monkeypatch):
    """A group of float32 and float64 tensors (complex among them): one kernel call per dtype
    for each optimizer."""
    if backend.name == "reference":
        pytest.skip("the reference walks tensor by tensor; the launch count is the kernels' promise")
    device = backend.device
    params = ([rand(*s, dtype=torch.float32, device=device, generator=rng) for s in SHAPES]
              + [rand(*s, dtype=torch.float64, device=device, generator=rng) for s in SHAPES[:4]]
              + [torch.randn(3, 2, dtype=torch.complex64, device=device)])
    params = [p.requires_grad_() for p in params]
    for cls, op_module, fn in [(optim.SGD, "fastml.ops.sgd", "sgd_step"),
                               (optim.Adam, "fastml.ops.adam", "adam_step")]:
        module = fastml._backend.load(op_module, backend.name)
        calls = []
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, **k: (calls.append(a[0][0].dtype), _real(*a, **k)))
        opt = cls(params, lr=0.1, **({"momentum": 0.9} if cls is optim.SGD else {}))
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            calls.clear()
            opt.step()
            assert sorted(map(str, calls)) == ["torch.float32", "torch.float64"], calls


SETTLED_ON = ["reference"] + [name for name in ("cpp", "numba") if fastml._backend.status(name).present]


@pytest.mark.parametrize("settled", SETTLED_ON)
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS + [(optim.SGD, torch.optim.SGD, dict(lr=0.05))],
                         ids=OPT_IDS + ["SGD-plain"])
def test_a_settled_choice_takes_later_layouts_and_dtypes(rng, monkeypatch, settled, ours_cls, torch_cls, kwargs):
    """The measured choice settles a step's shape class (the first tensor's dtype and device, the
    tensor count and size) on uniform lists; a settled reference then runs on the lists as they
    come, with no layout check. Later steps of the same class with a transposed gradient, a
    strided parameter, and (for SGD, whose state torch updates in its own dtype) another dtype
    after the first tensor must still step as torch's."""
    prefer(monkeypatch, settled)
    values = [rand(6, 4, generator=rng), rand(5, generator=rng), rand(3, 3, generator=rng)]
    ours, theirs = twin_params(values)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    layouts = [lambda i, g: g,  # uniform: settles the choice
               lambda i, g: g.t().contiguous().t() if i == 0 else g,  # a gradient laid out transposed
               lambda i, g: g]
    for step, layout in enumerate(layouts):
        if step == 2:  # the same class: the first tensor's dtype and every size kept
            for params in (ours, theirs):
                if ours_cls is optim.SGD:
                    params[1].data = params[1].data.double()
                params[2].data = params[2].data.t()  # a transposed parameter
            # Torch's from here on, from our values: a kernel's earlier float32 steps may round
            # apart from torch's by an ulp, which tensor 1, now float64, must not be held to.
            for a, b in zip(ours, theirs):
                b.data.copy_(a.data)
                for name, value in opt_ours.state[a].items():
                    if isinstance(value, torch.Tensor):
                        opt_theirs.state[b][name].copy_(value)
        set_grads(ours, theirs, rng, layout=layout)
        opt_ours.step()
        opt_theirs.step()
        assert_same_state(opt_ours, opt_theirs, ours, theirs)


@pytest.mark.parametrize("change", ["double", "resize"])
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_state_unlike_its_parameter(backend, rng, ours_cls, torch_cls, kwargs, change):
    """A parameter whose ``.data`` is replaced after its first steps keeps its state: given
    float64 data (as ``model.double()`` does), float32 state, which torch's SGD updates in place
    in its own dtype and torch's Adam refuses; given more elements, state of the old size, which
    torch refuses. fastml must do the same, where a kernel walking the state as its parameter's
    dtype and size read past the end of it (and crashed)."""
    values = [rand(6, 4, generator=rng, device=backend.device), rand(3000, generator=rng, device=backend.device)]
    ours, theirs = twin_params(values)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for _ in range(2):
        set_grads(ours, theirs, rng)
        opt_ours.step()
        opt_theirs.step()
    grown = rand(4000, generator=rng, device=backend.device)
    for params in (ours, theirs):
        params[1].data = params[1].data.double() if change == "double" else grown.clone()
    with torch.no_grad():  # the checked step starts from torch's values (a kernel's float32 rounding
        for a, b in zip(ours, theirs):  # so far would exceed float64's tolerance)
            a.copy_(b)
            for key, value in opt_ours.state[a].items():
                if isinstance(value, torch.Tensor):
                    value.copy_(opt_theirs.state[b][key])
    set_grads(ours, theirs, rng)
    try:
        opt_theirs.step()
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match="dtype" if change == "double" else "size"):
            opt_ours.step()
        assert ("dtype" if change == "double" else "size") in str(error)
        return
    opt_ours.step()
    assert ours_cls is optim.SGD and change == "double"
    assert_same_state(opt_ours, opt_theirs, ours, theirs)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_complex_parameters(backend, rng, ours_cls, torch_cls, kwargs):
    values = [torch.randn(5, 3, dtype=torch.complex64, generator=rng).to(backend.device),
              torch.randn(7, dtype=torch.complex128, generator=rng).to(backend.device)]
    run_twins(backend, ours_cls, torch_cls, kwargs, None, rng, steps=5, values=values)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_half_precision_parameters(backend, rng, ours_cls, torch_cls, kwargs):
    """float16 / bfloat16. The CPU backends run torch's own ops in the half type (the reference),
    so they match torch's optimizer there. The Triton kernel computes in float32 and rounds only
    what it stores, so its oracle is torch's optimizer in float32 on the same values: torch in
    float16 rounds every intermediate, and its v = (1 - beta2)·g² underflows to 0 for small
    gradients (eps = 1e-8 is 0 in float16 too), a division by zero the kernel does not make."""
    for dtype in (torch.float16, torch.bfloat16):
        if backend.name != "triton":
            run_twins(backend, ours_cls, torch_cls, kwargs, dtype, rng, steps=5, shapes=[(7,), (3, 5)])
            continue
        values = make_params(dtype, backend.device, rng, [(7,), (3, 5)])
        ours = [v.clone().requires_grad_() for v in values]
        theirs = [v.float().requires_grad_() for v in values]
        opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
        for _ in range(5):
            for a, b in zip(ours, theirs):
                g = rand(*a.shape, dtype=dtype, device=a.device, generator=rng)
                a.grad, b.grad = g, g.float()
            opt_ours.step()
            opt_theirs.step()
        rtol, atol = STEP_TOLERANCES[dtype]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach().float().cpu(), b.detach().cpu(), rtol=rtol, atol=atol)


def test_sgd_sparse_gradients_take_torch_path(rng):
    weights = torch.randn(10, 3, generator=rng)
    ours, theirs = twin_params([weights])
    opt_ours, opt_theirs = optim.SGD(ours, lr=0.1), torch.optim.SGD(theirs, lr=0.1)
    index = torch.tensor([1, 4, 4, 7])
    for p, opt in ((ours[0], opt_ours), (theirs[0], opt_theirs)):
        torch.nn.functional.embedding(index, p, sparse=True).sum().backward()
        assert p.grad.is_sparse
        opt.step()
    assert torch.equal(ours[0], theirs[0])


@pytest.mark.parametrize("zero_grad", [False, True])
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_a_parameter_listed_twice_is_updated_twice_as_by_torch(ours_cls, torch_cls, kwargs, zero_grad, rng):
    """torch warns of a parameter listed twice in a group, and its for-loop step updates it once
    for each listing: fastml's group then runs torch's step (one launch would update it once)."""
    ours, theirs = twin_params([torch.randn(5, 3, generator=rng), torch.randn(4, generator=rng)])
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt_ours = ours_cls([ours[0], ours[1], ours[0]], **kwargs)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt_theirs = torch_cls([theirs[0], theirs[1], theirs[0]], **kwargs)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=rng) for p in ours]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step(zero_grad=True) if zero_grad and opt is opt_ours else opt.step()
        if zero_grad:
            assert all(not p.grad.any() for p in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_adam_refuses_sparse_gradients_as_torch(cls):
    p = torch.randn(10, 3, requires_grad=True)
    torch.nn.functional.embedding(torch.tensor([1, 2]), p, sparse=True).sum().backward()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        cls([p]).step()


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_differentiable_groups_run_torch(rng, ours_cls, torch_cls, kwargs):
    """differentiable=True: torch's own implementation, whose step autograd can see through."""
    values = make_params(torch.float64, "cpu", rng, [(4,), (2, 3)])
    ours, theirs = twin_params(values)
    opt_ours = ours_cls([p.clone() for p in ours], differentiable=True, **kwargs)
    opt_theirs = torch_cls([p.clone() for p in theirs], differentiable=True, **kwargs)
    for opt in (opt_ours, opt_theirs):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
    for a, b in zip(opt_ours.param_groups[0]["params"], opt_theirs.param_groups[0]["params"]):
        torch.testing.assert_close(a, b)
        assert a.grad_fn is not None


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_step_under_fake_tensor_mode(ours_cls, torch_cls, kwargs):
    """Fake tensors (memory estimators step optimizers under FakeTensorMode) have no data for a
    kernel: torch's implementation runs, and the state it makes is fake, as torch's."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(3, 4))]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = ours_cls(params, **kwargs)
        opt.step()
        opt.step()
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    assert state and all(isinstance(t, FakeTensor) for t in state)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_step_bumps_version_counters(backend, ours_cls, torch_cls, kwargs):
    """A kernel writes through data pointers; autograd must still see the in-place update."""
    w = torch.randn(4, device=backend.device, requires_grad=True)
    x = torch.randn(4, device=backend.device, requires_grad=True)
    loss = (w * x).sum()  # saves w for x's gradient
    w.grad = torch.ones_like(w)
    ours_cls([w], **kwargs).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_no_gradients_and_empty_parameters(backend, ours_cls, torch_cls, kwargs):
    device = backend.device
    untouched = torch.randn(3, device=device, requires_grad=True)
    empty = torch.empty(0, 4, device=device, requires_grad=True)
    empty.grad = torch.empty(0, 4, device=device)
    before = untouched.detach().clone()
    opt = ours_cls([untouched, empty], **kwargs)
    opt.step()
    assert torch.equal(untouched, before) and untouched not in opt.state
    with pytest.raises(ValueError, match="empty parameter list"):
        ours_cls([], **kwargs)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_closure_and_hooks(ours_cls, torch_cls, kwargs):
    w = torch.randn(3, requires_grad=True)
    opt = ours_cls([w], **kwargs)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kw: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: seen.append("post"))

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and seen == ["pre", "post"]


def _hook_run(cls, kwargs, subclass_steps):
    """The calls a step makes to the global and the optimizer's own hooks, in order, for ``cls``
    or, with ``subclass_steps``, a subclass of it whose own step calls its parent's."""
    if subclass_steps:
        class Sub(cls):
            def step(self, closure=None):
                return super().step(closure)
        cls = Sub
    w = torch.randn(3, requires_grad=True)
    w.grad = torch.ones(3)
    opt = cls([w], **kwargs)
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append("global post")),
               opt.register_step_pre_hook(lambda o, a, k: seen.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: seen.append("post"))]
    try:
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_step_hooks_as_torch_calls_them(ours_cls, torch_cls, kwargs):
    """fastml's step wrapper calls the hooks as torch.optim's does, in its order, once a step;
    also for a subclass whose own step calls its parent's. (torch's wrappers run them twice
    there once the parent class has been instantiated in the process, once before.)"""
    once = ["global pre", "pre", "post", "global post"]
    assert _hook_run(ours_cls, kwargs, False) == _hook_run(torch_cls, kwargs, False) == once
    assert _hook_run(ours_cls, kwargs, True) == once


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_step_pre_hook_replaces_arguments(ours_cls, torch_cls, kwargs):
    """A pre-hook may return new (args, kwargs) for the step; any other value is refused, with
    torch's error."""
    w = torch.randn(3, requires_grad=True)
    opt = ours_cls([w], **kwargs)
    calls = []

    def closure():
        calls.append("closure")
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    handle = opt.register_step_pre_hook(lambda o, args, kw: ((args[0], closure), kw))
    assert isinstance(opt.step(), torch.Tensor) and calls == ["closure"]
    handle.remove()
    for cls in (ours_cls, torch_cls):
        bad = cls([w], **kwargs)
        bad.register_step_pre_hook(lambda o, args, kw: "not a pair")
        with pytest.raises(RuntimeError, match="must return None or a tuple of \\(new_args, new_kwargs\\)"):
            bad.step()


def _step_ranges(opt, closure=None):
    """The names of the profiler ranges of one ``opt.step(closure)`` that name an optimizer step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        try:
            opt.step(closure)
        except ZeroDivisionError:
            pass
    return [event.name for event in prof.events() if event.name.startswith("Optimizer.step#")]


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_step_profiler_range_as_torch_names_it(ours_cls, torch_cls, kwargs):
    """A profiler sees fastml's step as torch's: one range, named for the class, also when the
    step raises (the range is closed, so the next step's is whole)."""
    def make(cls):
        w = torch.randn(3, requires_grad=True)
        w.grad = torch.ones(3)
        return cls([w], **kwargs)

    ours, theirs = make(ours_cls), make(torch_cls)
    assert _step_ranges(ours) == _step_ranges(theirs) == [f"Optimizer.step#{torch_cls.__name__}.step"]

    def failing():
        raise ZeroDivisionError

    assert _step_ranges(ours, failing) == _step_ranges(theirs, failing)
    assert _step_ranges(ours) == [f"Optimizer.step#{torch_cls.__name__}.step"]

    class Sub(ours_cls):
        def step(self, closure=None):
            return super().step(closure)

    assert _step_ranges(make(Sub)) == ["Optimizer.step#Sub.step"]  # one range, the outermost step's


# Its Triton cases (seconds each on the interpreter) repeat what the kernels' own tests run: long there.
@pytest.mark.interpreter_long()
@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", OPTIMIZERS, ids=OPT_IDS)
def test_training_curve_matches_torch(backend, ours_cls, torch_cls, kwargs):
    """A small MLP trained with fastml's optimizer loses as it does with torch's."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5).to(backend.device), torch.randn(64, 1).to(backend.device)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(backend.device)
    twin = copy.deepcopy(model)
    curves = []
    for net, cls in ((model, ours_cls), (twin, torch_cls)):
        opt = cls(net.parameters(), **{**kwargs, "lr": 0.01})
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[0][-1] < curves[0][0]
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the course's sgd, fused


def course_sgd(params, lr, batch_size):
    """The course's hand-written minibatch SGD step."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_underscore_is_the_course_step(backend, rng, dtype):
    values = make_params(dtype, backend.device, rng)
    ours, theirs = twin_params(values)
    for _ in range(STEPS):
        set_grads(ours, theirs, rng)
        optim.sgd_(ours, 0.03, 10)
        course_sgd(theirs, 0.03, 10)
        for a, b in zip(ours, theirs):
            assert torch.count_nonzero(a.grad) == 0
    for a, b in zip(ours, theirs):
        if backend.device.type == "cpu":  # the same roundings in the same order: bitwise equal
            assert torch.equal(a, b)
        else:
            assert_steps_close(a, b)


def test_sgd_underscore_trains_linear_regression():
    """The course's linear-regression loop with fastml.optim.sgd_ in place of its sgd."""
    torch.manual_seed(0)
    true_w, true_b = torch.tensor([2.0, -3.4]), 4.2
    features = torch.randn(1000, 2)
    labels = features @ true_w + true_b + 0.01 * torch.randn(1000)
    w = torch.normal(0, 0.01, (2,), requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    for _ in range(3):
        for i in range(0, 1000, 10):
            x, y = features[i:i + 10], labels[i:i + 10]
            (((x @ w + b) - y) ** 2 / 2).sum().backward()
            optim.sgd_([w, b], 0.03, 10)
    torch.testing.assert_close(w.detach(), true_w, atol=2e-3, rtol=0)
    assert abs(b.item() - true_b) < 2e-3


@pytest.mark.parametrize("params, lr, batch_size, error, message", [
    ([torch.zeros(2, requires_grad=True)], 0.1, 10, ValueError, r"params\[0\] has no gradient"),
    ([1.0], 0.1, 10, TypeError, r"params\[0\] is a float"),
    (None, 0.1, 0, ValueError, "batch_size must be positive"),
    (None, 0.1, -4, ValueError, "batch_size must be positive"),
    (None, 0.1, float("nan"), ValueError, "batch_size must be positive"),
    (None, 0.1, "10", TypeError, "batch_size must be a positive number"),
    (None, "0.1", 10, TypeError, "lr must be a real number"),
])
def test_sgd_underscore_rejects_bad_input(params, lr, batch_size, error, message):
    if params is None:
        params = [torch.zeros(2, requires_grad=True)]
        params[0].grad = torch.ones(2)
    with pytest.raises(error, match=message):
        optim.sgd_(params, lr, batch_size)


def test_sgd_underscore_over_no_parameters_does_nothing():
    """The course's loop over an empty parameter list does nothing; so does sgd_."""
    optim.sgd_([], 0.1, 10)
    optim.sgd_(iter(()), 0.1, 10)
