"""One package per op: the autograd.Function and per-backend dispatch in ``__init__``, the
pure-PyTorch oracle in ``reference``, and one module per kernel backend (``cpp_impl``,
``numba_impl``, ``triton_impl``) exposing the same functions with the same signatures."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from fastml import _backend, _tune


def tracks_gradients(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must go through its autograd.Function: reverse mode (grad enabled and an
    input requiring grad) or forward mode (inside a dual level, whose dual tensors need not
    require grad). Otherwise the kernels run directly, without autograd's bookkeeping."""
    if torch.is_grad_enabled():
        for t in tensors:  # a plain loop: any() over a generator costs ~1 µs at batch 10
            if t is not None and t.requires_grad:
                return True
    return forward_ad_active()


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is open (torch.autograd.forward_ad.dual_level)."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def backward_in_torch_ops(grad: torch.Tensor) -> bool:
    """Whether a Function's backward must run the reference's torch ops, which autograd and vmap
    see through, rather than kernels: under create_graph (double backward: grad mode is on inside
    backward), under a torch.func transform, or for a batched gradient without storage
    (gradcheck's batched check runs backward under the legacy vmap)."""
    return (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or not _has_storage(grad))


def scaled(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """``grad · grad_output``: a gradient the forward pass formed, scaled by the incoming gradient
    of a scalar loss. Where that is a CPU scalar exactly 1 (``loss.backward()``), ``grad`` itself:
    x · 1 is x for every float (NaN and -0 included), and the product would be one more pass over
    memory and a fresh allocation (softmax regression's input gradient: 800 KB, a sixth of its
    fused step on a 2-core CPU). autograd releases the saved copy before it accumulates, so
    ``.grad`` takes the tensor without copying it; under retain_graph it copies, as for any
    gradient still referenced. Never where backward runs torch ops (double backward must see the
    product with grad_output; vmap's batched grad_output has no one value)."""
    return scaled_all((grad,), grad_output)[0]


def scaled_all(grads, grad_output: torch.Tensor) -> tuple:
    """``scaled`` for each gradient of one loss (None stays None), the test for a unit
    grad_output made once: it costs ~4 µs (a softmax-regression step scales three gradients)."""
    unit = (grad_output.device.type == "cpu" and grad_output.dim() == 0 and not backward_in_torch_ops(grad_output)
            and grad_output.item() == 1)
    return tuple(None if g is None
                 else g if unit and g.device.type == "cpu" and g.dtype == grad_output.dtype
                 else g * grad_output for g in grads)


def relu_in_place(out: torch.Tensor) -> torch.Tensor:
    """The ReLU of ``out``, a layer's fresh output that only the ReLU reads: in place, sparing an
    allocation and a pass, except where autograd would record it as an in-place op on a *view*
    (``out`` a view of a product's result: a Linear's on (B, L, D) sequences, a 1x1 convolution's
    channels-last view of an addmm). There the backward (CopySlices) allocates the base's
    gradient, fills it with zeros and copies into it, which costs more than it spares: a patched
    MLP trained on (8, 34, 64) sequences ran at 0.89x torch's speed with five more copies and
    fills a step. torch.relu there, out of place as torch's nn.ReLU. (A caller that makes the
    view itself applies the ReLU to the product before it: fastml/_pointwise.py.)

    The test reads two of the tensor's attributes, which a TorchFunctionMode or a tensor
    subclass would see (as ``__get__`` calls torch's own module never makes): for those, in
    place as before, so they see the calls they see unpatched."""
    if relu_out_of_place(out):
        return torch.relu(out)
    return out.relu_()


def relu_out_of_place(out: torch.Tensor) -> bool:
    """Whether relu_in_place applies its ReLU out of place to ``out`` (see there)."""
    return out.__class__ is _TENSOR and not function_mode_active() and out._base is not None and out.requires_grad


_TENSOR = torch.Tensor


def shape_class(op: str, phase: str, tensors, *arguments) -> tuple:
    """The shape class of a call, the key of its measured choice (fastml/_tune.py): the op and
    phase, the thread count, each tensor's shape (None for an absent one), the first tensor's
    dtype and device, whether each is contiguous, and the arguments that change a kernel's cost.
    Built on every call, so kept to a tuple of cheap, hashable items."""
    first = tensors[0]
    # list comprehensions: tuple(<generator>) costs ~0.4 µs more per call, which counts at batch 10
    shapes = tuple([None if t is None else t.shape for t in tensors])
    layout = tuple([t is None or t.is_contiguous() for t in tensors])
    return (op, phase, _threads(), first.dtype, first.device, shapes, layout, *arguments)


def backward_class(op: str, like: torch.Tensor, shapes: tuple, *arguments) -> tuple:
    """A Function's backward shape class, known going forward (its contiguous gradient's shape
    among ``shapes``): what shape_class gives for the backward's tensors, every one contiguous
    (a Function's backward makes the gradient contiguous; its saved inputs are)."""
    return (op, "backward", _threads(), like.dtype, like.device, tuple(torch.Size(s) for s in shapes),
            (True,) * len(shapes), *arguments)


_threads = torch.get_num_threads


def graph_backend(op: str, phase: str, implemented: tuple[str, ...], arguments: tuple, run) -> str:
    """The measured choice inside a fastml:: custom op's implementation (a compiled graph's call):
    the shape class from the op's ``arguments`` (tensors by shape, lists as tuples, the rest as
    they are), ``run(name)`` timing the op's body on backend ``name``. Graph calls are classes of
    their own ("graph " + phase): their arguments are laid out as the custom op's schema has them."""
    tensors = tuple(a for a in arguments if isinstance(a, torch.Tensor))
    others = tuple(tuple(a) if isinstance(a, list) else a for a in arguments if not isinstance(a, torch.Tensor))
    return _backend.select(tensors[0], implemented, shape_class(op, "graph " + phase, tensors, *others), run)


def forced_backend() -> bool:
    """Whether fastml.use_backend / FASTML_BACKEND forces the backend now: a Function records it
    going forward, so that its backward runs on the same backend even outside the ``with``."""
    return _backend.requested() is not None


def keep_dispatch(ctx, backend: str) -> None:
    """What a Function's forward keeps for ``backward_backend``: the forward's ``backend``,
    whether it was forced (``forced_backend``), and the layer deciding (``_tune.scope``), whose
    families the backward's classes join although autograd runs it after the layer's call."""
    ctx.backend, ctx.forced, ctx.tune_scope = backend, forced_backend(), _tune.current_scope()


def backward_backend(ctx, grad: torch.Tensor, implemented: tuple[str, ...], run, key: tuple | None = None) -> str:
    """The backend a Function's backward runs on: torch ops where backward_in_torch_ops; the
    forward's where that was forced; otherwise the measured choice for the backward's own shape
    class (forward and backward are decided separately): ``key``, by default the one the forward
    worked out (``ctx.backward_key``), ``run(name)`` timing it."""
    if backward_in_torch_ops(grad):
        return "reference"
    if ctx.forced:
        return ctx.backend
    return _backend.select(grad, implemented, ctx.backward_key if key is None else key, run, ctx.tune_scope)


_has_storage = getattr(torch._C, "_has_storage", lambda t: True)

is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)
"""Whether torch.compile / torch.export's dynamo is tracing (torch >= 2.3; never, before)."""

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: True)


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing (its dynamo exporter traces with torch.export, where
    fastml's ops would be custom ops no ONNX operator implements): fastml then traces torch's
    ops, and the exported model is the torch model's. Asked only where is_compiling is; and
    torch.compile, which is not exporting, never reaches torch.onnx's check (it imports)."""
    return _is_exporting() and torch.onnx.is_in_onnx_export()


_dispatch_stack_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
dispatch_mode_depth = _dispatch_stack_depth
"""How many Python dispatch modes are on (torch's own query): ``dispatch_mode_active`` without
its Python frame, for the check every drop-in layer's call makes (fastml/_route.py)."""
function_mode_active = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)
"""Whether a Python TorchFunctionMode is on (torch's own query, ~25 ns)."""


