"""When a fused or folded run computes as a whole, and how its later modules know.

``fastml.patch`` fuses runs of modules (Conv2d → BatchNorm2d → ReLU, Conv2d → ReLU → MaxPool2d,
Linear → ReLU, ...) without changing the model's tree: the run's first module computes the whole
run and the later ones pass its output through. That is right only where the run is called as
the model calls it. The same modules are also called on their own: a slice of a patched
``nn.Sequential`` (``features[:k]``, as perceptual losses tap VGG), a loop over its members (as
style transfer taps VGG), ``torch.utils.checkpoint.checkpoint_sequential``'s segments, a
GraphModule that torch.fx made of the model, another method of the owner that keeps each
member's output. There each module must compute itself, as torch's.

So a run knows its ``owner``, the module whose ``forward`` (an ``nn.Sequential``, or the block
whose ``forward`` a torch.fx trace showed calling the run) calls its members in order, and where
its later members sit (``slots``). The first module computes the whole run only when the owner's
forward calls it (itself, or through a helper it calls), the later members still in their slots
and no hook on any (``called_as_run``), and then marks its output (``mark``) with the members it
applied. A later member passes its input through only when the input carries that mark,
unchanged since (``passes``); otherwise it computes itself. The caller is read from the Python
stack: ~1-2 µs a call, once per run.

Two places keep the earlier rule (the first module always computes the whole run, the later
ones always pass through): a graph being traced by torch.compile, which has no stack to read
and no Python state on tensors (it compiles the whole model, where the run is called as a run),
and ``fastml.tune`` timing a run's modules one by one (``as_runs``).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys

import torch

from fastml.ops import function_mode_active, is_compiling

FUSED_RUN = "_fastml_fused_run"
"""On a fastml.nn.ConvReLUPool2d that fastml.patch built from a run: the run (fastml/_patch.py)."""

MARK = "_fastml_run_output"
"""On a tensor a run's first module returned: (the ids of the later members it applied, in
order; the tensor's version then, or None for an inference tensor, which has none). Ids, not the
modules: a tensor kept (or saved) must not keep the model alive with it."""

# The frames between a module's forward and the code that called the module.
_CALL_MACHINERY = frozenset(getattr(torch.nn.Module, name).__code__
                            for name in ("_call_impl", "_wrapped_call_impl", "_slow_forward")
                            if hasattr(torch.nn.Module, name))


def _machinery_frames() -> int:
    """How many frames torch's module call puts between a module's forward and its caller (2 in
    torch 2.x: _wrapped_call_impl, _call_impl), found by calling a module once."""
    found = []

    class Probe(torch.nn.Module):
        def forward(self):
            frame, count = sys._getframe(1), 0
            while frame is not None and frame.f_code in _CALL_MACHINERY:
                frame, count = frame.f_back, count + 1
            found.append(count)

    Probe()()
    return found[0]


_BETWEEN = _machinery_frames()

_as_runs = contextvars.ContextVar("fastml_as_runs", default=0)  # (a context variable: ~0.05 µs to read)
_hooks_watch_only = contextvars.ContextVar("fastml_hooks_watch_only", default=0)

# torch's hooks on every module's call (torch.nn.modules.module.register_module_forward_hook, ...):
# dicts torch changes in place, so these references stay current.
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if hasattr(torch.nn.modules.module, name))


def whole_runs() -> bool:
    """Whether runs compute by the earlier rule: while torch.compile traces a graph, or in
    ``as_runs``."""
    return is_compiling() or _as_runs.get() > 0


@contextlib.contextmanager
def as_runs():
    """Within: a run's first module computes the whole run wherever it is called, and its later
    modules pass their input through (fastml.tune times each module alone as the model runs it)."""
    token = _as_runs.set(_as_runs.get() + 1)
    try:
        yield
    finally:
        _as_runs.reset(token)


@contextlib.contextmanager
def hooks_watch_only():
    """Within: hooks on a run's modules are fastml.tune's, which record the modules' inputs and
    change nothing, so the runs still compute as one (see ``called_as_run``)."""
    token = _hooks_watch_only.set(_hooks_watch_only.get() + 1)
    try:
        yield
    finally:
        _hooks_watch_only.reset(token)


def _hooked(members) -> bool:
    """Whether a forward or backward hook would see a member of the run: on the member, or on
    every module. It expects the member's own input and output, not the run's."""
    if _hooks_watch_only.get():
        return False
    for hooks in _GLOBAL_HOOKS:
        if hooks:
            return True
    for module in members:
        if module is not None and (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                   or module._backward_pre_hooks):
            return True
    return False


_REACH = 6
"""Frames above a module's call in which its run's owner's forward may be found: the owner's
forward calls the module itself, or through a helper (a method, a nested function, a lambda given
to functools.reduce), or a wrapper of the module's forward (accelerate's hooks) stands between."""

_forward_codes: dict[type, tuple] = {}


def _forward_code(cls: type) -> tuple:
    """(the code object of ``cls.forward``, unwrapped from decorators (``@torch.no_grad()``): the
    frame a call of the owner's forward runs; the name of its first argument, the module itself,
    ``self`` by convention only)."""
    found = _forward_codes.get(cls)
    if found is None:
        code = inspect.unwrap(cls.forward).__code__
        found = _forward_codes[cls] = (code, code.co_varnames[0] if code.co_argcount else None)
    return found


def _called_from_forward(owner, depth: int) -> bool:
    """Whether ``owner``'s forward made the module call whose forward is running, reading the
    frames above the call. ``depth``: frames from called_as_run's caller to the module's forward
    (see there). The first frame is read by number: where the owner's forward calls the module
    itself (an nn.Sequential's does), it is that forward's, and no frame is walked past (each
    costs Python an object, ~0.2 µs)."""
    code, itself = _forward_code(type(owner))
    try:
        frame = sys._getframe(depth + _BETWEEN + 3)  # (+ _called_from_forward, called_as_run, the forward)
    except ValueError:
        return False
    for _ in range(_REACH):
        if frame is None:
            return False
        if frame.f_code is code and frame.f_locals.get(itself) is owner:
            return True
        frame = frame.f_back
    return False


def called_as_run(run, depth: int) -> bool:
    """Whether the run's first module, whose forward asks, is called as the model calls the run:
    from ``run.owner``'s forward (a method of its that forward calls included, not one called
    from elsewhere), its later members still in their slots, no hook on any of them (one
    registered after patching: patch fuses no run with hooks). ``run``: an object with
    ``owner``, ``members`` and ``slots`` ((parent, key, module) for each later member).
    ``depth``: the frames from the caller of this function to the module's forward (0 when the
    forward asks, 1 when a method that forward called asks)."""
    if whole_runs():
        return True
    if not _called_from_forward(run.owner, depth):
        return False
    for parent, key, module in run.slots:  # (a loop: a generator costs ~1 µs to make)
        if parent._modules.get(key) is not module:
            return False
    return not _hooked(run.members)


def _version(t: torch.Tensor):
    """``t``'s version, None for an inference tensor, which has none; unseen by a Python
    TorchFunctionMode (a mode that logs the calls sees what it sees unpatched)."""
    if function_mode_active():
        with torch._C.DisableTorchFunction():
            return None if t.is_inference() else t._version
    return None if t.is_inference() else t._version


def mark(out: torch.Tensor, run, last: int) -> torch.Tensor:
    """``out``, marked as ``run``'s output with its members up to ``last`` (an index into
    ``run.members``) applied: those members then pass it through."""
    if isinstance(out, torch.Tensor) and not whole_runs():
        out.__dict__[MARK] = (tuple(map(id, run.members[1:last + 1])), _version(out))
    return out


def passes(module: torch.nn.Module, input) -> bool:
    """Whether ``module``, a later member of a run, passes ``input`` through: it is its run's
    marked output, unchanged since, with ``module`` among the members applied. The last member
    applied takes the mark off, so that a second call computes (as a torch module would)."""
    found = input.__dict__.get(MARK) if isinstance(input, torch.Tensor) else None
    if found is None:
        return False
    applied, version = found
    key = id(module)
    if key not in applied or version != _version(input):
        return False
    if key == applied[-1]:
        del input.__dict__[MARK]
    return True
