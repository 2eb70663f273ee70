"""``fastml.patch(model)``: put fastml's drop-in modules into an existing torch model, in place,
and ``fastml.unpatch(model)`` to take them out again.

One-for-one replacements (Linear, Conv2d, MaxPool2d, BatchNorm2d, MSELoss, CrossEntropyLoss) swap the
module's ``__class__`` to its fastml twin. The twins subclass the torch classes and change only
``forward``, so the swap keeps the very same object: its Parameters (an optimizer built before
still steps the model), buffers, hooks, training flag and any attribute the user set. Building
new modules instead would need every one of those copied and every outside reference (a
variable, a second place in the tree) re-pointed. Only modules whose type is exactly the torch
class are swapped: a subclass may have its own forward or rely on torch's.

Every configuration an exact torch class accepts is covered, because fastml's modules fall back
to torch's own op where no kernel fits (padding_mode, dtypes, return_indices, ...): nothing is
left out for its configuration, except fusion below.

Fusion: Conv2d → ReLU → MaxPool2d, consecutive in a module that chains its children as
nn.Sequential does, becomes one ConvReLUPool2d at the conv's key, and the ReLU's and pool's keys
hold FusedSlots (nn.Identity that apply the ReLU or pool to any input but the run's own output:
fastml/_runs.py), so indices and state_dict keys stay as they were. Here a new module is built
(sharing the conv's Parameters) rather than the conv's class swapped: a reference to the conv
held elsewhere must keep meaning "a convolution". The originals are kept on the fused module so
that unpatch puts the same objects back.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from fastml import _fold, _layout, _recycle, _route, _runs
from fastml import nn as fastml_nn

__all__ = ["Fused", "FusedSlot", "Left", "PatchReport", "Replaced", "patch", "unpatch"]

# op name → (torch class, fastml twin)
_ONE_FOR_ONE = {
    "linear": (torch.nn.Linear, fastml_nn.Linear),
    "conv2d": (torch.nn.Conv2d, fastml_nn.Conv2d),
    "max_pool2d": (torch.nn.MaxPool2d, fastml_nn.MaxPool2d),
    "batch_norm": (torch.nn.BatchNorm2d, fastml_nn.BatchNorm2d),
    "mse_loss": (torch.nn.MSELoss, fastml_nn.MSELoss),
    "cross_entropy": (torch.nn.CrossEntropyLoss, fastml_nn.CrossEntropyLoss),
}
_FUSION = "conv_relu_pool"
_FOLD = "conv_bn"
_RELU_EPILOGUE = "conv_relu"
_LINEAR_RELU = "linear_relu"
_BN_RELU = "bn_relu"
OPS = (*_ONE_FOR_ONE, _FUSION, _FOLD, _RELU_EPILOGUE, _LINEAR_RELU, _BN_RELU)

_OP_OF_TORCH = {torch_cls: op for op, (torch_cls, _) in _ONE_FOR_ONE.items()}
_TORCH_OF_FASTML = {fastml_cls: torch_cls for torch_cls, fastml_cls in _ONE_FOR_ONE.values()}
_COVERED_TORCH = tuple(_OP_OF_TORCH)
_FASTML_MODULES = tuple(getattr(fastml_nn, name) for name in fastml_nn.__all__)

# A module patch swapped carries this attribute, so unpatch undoes patch and nothing else: a
# model the user built from fastml.nn modules keeps them. An attribute (not a registry) survives
# deepcopy and pickling of the patched model.
_SWAPPED = "_fastml_patched"
_FUSED_RUN = _runs.FUSED_RUN  # on a ConvReLUPool2d patch built: the _FusedRun
_PLACEHOLDER = "_fastml_fused_placeholder"  # on the FusedSlot in a fused-away slot

# Every per-module hook dict torch has (some only in newer versions). A fused run would skip the
# conv's output and the ReLU's and pool's calls, which forward / backward hooks observe; state
# dict hooks would be lost on the new module.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


@dataclasses.dataclass(frozen=True)
class Replaced:
    """One module whose class changed: ``name`` is its qualified name ("" for the model itself);
    ``note``: what else the report says of it (a batch norm's reason for not folding)."""
    name: str
    old: str
    new: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Fused:
    """A Conv2d → ReLU → MaxPool2d run (its three qualified names) fused, or split by unpatch."""
    names: tuple[str, ...]
    old: str
    new: str


@dataclasses.dataclass(frozen=True)
class Left:
    """A module (or a run: several names, comma-separated) left as it was, and why."""
    name: str
    type: str
    reason: str


@dataclasses.dataclass
class PatchReport:
    """What ``fastml.patch`` (or ``fastml.unpatch``, by ``action``) replaced, fused and left."""
    action: str = "patch"
    replaced: list[Replaced] = dataclasses.field(default_factory=list)
    fused: list[Fused] = dataclasses.field(default_factory=list)
    left: list[Left] = dataclasses.field(default_factory=list)
    tuning: object = None  # fastml.tune's TuneTable when patch was given example_inputs
    layout: str = ""  # the model-wide layout change patch(channels_last=True) made, or unpatch undid

    def runs(self, name: str) -> str:
        """Which implementation layer ``name`` runs, per phase, once tuned ("" if not known)."""
        phases = self.tuning.by_layer().get(name, {}) if self.tuning is not None else {}
        return ", ".join(f"{phase}: {how}" for phase, how in phases.items())

    @property
    def changed(self) -> bool:
        """Whether the call changed the model at all."""
        return bool(self.replaced or self.fused or self.layout)

    def __str__(self) -> str:
        swapped, joined = ("replaced", "fused") if self.action == "patch" else ("restored", "unfused")
        rows = [(swapped, _display(r.name), f"{r.old} → {r.new}{self._runs_note(r.name)}{_note(r.note)}")
                for r in self.replaced]
        rows += [(joined, ", ".join(map(_display, f.names)), f"{f.old} → {f.new}{self._runs_note(f.names[0])}")
                 for f in self.fused]
        rows += [("left", _display(x.name), f"{x.type}: {x.reason}") for x in self.left]
        if self.layout:
            rows.insert(0, ("layout", "(model)", self.layout))
        head = (f"fastml.{self.action}: {len(self.replaced)} {swapped}, {len(self.fused)} {joined}, "
                f"{len(self.left)} left")
        if not rows:
            return head
        name_width = max(len(name) for _, name, _ in rows)
        return "\n".join([head] + [f"  {kind:<8}  {name:<{name_width}}  {what}" for kind, name, what in rows])


    def _runs_note(self, name: str) -> str:
        runs = self.runs(name)
        return f"  [{runs}]" if runs else ""


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def _display(name: str) -> str:
    return name or "(model)"


@dataclasses.dataclass(eq=False)
class _FusedRun:
    """What a fused run replaced, kept for unpatch: the original modules, the keys of the ReLU's
    and pool's slots in their parent, and the FusedSlot placeholders patch put there; and for
    fastml/_runs.py, the fused module and its parent, which calls the run. A plain object, not a
    Module, so the originals stay out of the model's modules() and state_dict."""
    conv: torch.nn.Module
    relu: torch.nn.Module
    pool: torch.nn.Module
    relu_key: str
    pool_key: str
    relu_slot: torch.nn.Module
    pool_slot: torch.nn.Module
    fused: torch.nn.Module
    owner: torch.nn.Module

    @property
    def members(self) -> tuple:
        return self.fused, self.relu_slot, self.pool_slot

    @property
    def slots(self) -> tuple:
        return (self.owner, self.relu_key, self.relu_slot), (self.owner, self.pool_key, self.pool_slot)


class FusedSlot(torch.nn.Identity):
    """The slot of a fused run's ReLU or MaxPool2d: passes through the output of the
    ConvReLUPool2d before it, called as the model calls the run; on any other input (a slice of
    the model that ends inside the run, a loop over its members) it applies the module it stands
    for, as that module would (fastml/_runs.py)."""

    def __init__(self, replaced: torch.nn.Module) -> None:
        super().__init__()
        self.training = replaced.training  # model.eval() / train() state reads the same
        self.__dict__["replaced"] = replaced  # a plain attribute: not a submodule, not in state_dict
        setattr(self, _PLACEHOLDER, True)

    def extra_repr(self) -> str:
        return f"fused, stands for {self.replaced!r}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the fused module scripts as the three ops
            return input
        return self._eager_forward(input)

    def _eager_forward(self, input):
        """forward outside TorchScript (as fastml/_fold.py's)."""
        if isinstance(input, _route.PROXY):  # traced: a call of the slot, which decides when the graph runs
            return _route.traced(self, (input,), lambda x: x)
        if _runs.whole_runs() or _runs.passes(self, input):
            return input
        return self.replaced(input)


def _type_name(cls: type) -> str:
    for prefix, namespace in (("torch.nn", torch.nn), ("fastml.nn", fastml_nn)):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _run_type(*modules) -> str:
    # "+" rather than "→", which the report uses for old → new
    return " + ".join(_type_name(type(m)) for m in modules)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_model(model, function: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{function}() argument 'model' must be a torch.nn.Module, got {type(model).__name__}")


def _parse_ops(ops) -> frozenset[str]:
    """The selected op names. A single string is one name: iterating it would give letters."""
    if ops is None:
        return frozenset(OPS)
    if isinstance(ops, str):
        ops = (ops,)
    try:
        names = list(ops)
    except TypeError:
        raise TypeError(f"patch() argument 'ops' must be None, an op name or an iterable of op names, "
                        f"got {type(ops).__name__}") from None
    not_str = [n for n in names if not isinstance(n, str)]
    if not_str:
        raise TypeError(f"patch() argument 'ops' must hold op names (str), got {not_str[0]!r} "
                        f"({type(not_str[0]).__name__})")
    unknown = sorted(set(names) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op name(s) in patch() argument 'ops': {', '.join(map(repr, unknown))}; "
                         f"valid names: {', '.join(map(repr, OPS))}")
    return frozenset(names)


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in _HOOK_DICTS)


def _pair(value):
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return value[0], value[0]
    return tuple(value) if isinstance(value, (tuple, list)) else value


def _is_conv(module) -> bool:
    # a fastml Conv2d (from an earlier patch with ops=["conv2d"], or the user's) fuses as well
    return type(module) in (torch.nn.Conv2d, fastml_nn.Conv2d)


def _is_linear(module) -> bool:
    return type(module) in (torch.nn.Linear, fastml_nn.Linear)


def _is_relu(module) -> bool:
    # a FoldedReLU: another run's already, which a ReLU called in several places is
    return type(module) in (torch.nn.ReLU, _fold.FoldedReLU)


def _is_pool(module) -> bool:
    return type(module) in (torch.nn.MaxPool2d, fastml_nn.MaxPool2d)


def _chains_children(module: torch.nn.Module) -> bool:
    """Whether forward feeds each child's output to the next, so adjacent children can fuse: an
    nn.Sequential, or a subclass that keeps Sequential's forward."""
    return isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward


def _fusion_obstacles(conv, relu, pool) -> list[str]:
    """Why this run cannot become one ConvReLUPool2d (empty if it can). ConvReLUPool2d takes the
    conv's own arguments but pools with only a kernel size and stride, zero-padded convolution."""
    reasons = []
    if conv.padding_mode != "zeros":
        reasons.append(f"the conv's padding_mode={conv.padding_mode!r} (ConvReLUPool2d pads with zeros only)")
    if _pair(pool.padding) != (0, 0):
        reasons.append(f"the pool's padding={pool.padding!r} (ConvReLUPool2d pools without padding)")
    if _pair(pool.dilation) != (1, 1):
        reasons.append(f"the pool's dilation={pool.dilation!r} (ConvReLUPool2d pools without dilation)")
    if pool.ceil_mode:
        reasons.append("the pool's ceil_mode=True (ConvReLUPool2d rounds the output size down)")
    if pool.return_indices:
        reasons.append("the pool's return_indices=True (ConvReLUPool2d returns no indices)")
    hooked = [role for role, m in (("conv", conv), ("ReLU", relu), ("pool", pool)) if _has_hooks(m)]
    if hooked:
        reasons.append(f"hooks on the {', '.join(hooked)} (a fused module would not call them as before)")
    return reasons


def _share_state(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Points target's parameters and buffers at source's very tensors (no copies), in order."""
    target._parameters.clear()
    target._parameters.update(source._parameters)
    target._buffers.clear()
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set.clear()
    target._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
    target.training = source.training


def _fuse(parent, keys, conv, relu, pool) -> torch.nn.Module:
    # Built on the meta device: no memory, no use of the random generator; the conv's own
    # Parameters then take the place of the meta ones.
    fused = fastml_nn.ConvReLUPool2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                                     pool_kernel_size=pool.kernel_size, pool_stride=pool.stride, device="meta")
    _share_state(conv, fused)
    conv_key, relu_key, pool_key = keys
    run = _FusedRun(conv, relu, pool, relu_key, pool_key, FusedSlot(relu), FusedSlot(pool), fused, parent)
    setattr(fused, _FUSED_RUN, run)
    # Assigning to an existing key keeps its place in the parent's ordered dict of children.
    parent._modules[conv_key] = fused
    parent._modules[relu_key] = run.relu_slot
    parent._modules[pool_key] = run.pool_slot
    return fused


def patch(model: torch.nn.Module, ops=None, *, example_inputs=None, fx: bool = False,
          channels_last: bool = False) -> PatchReport:
    """Replaces, in place, the torch modules of ``model`` that fastml covers by fastml's, and
    returns a :class:`PatchReport` of what it replaced, fused and left (and why).

    ``ops``: None for all, else an op name or an iterable of them: "linear" (nn.Linear),
    "conv2d" (nn.Conv2d), "max_pool2d" (nn.MaxPool2d), "batch_norm" (nn.BatchNorm2d not folded
    into a conv: fastml's kernels in training), "mse_loss" (nn.MSELoss), "cross_entropy"
    (nn.CrossEntropyLoss), "conv_relu_pool" (Conv2d → ReLU → MaxPool2d in an nn.Sequential
    becomes one fastml.nn.ConvReLUPool2d; the ReLU's and pool's slots hold FusedSlots) and
    "conv_bn" (Conv2d → BatchNorm2d, and a ReLU after it, in an nn.Sequential: in eval mode one
    convolution with the batch norm folded into its weight and bias, the ReLU in place; in
    training mode the conv, then fastml's batch norm with the ReLU in its normalising pass.
    Classes change, objects and keys do not: fastml/_fold.py)
    and "conv_relu" (Conv2d → ReLU in an nn.Sequential, not followed by a pool that
    "conv_relu_pool" fuses: the ReLU on the convolution's own output, in place or in oneDNN's
    epilogue) and "linear_relu" (Linear → ReLU in an nn.Sequential: the ReLU in place on the
    linear's own output) and "bn_relu" (BatchNorm2d → ReLU in an nn.Sequential, no conv before
    the batch norm: the ReLU in the batch norm's training kernel, or in place after it in eval).
    A ReLU module called in several places (ResNet's blocks) takes part in each run it follows:
    it then passes through only what a run marked as its output, and applies itself elsewhere.

    ``fx``: also fold the Conv2d → BatchNorm2d (→ ReLU) runs, and the Conv2d → ReLU, Linear →
    ReLU and BatchNorm2d → ReLU pairs, that a model's ``forward`` calls outside any nn.Sequential
    (ResNet's blocks, DenseNet's layers), found by tracing it with torch.fx in training and in
    eval mode: only where both traces show each module called once (a ReLU may be called more
    often: see above) and the conv's (or linear's) output read by the batch norm (or the ReLU)
    alone, and the batch norm's by the ReLU alone for the ReLU to fold. A model torch.fx cannot
    trace is left as it is, and the report says why. Whatever the traces' forward calls keep on
    the modules (a mask built at the first call) is taken back after.

    Parameters, buffers and hooks stay the same objects (an optimizer built before keeps
    working), state_dict keys do not change, and only modules whose type is exactly the torch
    class are replaced. Patching again replaces nothing new. ``fastml.unpatch`` undoes it.

    ``channels_last``: run the model's activations in the channels-last layout, converting its 4-D
    inputs once and 4-D outputs back (fastml/_layout.py): oneDNN's convolutions are faster on it,
    and there they run on a weight packed once with the ReLU in their epilogue. Explicit, because
    code inside ``forward`` then sees channels-last strides (``.view`` on a 4-D activation would
    fail). ``fastml.tune`` keeps the layout only where the whole model measured faster with it.

    ``example_inputs``: a tuple of inputs for ``model(*example_inputs)``; when given, the patched
    model is tuned (``fastml.tune``) and the report says which implementation each layer runs,
    forward and backward (fastml's kernel, or torch's where that measured faster).
    """
    _check_model(model, "patch")
    selected = _parse_ops(ops)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"patch() argument 'example_inputs' must be a tuple of the model's inputs, "
                        f"got {type(example_inputs).__name__}")
    if not isinstance(fx, bool):
        raise TypeError(f"patch() argument 'fx' must be a bool, got {type(fx).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"patch() argument 'channels_last' must be a bool, got {type(channels_last).__name__}")
    report = PatchReport("patch")
    _route.run_as_torch(model, False)  # a model tune left running as unpatched: fastml's classes first
    if channels_last and _layout.apply(model):
        report.layout = _CHANNELS_LAST_DESCRIPTION
    seen: set = set()
    shared = _shared_modules(model)
    if fx and selected & {_FOLD, _RELU_EPILOGUE, _LINEAR_RELU, _BN_RELU}:
        seen.update(_fold_traced(model, report, selected, shared))
    _patch_tree(model, "", selected, report, seen, shared)
    if example_inputs is not None:
        from fastml._tune_model import tune

        report.tuning = tune(model, *example_inputs)
    return report


def _shared_modules(model: torch.nn.Module) -> set[int]:
    """The ids of the modules registered in more than one place in ``model``: a fold makes a batch
    norm or ReLU pass its input through, which would be wrong wherever else it is called."""
    counts = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def _patch_tree(module, name, selected, report, seen, shared) -> None:
    if module in seen:  # a module registered in several places is patched (and reported) once
        return
    seen.add(module)
    _patch_module(module, name, selected, report)
    if _FOLD in selected and _chains_children(module):
        seen.update(_fold_runs(module, name, report, shared))
    if _FUSION in selected and _chains_children(module):
        seen.update(_fuse_runs(module, name, report))
    if selected & {_RELU_EPILOGUE, _LINEAR_RELU} and _chains_children(module):  # after the fusion: its runs have a pool
        seen.update(_relu_runs(module, name, report, shared, selected))
    if _BN_RELU in selected and _chains_children(module):  # after conv_bn: a batch norm after a conv folds there
        seen.update(_bn_relu_runs(module, name, report, shared))
    for key, child in list(module._modules.items()):
        if child is not None:
            _patch_tree(child, _join(name, key), selected, report, seen, shared)


def _patch_module(module, name, selected, report) -> None:
    cls = type(module)
    run = _fold.fold_of(module)
    if run is not None:  # folded by an earlier patch: reported once, at its conv
        if module is (run.layer or run.bn):
            report.left.append(Left(name, _type_name(cls), "already fastml (folded by an earlier patch)"))
    elif cls in _OP_OF_TORCH:
        op = _OP_OF_TORCH[cls]
        if op not in selected:
            report.left.append(Left(name, _type_name(cls), f"op {op!r} not in ops"))
            return
        new = _ONE_FOR_ONE[op][1]
        module.__class__ = new
        setattr(module, _SWAPPED, True)
        note = _BN_NOT_FOLDED if new is fastml_nn.BatchNorm2d else ""
        report.replaced.append(Replaced(name, _type_name(cls), _type_name(new), note))
    elif isinstance(module, _FASTML_MODULES):
        if getattr(module, _SWAPPED, False):
            reason = "already fastml (replaced by an earlier patch)"
        elif hasattr(module, _FUSED_RUN):
            reason = "already fastml (fused by an earlier patch)"
        else:
            reason = "already fastml (built so)"
        report.left.append(Left(name, _type_name(cls), reason))
    elif getattr(module, _PLACEHOLDER, False):
        return  # a fused-away slot from an earlier patch: reported with its ConvReLUPool2d
    elif isinstance(module, _COVERED_TORCH):
        base = next(c for c in _COVERED_TORCH if isinstance(module, c))
        report.left.append(Left(name, _type_name(cls), f"a subclass of {_type_name(base)}: only exact torch "
                                                        "classes are replaced (a subclass may change forward)"))
    elif not module._modules:  # containers are walked, not reported
        report.left.append(Left(name, _type_name(cls), "no fastml module for this type"))


def _fuse_runs(parent, name, report) -> list[torch.nn.Module]:
    """Fuses every Conv2d → ReLU → MaxPool2d run among parent's children; returns the new modules."""
    items = list(parent._modules.items())
    created = []
    i = 0
    while i + 2 < len(items):
        (conv_key, conv), (relu_key, relu), (pool_key, pool) = items[i:i + 3]
        if not (_is_conv(conv) and type(relu) is torch.nn.ReLU and _is_pool(pool)):
            i += 1
            continue
        keys = (conv_key, relu_key, pool_key)
        names = tuple(_join(name, k) for k in keys)
        run_type = _run_type(conv, relu, pool)
        obstacles = _fusion_obstacles(conv, relu, pool)
        if obstacles:
            report.left.append(Left(", ".join(names), run_type, "not fused: " + "; ".join(obstacles)))
            i += 1
            continue
        fused = _fuse(parent, keys, conv, relu, pool)
        run = getattr(fused, _FUSED_RUN)
        created += [fused, run.relu_slot, run.pool_slot]
        report.fused.append(Fused(names, run_type, _type_name(type(fused))))
        i += 3
    return created


def _fold_obstacles(conv, bn, relu, shared) -> list[str]:
    reasons = _fold.obstacles(conv, bn, relu)
    # (a ReLU sitting elsewhere too folds: it passes through only the run's marked output)
    in_places = [role for role, m in (("conv", conv), ("batch norm", bn)) if m is not None and id(m) in shared]
    if in_places:
        reasons.append(f"the {', '.join(in_places)} also sits elsewhere in the model (folded, it would pass its "
                       "input through there too)")
    hooked = [role for role, m in (("conv", conv), ("batch norm", bn), ("ReLU", relu)) if m is not None and _has_hooks(m)]
    if hooked:
        reasons.append(f"hooks on the {', '.join(hooked)} (a folded run would not call them as before)")
    return reasons


def _is_plain_bn(module) -> bool:
    return type(module) is torch.nn.BatchNorm2d


def _fold_one(conv, bn, relu, names, report, shared, caller, slots, relu_called_once=True) -> list[torch.nn.Module]:
    # conv: the run's Conv2d, or (no batch norm) its Linear
    """Folds one run, or reports why not; returns the modules folded. ``caller``: the module whose
    forward calls the run; ``slots``: (parent, key, module) for each module after the first
    (fastml/_runs.py). ``relu_called_once``: whether the model calls the ReLU module only here (a
    trace tells; in an nn.Sequential, a module sitting in one place is called once)."""
    modules = [m for m in (conv, bn, relu) if m is not None]
    owner = None if relu is None else _fold.fold_of(relu)  # a ReLU another run folded already
    run_type = _run_type(*modules[:-1]) + f" + {_type_name(owner.classes[2])}" if owner else _run_type(*modules)
    obstacles = _fold_obstacles(conv, bn, relu, shared)
    if obstacles:
        report.left.append(Left(", ".join(names), run_type, "not folded: " + "; ".join(obstacles)))
        return []
    _fold.fold(conv, bn, relu, names, caller, slots, relu_exclusive=relu_called_once and id(relu) not in shared)
    description = (_BN_RELU_DESCRIPTION if conv is None else _FOLDED_DESCRIPTION if bn is not None
                   else _LINEAR_RELU_DESCRIPTION if isinstance(conv, torch.nn.Linear) else _RELU_DESCRIPTION)
    report.fused.append(Fused(names, run_type, description))
    return modules


_BN_NOT_FOLDED = ("not folded: no Conv2d right before it in an nn.Sequential; fastml.patch(model, fx=True) also "
                  "folds the runs forward() calls")
_CHANNELS_LAST_DESCRIPTION = ("activations channels-last between the input and the output (4-D inputs converted "
                              "once, 4-D outputs converted back)")
_LINEAR_RELU_DESCRIPTION = "fastml linear with the ReLU on its output (in place)"
_BN_RELU_DESCRIPTION = "fastml batch norm with the ReLU in its pass (training), or in place on its output (eval)"
_RELU_DESCRIPTION = "fastml conv with the ReLU on its output (in place, or in oneDNN's epilogue)"
_FOLDED_DESCRIPTION = ("fastml folded conv (eval: one convolution with the batch norm folded in, then any ReLU in "
                       "place; training: fastml's batch norm, any ReLU in its pass)")


def _fold_runs(parent, name, report, shared) -> list[torch.nn.Module]:
    """Folds every Conv2d → BatchNorm2d (→ ReLU) run among parent's children."""
    items = list(parent._modules.items())
    folded = []
    i = 0
    while i + 1 < len(items):
        (conv_key, conv), (bn_key, bn) = items[i:i + 2]
        if not (_is_conv(conv) and _is_plain_bn(bn)):
            i += 1
            continue
        relu_item = items[i + 2] if i + 2 < len(items) and _is_relu(items[i + 2][1]) else None
        keys = (conv_key, bn_key) + ((relu_item[0],) if relu_item else ())
        slots = tuple((parent, key, module) for key, module in items[i + 1:i + len(keys)])
        done = _fold_one(conv, bn, relu_item[1] if relu_item else None, tuple(_join(name, k) for k in keys), report,
                         shared, parent, slots)
        folded += done
        i += len(keys) if done else 1
    return folded


def _relu_runs(parent, name, report, shared, selected) -> list[torch.nn.Module]:
    """Gives every Conv2d → ReLU (op "conv_relu") and Linear → ReLU (op "linear_relu") pair among
    parent's children, not folded or fused already, the ReLU on the layer's own output."""
    items = list(parent._modules.items())
    done = []
    for (key, layer), (relu_key, relu) in zip(items, items[1:]):
        if not _is_relu(relu) or _fold.fold_of(layer) is not None:
            continue
        if (_is_conv(layer) and _RELU_EPILOGUE in selected) or (_is_linear(layer) and _LINEAR_RELU in selected):
            done += _fold_one(layer, None, relu, (_join(name, key), _join(name, relu_key)), report, shared, parent,
                              ((parent, relu_key, relu),))
    return done


def _bn_relu_runs(parent, name, report, shared) -> list[torch.nn.Module]:
    """Gives every BatchNorm2d → ReLU pair among parent's children, the batch norm not folded into
    a conv already, the ReLU in the batch norm's pass (op "bn_relu")."""
    items = list(parent._modules.items())
    done = []
    for (key, bn), (relu_key, relu) in zip(items, items[1:]):
        if _is_plain_bn(bn) and _fold.fold_of(bn) is None and _is_relu(relu):
            done += _fold_one(None, bn, relu, (_join(name, key), _join(name, relu_key)), report, shared, parent,
                              ((parent, relu_key, relu),))
    return done


def _fold_traced(model, report, selected, shared) -> list[torch.nn.Module]:
    """Folds the Conv2d → BatchNorm2d (→ ReLU) runs (op "conv_bn"), and gives the Conv2d → ReLU
    pairs their epilogue (op "conv_relu"), that a torch.fx trace of ``model`` shows (see patch's
    ``fx``); returns the modules folded.

    The model is traced in training and in eval mode, and a run folds only where both traces
    show it: a fold applies in both modes (the batch norm's kernel takes the ReLU in training),
    and a forward may read a layer's output elsewhere in one mode only (``relu(z) + z if
    self.training else relu(z)``), which a trace in the other mode would not show."""
    graphs = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    saved = [(module, _attributes(module)) for module in model.modules()]  # (the modes among them)
    for training in (True, False):
        try:
            for module in modules.values():  # (the flags only: a model's own train() may do more)
                module.training = training
            graphs[training] = _fx_trace(model)
        except Exception as exc:  # data-dependent control flow, unsupported ops: the trace is not the model
            report.left.append(Left("", _type_name(type(model)), f"not traced by torch.fx ({type(exc).__name__}: "
                                                                  f"{exc}); only runs inside nn.Sequential fold"))
            return []
        finally:  # each trace from the model as it was, and the model so after
            for module, attributes in saved:
                _restore_attributes(module, attributes)
    in_training: dict[tuple, bool] = {}

    def note(conv, bn, relu, names, relu_called_once, owner):
        if _fold_obstacles(conv, bn, relu, shared):
            return []  # (as _fold_one: the batch norm stays free to pair with its ReLU)
        in_training[names] = relu_called_once
        return [m for m in (conv, bn, relu) if m is not None]

    def slots(names):
        return tuple((modules[parent], key, modules[name]) for name in names[1:]
                     for parent, _, key in [name.rpartition(".")])

    def fold(conv, bn, relu, names, relu_called_once, owner):
        if names in in_training or _fold_obstacles(conv, bn, relu, shared):  # (the latter: reported why not)
            return _fold_one(conv, bn, relu, names, report, shared, modules[owner], slots(names),
                             relu_called_once and in_training.get(names, True))
        if conv is not None and bn is not None and any(run[:2] == names[:2] for run in in_training):
            # one mode's run has the ReLU, the other's not (it reads the batch norm's output again):
            # the conv and the batch norm fold in both
            return _fold_one(conv, bn, None, names[:2], report, shared, modules[owner], slots(names[:2]))
        return []

    _traced_runs(graphs[True], modules, selected, note)
    return _traced_runs(graphs[False], modules, selected, fold)


def _fx_trace(model: torch.nn.Module):
    """torch.fx's graph of ``model``'s forward, the layers a run folds (and fastml's) as leaves."""
    import torch.fx

    leaves = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, *_FASTML_MODULES)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            return isinstance(module, leaves) or super().is_leaf_module(module, qualified_name)

    return Tracer().trace(model)


def _traced_runs(graph, modules, selected, fold) -> list[torch.nn.Module]:
    """Calls ``fold(conv, bn, relu, names, relu_called_once, owner)`` (conv or bn None where the run
    has none; ``owner``: the name of the module whose forward calls the run) for each run ``graph``
    shows, in call order, and returns what those calls returned together: the modules folded.
    ``modules``: the model's, by name."""
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")

    def single_reader(node, relu_ok=False):
        """The call_module node that alone reads ``node``'s output as its only argument, or None;
        a module called elsewhere too only where ``relu_ok`` and it is a ReLU (which passes
        through only a folded run's marked output: fastml/_fold.py)."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs or user.target not in modules:
            return None
        if calls[user.target] != 1 and not (relu_ok and _is_relu(modules[user.target])):
            return None
        return user

    folded = []
    claimed = set()  # ids of the modules a conv's run took: its batch norm pairs with no ReLU then
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or node.target not in modules:
            continue  # (not in modules: registered by the forward during the trace, and taken back since)
        if _is_plain_bn(modules[node.target]) and _BN_RELU in selected:
            # nodes come in call order: a conv before this batch norm has folded it already
            relu_node = single_reader(node, relu_ok=True)
            if _fold.fold_of(modules[node.target]) is None and id(modules[node.target]) not in claimed \
                    and relu_node is not None and _is_relu(modules[relu_node.target]):
                folded += fold(None, modules[node.target], modules[relu_node.target],
                               (node.target, relu_node.target), calls[relu_node.target] == 1, _caller(node, modules))
            continue
        if _is_linear(modules[node.target]) and _LINEAR_RELU in selected:
            relu_node = single_reader(node, relu_ok=True)
            if relu_node is not None and _is_relu(modules[relu_node.target]):
                folded += fold(modules[node.target], None, modules[relu_node.target],
                               (node.target, relu_node.target), calls[relu_node.target] == 1, _caller(node, modules))
            continue
        if not _is_conv(modules[node.target]):
            continue
        bn_node = single_reader(node, relu_ok=True)
        if bn_node is None:
            continue
        if _is_relu(modules[bn_node.target]) and _RELU_EPILOGUE in selected:
            pool_node = single_reader(bn_node)
            if _FUSION in selected and pool_node is not None and _is_pool(modules[pool_node.target]):
                continue  # Conv2d → ReLU → MaxPool2d: for the three-op fusion, where it applies
            bn_node, relu_node = None, bn_node
        elif not _is_plain_bn(modules[bn_node.target]) or _FOLD not in selected:
            continue
        else:
            relu_node = single_reader(bn_node, relu_ok=True)
            if relu_node is not None and not _is_relu(modules[relu_node.target]):
                relu_node = None
        nodes = [n for n in (node, bn_node, relu_node) if n is not None]
        conv, bn = modules[node.target], None if bn_node is None else modules[bn_node.target]
        relu = None if relu_node is None else modules[relu_node.target]
        run = fold(conv, bn, relu, tuple(n.target for n in nodes), relu_node is None or calls[relu_node.target] == 1,
                   _caller(node, modules))
        folded += run
        claimed.update(map(id, run))
    return folded


def _caller(node, modules) -> str:
    """The name of the module whose forward made the call ``node`` records: the innermost module
    of the trace's stack other than the called one ("" for the model), or where a torch.fx
    records no stack, the called module's parent."""
    stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    if not stack:
        return node.target.rpartition(".")[0]
    while stack and stack[-1] == node.target:
        stack.pop()
    return stack[-1] if stack and stack[-1] in modules else ""


def _attributes(module: torch.nn.Module) -> tuple[dict, dict]:
    """What ``_restore_attributes`` puts back: the module's attributes, and the entries of those
    that are dicts or lists (its registries of parameters, buffers and submodules, its hooks, a
    cache of its own)."""
    attributes = module.__dict__
    return dict(attributes), {name: (dict(value) if isinstance(value, dict) else list(value))
                              for name, value in attributes.items() if isinstance(value, (dict, list))}


def _restore_attributes(module: torch.nn.Module, saved: tuple[dict, dict]) -> None:
    """The module's attributes as ``_attributes`` took them, before torch.fx ran its forward on
    proxies: a forward that keeps something on its module (a mask or a positional table built
    on the first call, a call counter, a hook it registers once) would otherwise keep the
    tracer's proxy or its side effect, and the patched model would return proxies from then on.
    Every value is put back, the same objects, rather than compared (tensors compare
    elementwise), and so are the entries of the dicts and lists among them."""
    attributes, containers = saved
    for name, entries in containers.items():
        container = attributes[name]
        if isinstance(container, dict):
            container.clear()
            container.update(entries)
        else:
            container[:] = entries
    module.__dict__.clear()
    module.__dict__.update(attributes)


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Undoes ``fastml.patch`` in place: every module it replaced is its torch class again (the
    same object, same Parameters), and every fused run is the original Conv2d, ReLU and
    MaxPool2d objects again, the conv holding the fused module's current Parameters. fastml
    modules the user built are left. Returns a :class:`PatchReport` (``action="unpatch"``).
    Hooks added to a fused module or its FusedSlots after patching are dropped with them."""
    _check_model(model, "unpatch")
    report = PatchReport("unpatch")
    _route.run_as_torch(model, False)  # fastml.tune's verdict "faster unpatched" goes with the patch
    if _layout.remove(model):
        report.layout = "activations back in the input's layout (channels-last conversion removed)"
    _unpatch_tree(model, "", report, set())
    _recycle.release()  # the gradients' blocks kept for the patched layers' next step
    return report


def _unpatch_tree(module, name, report, seen) -> None:
    if module in seen:
        return
    seen.add(module)
    # Splitting first puts the original children back, so the walk below restores their classes
    # too (a conv or pool that an earlier patch had swapped before fusing it).
    _unfuse_runs(module, name, report)
    _unpatch_module(module, name, report)
    for key, child in list(module._modules.items()):
        if child is not None:
            _unpatch_tree(child, _join(name, key), report, seen)


def _unfuse_runs(parent, name, report) -> None:
    for conv_key, fused in list(parent._modules.items()):
        run = getattr(fused, _FUSED_RUN, None) if isinstance(fused, fastml_nn.ConvReLUPool2d) else None
        if run is None:
            continue
        if parent._modules.get(run.relu_key) is not run.relu_slot or \
                parent._modules.get(run.pool_key) is not run.pool_slot:
            continue  # moved away from its slots after patching: reported by _unpatch_module
        # The fused module's current Parameters: whatever replaced them since (model.to() may
        # build new ones) is what the conv must hold.
        _share_state(fused, run.conv)
        run.relu.training = run.relu_slot.training
        run.pool.training = run.pool_slot.training
        parent._modules[conv_key] = run.conv
        parent._modules[run.relu_key] = run.relu
        parent._modules[run.pool_key] = run.pool
        names = tuple(_join(name, k) for k in (conv_key, run.relu_key, run.pool_key))
        restored = _run_type(run.conv, run.relu, run.pool)
        report.fused.append(Fused(names, _type_name(type(fused)), restored))


def _unpatch_module(module, name, report) -> None:
    _route.forget_derived_weights(module)  # what the measured choice's variants cached on the layer
    run = _fold.fold_of(module)
    if run is not None:
        folded_types = _run_type(*(m for m in (run.layer, run.bn, run.relu) if m is not None))
        _fold.unfold(run)
        restored = _run_type(*(m for m in (run.layer, run.bn, run.relu) if m is not None))
        report.fused.append(Fused(run.names, folded_types, restored))
    cls = type(module)
    if cls in _TORCH_OF_FASTML and getattr(module, _SWAPPED, False):
        old = _TORCH_OF_FASTML[cls]
        module.__class__ = old
        delattr(module, _SWAPPED)
        report.replaced.append(Replaced(name, _type_name(cls), _type_name(old)))
    elif isinstance(module, _FASTML_MODULES):
        if hasattr(module, _FUSED_RUN):
            reason = "fused by patch, but no longer beside the FusedSlots of its ReLU and MaxPool2d"
        else:
            reason = "built as a fastml module, not by fastml.patch"
        report.left.append(Left(name, _type_name(cls), reason))
