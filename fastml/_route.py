"""A drop-in layer's shortcut to torch's own function where the measured choice runs torch's.

Where torch's implementation measured faster both ways (forward, and backward when gradients are
tracked), a fastml layer would only add its own dispatch in front of torch's code: argument
checks, the shape class, an autograd.Function in Python. At batch 10 that is 15 µs over torch's
5 µs for an nn.Linear. So each layer remembers, per *call signature* (the input's shape, dtype,
device and layout, the gradient state, the thread count, the tuning mode and the decisions'
generation), where its op's decisions went. To torch both ways: the layer calls torch's function
directly, autograd and all, as the torch module it replaced would. To a fastml kernel either
way: the whole layer, dispatch included, is timed against torch's module (``layer_choice``, by
``_tune.LAYER_MARGIN``), and the faster runs from then on. While a decision is still unmade (the
first call of a class decides its forward, the first backward its backward) nothing is
remembered. A forced
backend (use_backend, FASTML_BACKEND) always takes fastml's path, which obeys it.

The ops tell what they decided through ``report``, only while a layer ``watching`` listens.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastml import _backend, _tune
from fastml._layout import faulting_shape
from fastml.ops import dispatch_mode_depth, function_mode_active, is_compiling, onnx_exporting

ATTR = "_fastml_route"
VETO_ATTR = "_fastml_torch_signatures"
# On every module of a model that fastml.tune measured faster unpatched: the module runs as
# torch's own, before any signature is computed (the dispatch cost it saves is what made the
# patched model slower), folds undone, until the next tune, patch or unpatch. A module whose
# class has a torch twin (TORCH_TWINS) is that class meanwhile, its own kept in FASTML_CLASS_ATTR:
# not even fastml's forward runs (a flag checked there still cost ~2 us a layer). A convolution
# torch's oneDNN can fault on (``faulting_shape``) keeps fastml's class: its forward then
# runs torch's computation through the guard, as the patched model's does.
AS_TORCH_ATTR = "_fastml_as_torch"
FASTML_CLASS_ATTR = "_fastml_class"
TORCH_TWINS: dict[type, type] = {}
"""{fastml module class: the torch class whose forward computes what it does unfused and unfolded}:
fastml/nn.py's drop-ins and fastml/_fold.py's folded classes register theirs."""
_watchers: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastml_route_watch", default=None)
_threads = torch.get_num_threads

DERIVED_WEIGHT_ATTRS: set[str] = set()
"""Attributes in which a variant keeps, on its layer, what it derives from the weight once per
weight version (oneDNN's packing, Winograd's transform): modules that cache so add theirs here."""


def forget_derived_weights(module: torch.nn.Module) -> None:
    """Drops what the variants derived from ``module``'s weight: unpatch does, so does every timed
    training call (``retimes_derived_weights``), and so does switching the layer's mode
    (``train()`` / ``eval()``: the refresh point for a change that no version counter shows)."""
    for attr in DERIVED_WEIGHT_ATTRS:
        module.__dict__.pop(attr, None)


DERIVED_ATTR = "_fastml_derived"


def mark_derived(tensor: torch.Tensor) -> torch.Tensor:
    """Marks a tensor fastml formed itself from a layer's parameters (a folded weight), which
    nothing outside fastml holds, so nothing writes in place: ``state_key`` names it by its
    storage where it has no version counter."""
    tensor.__dict__[DERIVED_ATTR] = True
    return tensor


class _FusedStep:
    """One step of an optimizer with a ``fused`` param group: torch's fused kernels write the
    parameters without moving their version counters. A new instance at each step, equal only
    to itself."""
    __slots__ = ()


_fused_step: _FusedStep | None = None
"""The last fused optimizer step (``_count_fused_step``), part of every ``state_key``."""
_fused_step_hook = None
_fused_step_hook_lock = threading.Lock()


def _count_fused_step(optimizer, args, kwargs) -> None:
    """torch.optim's global step post-hook, run after every step of every optimizer. Only a fused
    step counts: the others' in-place ops move the version counters, and counting them would drop
    the caches of models they do not step (a frozen teacher evaluated at each student step).
    Inside a compiled step it is traced, so it stores a new object rather than incrementing a
    number: dynamo would guard on a number it read and recompile at every step."""
    global _fused_step
    for group in optimizer.param_groups:
        if group.get("fused"):
            _fused_step = _FusedStep()
            return


def _follow_fused_steps() -> None:
    """Registers ``_count_fused_step``, once per process, before the first cache is keyed: fastml
    changes nothing global at import, and before a cache exists no step can make one stale. The
    handle stays here, not on a module or optimizer, which copies and pickles would carry."""
    global _fused_step_hook
    with _fused_step_hook_lock:
        if _fused_step_hook is None:
            _fused_step_hook = register_optimizer_step_post_hook(_count_fused_step)


def state_key(tensor: torch.Tensor) -> tuple | None:
    """What names the present contents of ``tensor`` for a cache of something derived from it:
    its storage and version (an optimizer step, ``load_state_dict``, any in-place op changes
    one), and the last step of a fused optimizer, which changes parameters without moving their
    versions (``_FusedStep``). None where nothing does, so the cache must derive anew: an
    inference tensor has no version counter, and inference mode may write it in place unseen,
    unless fastml derived it itself (``mark_derived``). A write through ``.data`` is seen by no
    version counter (as by none of autograd's checks): switching the layer's mode drops what was
    derived (``forget_derived_weights``)."""
    if _fused_step_hook is None:
        _follow_fused_steps()
    try:
        return tensor.data_ptr(), tensor._version, _fused_step
    except RuntimeError:  # an inference tensor (asked only where it is: is_inference costs a call)
        if not tensor.is_inference():
            raise
        return (tensor.data_ptr(), DERIVED_ATTR) if tensor.__dict__.get(DERIVED_ATTR) else None


def retimes_derived_weights(parameters: list) -> bool:
    """Whether a timed call must derive its weights anew, as the call it decides for will: in
    training (gradients wanted for parameters), an optimizer changes the weights every step, so
    a variant that caches a transformed weight pays for the transform on every step, which timed
    calls on one unchanging weight would never see (Winograd in ResNet-18's training measured
    faster per layer and ran the step at 0.68x)."""
    return torch.is_grad_enabled() and bool(parameters)


def watched() -> bool:
    """Whether a layer listens for the decisions of the op it calls (ops then ``report``)."""
    return _watchers.get() is not None


def report(forward_choice: str, tensor: torch.Tensor, implemented: tuple[str, ...],
           backward_key: tuple | None) -> None:
    """An op's forward ran on ``forward_choice``; its backward, if gradients are tracked, will be
    decided for ``backward_key`` (None when no backward will run) among the kernels for
    ``tensor``."""
    seen = _watchers.get()
    if seen is not None:
        seen.append((forward_choice, tensor, implemented, backward_key))


@contextlib.contextmanager
def watching():
    seen: list = []
    token = _watchers.set(seen)
    try:
        yield seen
    finally:
        _watchers.reset(token)


def settle(reports) -> bool | None:
    """True: every op ran torch's implementation forward and is decided for torch's backward;
    False: some op runs a fastml kernel; None: not known yet (a backward undecided, or no op
    reported: the call went to torch by another way, such as autocast)."""
    if not reports:
        return None
    known = True
    for forward_choice, tensor, implemented, backward_key in reports:
        if forward_choice != "reference":
            return False
        if backward_key is not None:
            choice = _backend.decided(tensor, implemented, backward_key)
            if choice is None:
                known = False
            elif choice != "reference":
                return False
    return True if known else None


def registered(layer: torch.nn.Module, name: str):
    """``getattr(layer, name)`` without nn.Module.__getattr__ (~0.35 µs, a tenth of a small
    layer's call, and torch's own forward pays it for every parameter it reads) where ``name`` is
    a registered Parameter or buffer (None included: a layer without bias, a batch norm without
    affine); otherwise (pruning and the old weight_norm set a plain attribute, a parametrization a
    property) ``getattr`` itself. Python finds a registered name the same way: Module.__setattr__
    keeps it out of the instance's dict, and a parametrization removes it from the registry."""
    parameters = layer._parameters
    if name in parameters:
        return parameters[name]
    buffers = layer._buffers
    return buffers[name] if name in buffers else getattr(layer, name)


def parametrized(layer: torch.nn.Module) -> bool:
    """Whether a parametrization (torch.nn.utils.parametrize: weight_norm, spectral_norm, a
    user's) computes some of ``layer``'s tensors at every read, which may advance its state
    (spectral_norm's power iteration in training) or draw random numbers. The layer then runs
    torch's own forward, which reads each once, and nothing times it."""
    return "parametrizations" in layer._modules


def weight_of(layer: torch.nn.Module) -> torch.Tensor | None:
    """``layer.weight`` (``registered``), for the route's signature and torch's computation."""
    return registered(layer, "weight")


TORCH = "reference"
"""The route that runs torch's module (the measured choice's name for torch's way)."""
COMPILING, TRACED = "compiling", "traced"
"""``settled``'s answers for a call traced by dynamo (fastml's path, whose ops are custom ops
there) and one met by torch.fx's tracer (``traced``): names no route takes, and strings, which
dynamo compares where it would not compare a sentinel object with the routes' strings."""


def settled(layer: torch.nn.Module, input: torch.Tensor, weight: torch.Tensor | None,
            target: torch.Tensor | None = None) -> tuple:
    """(route, signature) of a drop-in layer's call, decided by nothing but what is remembered:
    route ``TORCH`` where the call runs torch's computation (the layer runs as torch's, a Python
    mode is on, or the route settled so for this signature), another name where it settled
    elsewhere, ``COMPILING`` or ``TRACED``, or None where it is still to be decided (``call``
    decides).
    The signature is None where none applies: a forced backend, an input that is not a tensor.

    Every call of every drop-in layer comes here, so it is one function on raw values (the
    tuning state as set): at a 10-row regression step, each 0.1 µs here cost 0.4 µs in the
    training loop. A layer whose route is ``TORCH`` then runs torch's function itself, on its
    ``registered`` parameters, which pays back part of what the check costs (~1 µs)."""
    attributes = layer.__dict__
    if attributes.get(AS_TORCH_ATTR):
        # (met by torch.fx's tracer: recorded as a call of the layer, as when it runs fastml's,
        # not as the torch computation it runs now, which a trace would keep for good)
        return (TRACED if isinstance(input, PROXY) else TORCH), None
    if is_compiling():
        return COMPILING, None
    if dispatch_mode_depth() or function_mode_active():
        # Python modes (FakeTensorMode, FlopCounterMode, a TorchFunctionMode that logs): they
        # see what torch's module calls, as they would unpatched, and a fake tensor no kernel
        # can read. (fastml's functions defer to torch under either mode too.)
        return TORCH, None
    if not isinstance(input, torch.Tensor):
        return (TRACED if isinstance(input, PROXY) else None), None  # (else the caller's checks say what is wrong)
    if _backend.forced():
        return None, None
    # The strides hold the memory format (a channels-last input takes oneDNN's other paths, a
    # merely strided one neither) at half the cost of asking is_contiguous for each. A sparse or
    # mkldnn tensor answers stride() with its own values (COO's (0, 0) is also an expanded dense
    # tensor's) or raises: its layout stands there instead.
    strides = input.stride() if input.layout is _STRIDED else input.layout
    sig = (input.shape, strides, input.dtype, input.device, _grad_enabled(), input.requires_grad,
           weight is not None and weight.requires_grad, _threads(), _tune.state())  # (trains_weight reads 4 and 6)
    if target is not None:
        if not isinstance(target, torch.Tensor):
            return TORCH, None  # (torch's loss says what is wrong with it)
        sig = (*sig, target.shape, target.dtype, target.requires_grad)
    memo = attributes.get(ATTR)
    return (None if memo is None else memo.table.get(sig)), sig


_STRIDED, _CHANNELS_LAST, _grad_enabled = torch.strided, torch.channels_last, torch.is_grad_enabled


def trains_weight(sig: tuple | None) -> bool:
    """Whether a layer's call of signature ``sig`` (``settled``'s) wants its weight's gradient:
    read from the signature, which has it, rather than asked again (a TorchFunctionMode would
    see the question)."""
    return sig is not None and sig[4] and sig[6]


def _layout(input: torch.Tensor) -> tuple | bool:
    """Which of torch's layouts ``input`` is in: a channels-last input takes other paths than a
    contiguous one (oneDNN's variants), and a merely strided one neither."""
    if input.layout is not _STRIDED:
        return ()  # (is_contiguous raises for sparse layouts)
    if input.dim() == 4:
        return input.is_contiguous(), input.is_contiguous(memory_format=_CHANNELS_LAST)
    return input.is_contiguous()


def call(layer: torch.nn.Module, input: torch.Tensor, weight: torch.Tensor | None, torch_forward, fastml_forward,
         target: torch.Tensor | None = None, variants=None, found: tuple | None = None):
    """``torch_forward(input)`` where the layer's route for this call's signature is torch's,
    else ``fastml_forward(input)`` (both with ``target`` too, for a loss), or one of the layer's
    ``variants``. A signature seen for the first time runs fastml's path, then settles the route:
    torch's where every op went to torch's implementation; where some op chose a fastml kernel,
    the whole layer is timed both ways (``layer_choice``), because a kernel that wins inside
    fastml's dispatch can still lose to torch's module once the dispatch's own cost (checks, an
    autograd.Function in Python) is counted.

    ``variants``: None, or a function of the input (and of ``only``, a name: that variant alone)
    returning {name: forward}, other ways of computing the same layer with torch's ops (a
    convolution on the channels-last layout) where they apply to that input: they are timed
    against torch's module too, whatever the ops chose, and the fastest runs. ``found``: what
    ``settled`` said of this call, where the layer asked it first."""
    args = (input,) if target is None else (input, target)
    route, sig = settled(layer, input, weight, target) if found is None else found
    if route is not None:
        if route == TORCH:
            return torch_forward(*args)
        if route == "fastml":
            return fastml_forward(*args)
        if route == COMPILING:  # traced into a graph: fastml's path, whose ops are custom ops there
            return torch_forward(*args) if onnx_exporting() else fastml_forward(*args)
        if route == TRACED:
            return traced(layer, args, torch_forward)
        variant = variants(input, route).get(route)
        if variant is not None:
            return variant(*args)
        return torch_forward(*args)  # (not reached: the signature holds all a variant depends on)
    if sig is not None and saving_hooks_active():
        return torch_forward(*args)
    if sig is not None and sig in layer.__dict__.get(VETO_ATTR, ()):
        remember(layer, sig, "reference")
        return torch_forward(*args)
    with _tune.scope(weakref.ref(layer)):  # the decisions made here are this layer's (fastml/_tune.py)
        with watching() as reports:
            out = fastml_forward(*args)
        if sig is not None:
            to_torch = settle(reports)
            if to_torch is None and reports and not _first_unsettled(layer.__dict__.setdefault(PENDING_ATTR, set()),
                                                                     sig):
                to_torch = False  # a backward still undecided at the signature's second call: time both ways now
            others = variants(input) if variants is not None else {}
            route = None
            if to_torch is False or (to_torch is True and others):
                forwards = {"fastml": fastml_forward} if to_torch is False else {}
                route = layer_choice(layer, args, torch_forward, {**forwards, **others})
            elif to_torch is True:
                route = "reference"
            if route is not None:
                remember(layer, sig, route)
    return out


PENDING_ATTR = "_fastml_pending"


def _first_unsettled(pending: set, sig: tuple) -> bool:
    """Whether a call of signature ``sig`` is the first to leave its route unsettled because an
    op's backward is still undecided (each op decides its backward at its first backward pass).
    In a training loop the backward comes before the next call, which then settles the route; a
    forward with gradients tracked and no backward (an evaluation loop without torch.no_grad, a
    layer called twice before one backward) would otherwise run fastml's whole dispatch, an
    autograd.Function in Python, on every call: an nn.Linear at batch 10 took 26 µs, not torch's
    4. So the second such call settles it by timing both ways, forward and backward, which makes
    the ops' backward decisions on the way. ``pending``: the signatures waiting (a layer's own set,
    or the functions')."""
    if sig in pending:
        pending.discard(sig)
        return False
    if len(pending) >= MAX_FUNCTION_ROUTES:
        pending.clear()
    pending.add(sig)
    return True


def _saving_hooks_reader():
    """torch's query for the innermost saved-tensor hooks, whichever its signature here (torch
    2.x added an ``ignore_is_tracing`` flag to it); None where torch has none."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        top(False)
        return lambda: top(False)
    except TypeError:
        return top


_top_saving_hooks = _saving_hooks_reader()


def saving_hooks_active() -> bool:
    """Whether saved-tensor hooks are on (torch.autograd.graph.saved_tensors_hooks): under
    non-reentrant activation checkpointing (torch.utils.checkpoint) a forward pass runs again in
    backward and must save the same tensors in the same order. A call whose route is not yet
    settled then runs torch's path, remembering nothing: fastml's first call would time both
    ways (timed calls that save tensors of their own) and settle a route that the recomputation
    would follow instead. Routes settled before are followed, the same in both passes."""
    return _top_saving_hooks is not None and _top_saving_hooks() is not None


PROXY = torch.fx.Proxy


def traced(layer: torch.nn.Module, args: tuple, torch_forward):
    """A fastml layer met by torch.fx's tracer (``torch.fx.symbolic_trace``, torchvision's feature
    extraction), its ``args`` proxies: recorded as one call of the layer, as the tracer records
    torch.nn's own modules, so that the graph calls the layer and what it runs (its routes, a
    fold, the training mode) is decided when the graph runs, not baked in by the trace (a folded
    batch norm would vanish from it for good). A layer traced as the root is traced through
    ``torch_forward``, as a torch module would be."""
    tracer = args[0].tracer
    if getattr(tracer, "root", None) is layer:
        return torch_forward(*args)
    return tracer.create_proxy("call_module", tracer.path_of_module(layer), args, {})


MAX_LAYER_ROUTES = 256
"""Signatures remembered per layer, the oldest forgotten first: a model alternating shapes or
layouts, or fed inputs of varying sizes (sequence lengths), whose every forgotten signature
costs a call through fastml's dispatch again to settle (a table of 16, cleared when full, ran a
patched MLP fed 200 sequence lengths at 0.76x torch's speed after every size was decided)."""