def dispatch_mode_active() -> bool:
    """Whether a Python dispatch mode (torch.utils._python_dispatch.TorchDispatchMode) is on:
    FakeTensorMode (whose tensors have no data: a kernel given their pointers would crash),
    FlopCounterMode, a debugging or logging mode. Such a mode sees torch's ops and not a kernel
    call, so torch's ops run (as they would unpatched). ~25 ns; not for dynamo to trace (callers
    test is_compiling first)."""
    return _dispatch_stack_depth() > 0


LIBRARY = all(hasattr(torch.library, name) for name in ("custom_op", "register_fake", "register_autograd"))
"""Whether this torch (>= 2.4) has torch.library.custom_op: fastml/_library.py then registers
every op as fastml::<op> (ops/<op>/library.py), which torch.compile and torch.export trace."""


def in_custom_op_graph() -> bool:
    """Whether a call is being traced into a graph (torch.compile, torch.export) and goes to
    torch.ops.fastml.<op>, whose implementation picks the backend and runs the same kernels when
    the graph runs. Eager calls stay on the autograd.Functions, because a custom op's dispatch
    costs ~6 µs more per call without autograd and ~30 µs more per forward + backward (batch
    10, torch 2.13, CPU: linear 11.7 against 5.7 µs without grad, 63 against 35 µs with;
    linear_mse 65 against 32 µs), too much beside a whole softmax-regression step of ~130 µs.
    This check costs ~65 ns."""
    return LIBRARY and is_compiling()


def needs_grad(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    """Per tensor, whether the graph being traced wants its gradient: what an autograd.Function's
    ctx.needs_input_grad will say, known before the call (a custom op's forward is told)."""
    grad = torch.is_grad_enabled()
    return tuple(grad and t is not None and t.requires_grad for t in tensors)


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor where a custom op has nothing to return (its schema has no optional
    outputs): of ``like``'s dtype and device, shape (0,)."""
    return like.new_empty(0)


def or_placeholder(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return placeholder(like) if t is None else t


def gradient_outputs(grads, needs, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A backend's gradients as a custom op returns them: the placeholder for each one not
    asked for (``needs``, one flag per gradient)."""
    return tuple(or_placeholder(g if need else None, like) for g, need in zip(grads, needs))


def gradient_fakes(like: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs) -> tuple[torch.Tensor, ...]:
    """A layer's uninitialised (grad_x, grad_weight, grad_bias), the bias being weight's first
    dimension, of ``like``'s dtype and device: the placeholder for each one not asked for."""
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return tuple(like.new_empty(shape) if need else placeholder(like) for shape, need in zip(shapes, needs))


def asked(grads, needs) -> tuple[torch.Tensor | None, ...]:
    """Gradients as autograd takes them: None for each one not asked for (whatever a custom op
    returned there)."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