class RouteTable:
    """A layer's {call signature: route}, in ``table``: a dict held by an object, not the layer's
    attribute itself, because torch.jit.script types every dict attribute of a module it
    compiles and refuses one keyed by tuples (a patched model that had run failed to script)."""

    def __init__(self):
        self.table: dict[tuple, str] = {}

    def __reduce__(self):
        # Routes are measured on this machine: a pickled layer (torch.save of a model) loaded on
        # another CPU measures its own. A deep copy, in this process, keeps them (__deepcopy__).
        return RouteTable, ()

    def __deepcopy__(self, memo):
        copy = RouteTable()
        copy.table = dict(self.table)
        return copy


def routes(layer: torch.nn.Module) -> dict:
    """{call signature: route} the layer remembers (empty if none)."""
    memo = layer.__dict__.get(ATTR)
    return {} if memo is None else memo.table


def take_routes(layer: torch.nn.Module) -> dict:
    """``routes(layer)``, which the layer then forgets."""
    memo = layer.__dict__.pop(ATTR, None)
    return {} if memo is None else memo.table


def remember(layer: torch.nn.Module, sig: tuple, route: str) -> None:
    """The layer runs ``route`` for calls of signature ``sig`` from now on."""
    memo = layer.__dict__.get(ATTR)
    if memo is None:
        memo = RouteTable()
        object.__setattr__(layer, ATTR, memo)  # a plain attribute: not state, not a submodule
    elif sig not in memo.table and len(memo.table) >= MAX_LAYER_ROUTES:
        del memo.table[next(iter(memo.table))]  # (dicts keep their insertion order)
    memo.table[sig] = route


def run_as_torch(model: torch.nn.Module, on: bool) -> None:
    """Every module of ``model`` runs as torch's own (``on``), or as fastml's again. The same
    objects throughout (Parameters, buffers, hooks, routes): only classes and a flag change. A
    module with a torch twin becomes that class, but for a convolution torch's class can fault on
    (``_keeps_guard``), which keeps fastml's and runs torch's computation through the guard."""
    for module in model.modules():
        if on:
            object.__setattr__(module, AS_TORCH_ATTR, True)  # a plain attribute: not state
            twin = TORCH_TWINS.get(type(module))
            if twin is not None and not _keeps_guard(module):
                object.__setattr__(module, FASTML_CLASS_ATTR, type(module))
                module.__class__ = twin
        else:
            module.__dict__.pop(AS_TORCH_ATTR, None)
            own = module.__dict__.pop(FASTML_CLASS_ATTR, None)
            if own is not None:
                module.__class__ = own


def _keeps_guard(module: torch.nn.Module) -> bool:
    """Whether ``module`` keeps fastml's class while it runs as torch's: a convolution whose
    weight and bias gradients torch's own class would compute out of bounds on channels-last
    memory (``faulting_shape``). A model trained on channels-last input that fastml.tune
    found faster unpatched crashed at its timing and at every step after (RepVGG-A0's stem)."""
    return isinstance(module, torch.nn.Conv2d) and faulting_shape(module.weight, module.stride)


def runs_as_torch(module: torch.nn.Module) -> bool:
    return bool(module.__dict__.get(AS_TORCH_ATTR))


def veto(layer: torch.nn.Module, sig: tuple) -> None:
    """Keeps ``layer`` on torch's module for call signature ``sig`` whatever its own timing says:
    fastml.tune found the model as a whole faster that way (fastml/_tune_model.py)."""
    vetoed = layer.__dict__.get(VETO_ATTR)
    if vetoed is None:
        vetoed = set()
        object.__setattr__(layer, VETO_ATTR, vetoed)
    vetoed.add(sig)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)] if isinstance(value, (tuple, list)) else []


def layer_choice(layer: torch.nn.Module, args: tuple, torch_forward, candidates: dict) -> str:
    """The measured choice between torch's module ("reference") and the layer's other ways,
    ``candidates`` {name: forward} (fastml's path is "fastml"): forward, and backward where
    gradients are tracked, on a copy of the input, gradients taken with autograd.grad (no .grad
    accumulates). Its shape class is the layer's type and configuration (extra_repr), the call's
    signature and the candidates' names; it persists as the ops' do."""
    grad_on = torch.is_grad_enabled()
    parameters = [p for p in layer.parameters() if p.requires_grad] if grad_on else []
    input = args[0]
    key = ("layer " + type(layer).__name__, "forward+backward" if grad_on else "forward", _threads(), input.dtype,
           input.device, tuple(a.shape for a in args), _layout(input), layer.extra_repr(),
           tuple(a.requires_grad for a in args), tuple(a.dtype for a in args[1:]),
           tuple(p.shape for p in parameters), tuple(candidates))
    return _timed_choice(key, args, parameters, {"reference": torch_forward, **candidates}, layer)


def _timed_choice(key: tuple, args: tuple, parameters: list, forwards: dict,
                  layer: torch.nn.Module | None = None, kept: tuple = ()) -> str:
    """``_tune.choose`` among ``forwards`` {name: forward}, "reference" (torch's) among them, each
    ``forward(*args)`` timed forward and, where gradients are tracked, backward to ``args`` (None
    entries allowed) and ``parameters``, on detached copies of ``args``; in training each call
    derives ``layer``'s weights anew (``retimes_derived_weights``). ``layer``'s buffers and the
    tensors ``kept`` (None entries allowed) are left as the timed calls found them."""
    grad_on = torch.is_grad_enabled()
    copies = [a if a is None else a.detach().requires_grad_(a.requires_grad and grad_on) for a in args]
    input = next(a for a in args if a is not None)
    upstream = {}
    fresh_weights = layer is not None and retimes_derived_weights(parameters)

    def run(name):
        if fresh_weights:
            forget_derived_weights(layer)
        with torch.set_grad_enabled(grad_on):
            out = forwards[name](*copies)
            outputs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
            wrt = [c for c in copies if c is not None and c.requires_grad] + parameters
            if outputs and wrt:
                if not upstream:
                    upstream["grads"] = [torch.ones_like(t) for t in outputs]  # no draw from the user's generator
                # retain_graph: the call's weight may be a tensor the user's graph computed
                # (pruning's and weight_norm's forward pre-hooks form it from the Parameters),
                # whose part of the graph the user's own backward still needs.
                torch.autograd.grad(outputs, wrt, upstream["grads"], allow_unused=True, retain_graph=True)

    # A layer's buffers (a batch norm's running statistics, num_batches_tracked) move at every
    # call: the timed calls must leave them as the one real call left them.
    restored = (*(() if layer is None else layer.buffers()), *kept)
    buffers = [(b, b.detach().clone()) for b in restored if b is not None]
    token = _watchers.set(None)  # the timed calls' ops report to no one: a layer around us hears our verdict
    try:
        return _tune.choose(key, tuple(name for name in forwards if name != "reference"), input, run)
    finally:
        _watchers.reset(token)
        for buffer, saved in buffers:
            if not torch.equal(buffer, saved):
                # through .data, whose version counter is its own: a backward that saved the
                # buffer (torch's batch norm saves its running statistics) sees it unchanged.
                buffer.data.copy_(saved)


# Routes of the fused functionals (fastml.functional.linear_mse, ...), whose torch twin is a
# sequence of torch calls: per call signature, as a layer's, in one bounded table.
_function_routes: dict[tuple, bool] = {}
MAX_FUNCTION_ROUTES = 4096
_pending_functions: set = set()  # function signatures awaiting a backward (``_first_unsettled``)

_kernel_routes: dict[tuple, tuple] = {}
"""Per function signature whose route settled on fastml's path: (the config's types,
``_backend.settings()``, the backend the op's measured choice chose), for ``kernel_route``."""


@contextlib.contextmanager
def function_routes_set_aside():
    """Inside the block the fused functionals have no settled route, so their calls reach their
    ops (fastml.tune, timing a layer alone); afterwards the routes settled before are back."""
    saved, saved_kernels = dict(_function_routes), dict(_kernel_routes)
    _function_routes.clear()
    _kernel_routes.clear()
    try:
        yield
    finally:
        _function_routes.update(saved)
        _kernel_routes.update(saved_kernels)


def kernel_route(sig: tuple | None, config: tuple) -> str | None:
    """The backend a fused functional's call of signature ``sig`` may run directly, its route
    settled on fastml's path and the op's choice made under the present settings: the call then
    skips the route's lookups and the op's shape class and selection (~35 µs of a 0.3 ms
    softmax-regression step on an Ice Lake Xeon, whose Python runs slowly after the kernel has
    swept its caches). None otherwise, and while a layer listens for where its call goes."""
    if sig is None or _watchers.get() is not None:
        return None
    found = _kernel_routes.get(sig)
    if found is None or found[0] != tuple(map(type, config)):
        return None
    settings = _backend.settings()
    return found[2] if settings is not None and found[1] == settings else None


def remember_kernel_route(sig: tuple | None, config: tuple, decided) -> None:
    """After a call of signature ``sig``: where its route is fastml's, remember ``decided()``
    (the backend the op's measured choice chose for it, None if it has not) for ``kernel_route``."""
    if sig is None or _function_routes.get(sig) is not False or _watchers.get() is not None:
        return
    settings = _backend.settings()
    backend = decided() if settings is not None else None
    if backend is not None:
        if len(_kernel_routes) >= MAX_FUNCTION_ROUTES:
            _kernel_routes.clear()
        _kernel_routes[sig] = (tuple(map(type, config)), settings, backend)


def _describe(t) -> tuple | None:
    """A tensor argument other than the main input: its shape, dtype, device, layout and gradient
    state, everything a fused functional's argument checks read of it (``checks_passed``)."""
    if not isinstance(t, torch.Tensor):
        return None if t is None else (type(t),)
    return t.shape, t.dtype, t.device, t.layout, t.requires_grad


# Signatures (with their config's types) whose calls passed a fused functional's argument checks.
# The signature holds everything those checks read but the global states (torch.func transforms,
# autocast, forward AD), which the caller tests itself; a call whose signature is here skips the
# checks (at a 0.35 ms softmax-regression step they cost 7 µs).
_checked_signatures: set = set()


def checks_passed(sig: tuple | None, config: tuple) -> bool:
    """Whether calls of signature ``sig`` (``function_signature``) passed the checks before."""
    return sig is not None and (sig, tuple(map(type, config))) in _checked_signatures


def pass_checks(sig: tuple | None, config: tuple) -> None:
    """Notes that a call of signature ``sig`` passed the checks (bounded, as the routes are)."""
    if sig is not None:
        if len(_checked_signatures) >= MAX_FUNCTION_ROUTES:
            _checked_signatures.clear()
        _checked_signatures.add((sig, tuple(map(type, config))))


def function_signature(op: str, args: tuple, config: tuple) -> tuple | None:
    """What a fused functional's route depends on (see ``call_function``): the main input's
    (first) shape, dtype, device, layout and gradient state, the others' shapes and gradient
    states, ``config``, grad mode, threads and tuning state; None when a backend is forced or a
    graph is being traced. Built on every call, so from raw values, as ``signature``."""
    input = args[0]
    if not isinstance(input, torch.Tensor) or is_compiling() or _backend.forced():
        return None  # (not a tensor: the caller's checks say what is wrong)
    strided = input.layout is _STRIDED  # (is_contiguous raises for sparse layouts)
    return (op, input.shape, input.dtype, input.device, strided and input.is_contiguous(), input.requires_grad,
            tuple([_describe(a) for a in args[1:]]), config, _grad_enabled(), _threads(), _tune.state())


def given_signature(op: str, args: tuple, given: tuple) -> tuple:
    """(config, signature) for a functional whose route is keyed by its arguments as given, so
    that a call settled on torch skips parsing them (``given``: those arguments). (None, None)
    where a list among them makes them unhashable: ``call_function`` then keys the route by the
    parsed arguments, its ``choice_config``."""
    try:
        hash(given)
    except TypeError:
        return None, None
    return given, function_signature(op, args, given)


def settled_on_torch(sig: tuple | None, input: torch.Tensor) -> bool:
    """Whether the route for ``sig`` (a call with main input ``input``) is settled on torch's
    sequence. A call whose signature is settled so skips fastml's argument checks, which passed
    for the same signature before: at a 0.4 ms softmax-regression step they cost more than the
    margin."""
    if sig is None or _function_routes.get(sig) is not True:
        return False
    report("reference", input, (), None)  # to a layer listening
    return True


def call_function(op: str, args: tuple, config: tuple, torch_forward, fastml_forward, sig=False,
                  choice_config: tuple | None = None, kept: tuple = ()):
    """``layer``-less ``call``: ``torch_forward(*args)`` where the route of op ``op`` for this
    call's signature (every tensor of ``args``, the main input first, None allowed, and the hashable ``config``) is
    torch's, else ``fastml_forward(*args)``; settled as a layer's route is. ``sig``: the
    signature when the caller has it already (``function_signature``). ``choice_config``: the
    config that keys the timed choice, where it differs from the route's (arguments parsed, so that
    ``stride=1`` and ``stride=(1, 1)`` share one timing; the route keyed by them as given, or by
    ``choice_config`` too where ``config`` is None: ``given_signature``'s unhashable case).
    ``kept``: tensors the call changes in place (a batch norm's running statistics), which the
    timed calls leave as this call left them."""
    if is_compiling():  # (under torch.onnx.export the callers' _defer_to_torch sent the call to torch)
        return fastml_forward(*args)
    if config is None:
        config, sig = choice_config, False
    input = args[0]
    outer = _watchers.get()  # a layer calling this function listens for where it went
    if sig is False:
        sig = function_signature(op, args, config)
    if sig is not None:
        to_torch = _function_routes.get(sig)
        if to_torch is not None:
            if outer is not None:
                report("reference" if to_torch else "fastml", input, (), None)
            return torch_forward(*args) if to_torch else fastml_forward(*args)
        if saving_hooks_active():
            return torch_forward(*args)
    with watching() as reports:
        out = fastml_forward(*args)
    to_torch = None
    if sig is not None:
        to_torch = settle(reports)
        if to_torch is None and reports and not _first_unsettled(_pending_functions, sig):
            to_torch = False  # as a layer's (``_first_unsettled``)
        if to_torch is False:
            key = ("function " + op, "forward+backward" if torch.is_grad_enabled() else "forward", _threads(),
                   input.dtype, input.device, sig[1:7], config if choice_config is None else choice_config)
            to_torch = _timed_choice(key, args, [], {"reference": torch_forward, "fastml": fastml_forward},
                                     kept=kept) == "reference"
        if to_torch is not None:
            if len(_function_routes) >= MAX_FUNCTION_ROUTES:
                _function_routes.clear()
                _kernel_routes.clear()
            _function_routes[sig] = to_torch
    if outer is not None:
        if to_torch is None:
            outer.extend(reports)  # still undecided (or forced): the layer sees the ops themselves
        else:
            report("reference" if to_torch else "fastml", input, (), None)
    return out
