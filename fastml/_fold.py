"""Conv2d → BatchNorm2d (→ ReLU) folded into one convolution while the batch norm is in eval mode,
and Conv2d → ReLU and Linear → ReLU with the ReLU applied on the layer's own output.

In eval mode a batch norm is an affine map per channel with fixed coefficients, so after a
convolution it can be folded into the convolution's weight and bias:

    scale = gamma / sqrt(running_var + eps),  W' = W · scale,  b' = (b − running_mean) · scale + beta

One convolution with (W', b') then replaces the convolution and the batch norm's pass over the
activation, and a following ReLU runs in place on the convolution's fresh output instead of as a
third pass that allocates. The result equals the unfused modules' to rounding.

``fastml.patch`` folds by changing classes, never the model's tree: the conv becomes a
``FoldedConv2d``, the batch norm a ``FoldedBatchNorm2d``, the ReLU a ``FoldedReLU``, each the
same object in the same place, with the same Parameters, buffers and state_dict. The three share
one ``BatchNormFold`` (a plain attribute, not a submodule). At every call they ask it whether the
fold applies: only while the conv and the batch norm are both in eval mode and the batch norm
normalises with running statistics. Then the conv runs the folded convolution (and the ReLU) and
the batch norm and ReLU pass its output through; otherwise the conv and the batch norm run
unfolded, so ``model.train()`` undoes the fold at once and ``model.eval()`` redoes it. All this
only where the model calls the run (its nn.Sequential, or the forward a trace showed calling it):
called any other way (a slice of the Sequential, a member on its own), each module computes
itself, as the torch module (fastml/_runs.py).
``fastml.unpatch`` restores the classes. Unfolded (in training), the batch norm is fastml's
BatchNorm2d, and where the run has a ReLU it applies it in its normalising pass
(fastml.functional.batch_norm's ``relu``), the ReLU module passing its input through: one pass
over the activation instead of two, and one tensor allocated instead of two.

A BatchNorm2d → ReLU pair with no convolution before it (DenseNet's pre-activations) is the same
structure without the layer: never folded, the batch norm applies the ReLU in both modes (in
training, in its kernel's normalising pass).

A Conv2d → ReLU run (no batch norm) is the same structure without the batch norm, and applies in
both modes: the ReLU runs in place on the convolution's fresh output (which nothing else reads;
the convolution's backward does not need it), or in the epilogue of oneDNN's packed convolution
where the measured choice runs that (fastml/_onednn.py).

The folded weight and bias are cached while no gradient is wanted, keyed by the tensors' versions
(an optimizer step, ``load_state_dict`` or ``model.to`` changes them; a training forward of the
batch norm, whose statistics torch updates without a version bump, changes num_batches_tracked's)
and by the last step of a fused optimizer, which moves no version (``_route.state_key``), and
dropped when the modules switch mode (``model.eval()``), which also takes up a write through
``.data`` that no version shows; inference tensors, which have no versions, are folded at every
call. When a gradient is wanted they are formed with autograd each call, so every Parameter gets
its exact gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml import _layout, _route, _runs
from fastml import nn as fastml_nn
from fastml._cpp import l2_bytes
from fastml.ops import function_mode_active, is_compiling, relu_in_place, relu_out_of_place

FOLD_ATTR = "_fastml_fold"


class BatchNormFold:
    """The modules of one folded run and the cached folded parameters. A plain object, so that the
    modules it refers to stay where the model has them (and out of each other's state_dict)."""

    def __init__(self, layer: torch.nn.Conv2d | torch.nn.Linear, bn: torch.nn.BatchNorm2d | None,
                 relu: torch.nn.ReLU | None, classes: tuple[type, type | None, type | None],
                 names: tuple[str, ...], owner: torch.nn.Module, slots: tuple,
                 relu_exclusive: bool = True) -> None:
        # layer: the Conv2d (or, with no batch norm, a Linear; with no layer, a BatchNorm2d → ReLU pair)
        self.layer, self.bn, self.relu = layer, bn, relu
        self.classes = classes  # the classes before folding, which unpatch restores
        self.names = names  # the modules' qualified names, for patch's and unpatch's reports
        # The module whose forward calls the run, and (parent, key, module) for each later member:
        # the run computes as one only when called so (fastml/_runs.py).
        self.owner, self.slots = owner, slots
        # Whether this run alone calls its ReLU module, once: then, where runs compute by the rule
        # of a traced graph (fastml/_runs.py), the ReLU passes every input through; a ReLU also
        # called elsewhere (ResNet's blocks call one ReLU module two or three times) applies itself.
        self.relu_exclusive = relu_exclusive
        self._cache: tuple | None = None

    @property
    def members(self) -> tuple:
        """(layer, batch norm, ReLU), None where the run has none: the indices of ``_runs.mark``."""
        return self.layer, self.bn, self.relu

    def done(self, out: torch.Tensor, last: int) -> torch.Tensor:
        """``out``, the run's output with its members up to index ``last`` applied, marked so for
        them to pass it through."""
        return _runs.mark(out, self, last)

    def active(self) -> bool:
        """Whether the run computes as one folded convolution now: the conv and the batch norm in
        eval mode, the batch norm normalising with running statistics (torch's own condition),
        its tensors fitting the convolution's output (``_foldable``). A run without a batch norm
        always applies. None applies in a model fastml.tune found faster unpatched."""
        if self.layer is None or _route.runs_as_torch(self.layer) or _route.parametrized(self.layer):
            return False  # (no convolution to fold into: a batch norm → ReLU pair; a parametrized weight,
        bn = self.bn      # computed at each read, which torch's modules read once: fastml/_route.py)
        if bn is None:
            return True
        if self.layer.training or bn.training or _route.parametrized(bn):
            return False
        return _foldable(*self._tensors())

    def _tensors(self) -> tuple:
        """(the conv's weight and bias, the batch norm's weight, bias, running mean and variance),
        as the modules hold them now."""
        conv, bn = self.layer, self.bn
        read = _route.registered  # (not through nn.Module.__getattr__: ~0.6 us a read, six at every call)
        return (read(conv, "weight"), read(conv, "bias"), read(bn, "weight"), read(bn, "bias"),
                read(bn, "running_mean"), read(bn, "running_var"))

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') for the current Parameters and running statistics (the conv's own without a
        batch norm)."""
        conv, bn = self.layer, self.bn
        if bn is None:
            return conv.weight, conv.bias
        tensors = self._tensors()
        if is_compiling() or torch._C._are_functorch_transforms_active():
            # A traced graph computes the fold itself (and its compiler may hoist it); torch.func's
            # wrapped tensors have no storage to name a cached fold by.
            return self._fold()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            # A step may follow that changes the parameters without a version bump (the course's
            # ``param.data.sub_(...)``): the fold is formed anew at the next call without gradients.
            self.forget()
            return self._fold()
        # torch's batch_norm updates the running statistics without a version bump; the module's
        # training forward counts the batch in num_batches_tracked, whose version then moves.
        watched = (*tensors, _route.registered(bn, "num_batches_tracked"))
        states = []  # (a loop, not comprehensions: this runs at every eval call of every folded conv)
        for t in watched:
            if t is None:
                states.append(None)
                continue
            state = _route.state_key(t)
            if state is None:
                with torch.no_grad():  # an inference tensor, which no version names: folded at every call
                    return self._fold()
            states.append((id(t), state, t.dtype, t.device))
        key = (tuple(states), bn.eps, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                # The cache holds the tensors it was formed from, so no other tensor can take their
                # identity or storage (a new Parameter put in place of a freed one could, at version 0).
                self._cache = (key, tuple(_route.mark_derived(t) for t in self._fold()), watched)
        return self._cache[1]

    def forget(self) -> None:
        """Drops the cached fold: formed anew at the next call."""
        self._cache = None

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, conv_bias, bn_weight, bn_bias, running_mean, running_var = self._tensors()
        dtype = weight.dtype
        scale = torch.rsqrt(running_var.to(dtype) + self.bn.eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(dtype)
        shift = -running_mean.to(dtype) if conv_bias is None else conv_bias - running_mean.to(dtype)
        bias = shift * scale
        if bn_bias is not None:
            bias = bias + bn_bias.to(dtype)
        return weight * scale.reshape(-1, 1, 1, 1), bias

    def __getstate__(self):  # the cache is derived state: not pickled
        state = dict(self.__dict__)
        state["_cache"] = None
        return state


def _foldable(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var) -> bool:
    """Whether the batch norm normalises with running statistics (torch's own condition in eval
    mode), and they, its weight and bias and the conv's bias are what torch's convolution and
    batch_norm accept for the convolution's output: one value per output channel, of its dtype
    (or float32 beside a half-precision one, as torch's batch_norm takes). A tensor replaced after
    patching (a new Parameter or buffer, another ``.data``) can be otherwise: unfolded, torch's
    modules then raise as they would unpatched, where the fold would broadcast or cast it."""
    if running_mean is None or running_var is None:
        return False
    channels, dtype = (weight.shape[0],), weight.dtype
    if conv_bias is not None and (conv_bias.shape != channels or conv_bias.dtype is not dtype):
        return False
    mixed = dtype is torch.float16 or dtype is torch.bfloat16
    for t in (running_mean, running_var, bn_weight, bn_bias):
        if t is not None and (t.shape != channels or not (t.dtype is dtype or mixed and t.dtype is torch.float32)):
            return False
    return True


def fold_of(module: torch.nn.Module) -> BatchNormFold | None:
    return module.__dict__.get(FOLD_ATTR)


def _forget_fold(module: torch.nn.Module) -> None:
    fold = fold_of(module)
    if fold is not None:
        fold.forget()


class FoldedConv2d(fastml_nn.Conv2d):
    """A Conv2d whose output only a batch norm (then, optionally, a ReLU) reads: while the fold
    applies, one convolution with the folded weight and bias, then the ReLU in place; otherwise
    fastml's Conv2d."""

    def train(self, mode: bool = True):
        """torch's ``train``; the fold is formed anew at the next call (see the module docstring)."""
        _forget_fold(self)
        return super().train(mode)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # unfolded, as torch's (fastml/nn.py's docstring)
            return self._conv_forward(input, self.weight, self.bias)
        return self._eager_forward(input)

    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        """forward outside TorchScript, whose parser refuses the functions defined here even
        where it would not compile them."""
        if isinstance(input, _route.PROXY):  # (as FoldedBatchNorm2d's)
            return _route.traced(self, (input,), super().forward)
        fold = fold_of(self)
        if fold is None or not fold.active() or not _runs.called_as_run(fold, depth=1):
            return super().forward(input)  # (called on its own, it is a convolution: fastml/_runs.py)
        relu = fold.relu is not None
        # Each forward forms the folded parameters itself (cached without gradients): with
        # gradients, every timed call of the measured choice runs its own backward through them.

        def torch_forward(x):
            out = _layout.torch_convolution(self, x, *fold.parameters())
            return relu_in_place(out) if relu else out

        def fastml_forward(x):
            out = self._fastml_conv(x, *fold.parameters())
            return relu_in_place(out) if relu else out

        def variants(x, only=None):
            return fastml_nn.torch_conv_variants(self, x, fold.parameters, relu, only)

        out = _route.call(self, input, _route.weight_of(self), torch_forward, fastml_forward, variants=variants)
        return fold.done(out, 2 if relu else 1)


class FoldedBatchNorm2d(fastml_nn.BatchNorm2d):
    """A BatchNorm2d folded into the convolution before it: passes its input through while the
    fold applies; otherwise normalises as fastml's BatchNorm2d, and where the run has a ReLU,
    applies it too (fused into the training kernel's normalising pass), so the ReLU module passes
    its input through in both modes."""

    def train(self, mode: bool = True):
        """torch's ``train``; the fold is formed anew at the next call (see the module docstring)."""
        _forget_fold(self)
        return super().train(mode)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        if isinstance(input, _route.PROXY):  # traced: whether the fold applies is decided when the graph runs
            return _route.traced(self, (input,), super().forward)
        fold = fold_of(self)
        if fold is None:
            return super().forward(input)
        if _runs.whole_runs():  # (fastml/_runs.py)
            if fold.active():
                return input
        elif _runs.passes(self, input):  # the folded convolution's output
            return input
        if fold.relu is None or not _runs.called_as_run(fold, depth=0):
            return super().forward(input)
        if not self.uses_batch_statistics() or _route.parametrized(self):  # eval, unfolded (a bn_relu pair, or
            return fold.done(self._torch_relu(input), 2)  # the conv in training); torch's (see _route.parametrized)
        return fold.done(_route.call(self, input, _route.weight_of(self), self._torch_relu, self._fastml_relu), 2)

    def _torch_relu(self, input: torch.Tensor) -> torch.Tensor:
        """What it replaces: torch's batch norm, then torch's ReLU (in place: the batch norm's
        backward does not read its output)."""
        return relu_in_place(self._torch_forward(input))

    def _fastml_relu(self, input: torch.Tensor) -> torch.Tensor:
        return self._fastml_forward(input, relu=True)


class FoldedReLU(torch.nn.ReLU):
    """A ReLU that the folded run before it applies: the folded convolution while the fold
    applies, the batch norm (or, in a Conv2d → ReLU run, the convolution) otherwise. Passes its
    input through."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.relu(input, inplace=self.inplace)
        if isinstance(input, _route.PROXY):  # (as FoldedBatchNorm2d's)
            return _route.traced(self, (input,), super().forward)
        if _runs.whole_runs():  # (fastml/_runs.py)
            fold = fold_of(self)
            if fold is not None and fold.relu_exclusive and (
                    fold.active() or fold.bn is not None and not _route.runs_as_torch(fold.layer or fold.bn)):
                return input
        elif _runs.passes(self, input):  # a run's output, its ReLU applied (this module, or a shared one)
            return input
        return super().forward(input)


class FoldedLinear(fastml_nn.Linear):
    """A Linear whose output only a ReLU reads: the ReLU runs in place on the layer's fresh output
    (nothing else reads it, and the linear's backward does not need it), in training and eval,
    instead of a second pass that allocates.

    Where the layer runs torch's linear, only if that pays for the checks the run takes (whether
    the model calls it as a run, its mark on the output: ~15 µs a call on an Ice Lake Xeon): not
    where torch's product is a view that requires grad (an input of more than 2 dimensions),
    on which the ReLU runs out of place anyway (relu_in_place), nor where the output is under
    half the L2, where the ReLU in place spared 15 µs or less of a step's forward and backward
    (256 KiB; 70 µs at 1 MiB, 530 µs at 4 MiB). There the ReLU module applies itself, as
    torch's: a patched MLP of 64 -> 128 -> 64 on (8, L, 64) inputs trained at 0.91x torch's
    speed with the checks, on (24, 64) at 0.90x."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(input, self.weight, self.bias)
        return self._eager_forward(input)

    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        """forward outside TorchScript (as FoldedConv2d's: a lambda is refused too)."""
        if isinstance(input, _route.PROXY):
            return _route.traced(self, (input,), super().forward)
        fold = fold_of(self)
        if fold is None or not fold.active():
            return super().forward(input)
        weight = _route.weight_of(self)
        found = _route.settled(self, input, weight)
        if found[0] == _route.TORCH:
            out = F.linear(input, weight, _route.registered(self, "bias"))
            if (function_mode_active() or relu_out_of_place(out)
                    or out.numel() * out.element_size() < l2_bytes() // 2 or not _runs.called_as_run(fold, depth=1)):
                # The ReLU module applies itself (see the class docstring); also under a Python
                # TorchFunctionMode, which then sees the calls it sees unpatched, no size read.
                return out
            return fold.done(out.relu_(), 2)
        if not _runs.called_as_run(fold, depth=1):
            return super().forward(input)
        return fold.done(_route.call(self, input, weight, self._torch_relu, self._fastml_relu,
                                     variants=lambda x, only=None: self._torch_variants(x, only, relu=True),
                                     found=found), 2)

    def _torch_relu(self, input: torch.Tensor) -> torch.Tensor:
        return relu_in_place(F.linear(input, _route.weight_of(self), _route.registered(self, "bias")))

    def _fastml_relu(self, input: torch.Tensor) -> torch.Tensor:
        return relu_in_place(self._fastml_forward(input))


# A fold undone is its three torch modules (_route.run_as_torch).
_route.TORCH_TWINS.update({FoldedConv2d: torch.nn.Conv2d, FoldedLinear: torch.nn.Linear,
                           FoldedBatchNorm2d: torch.nn.BatchNorm2d, FoldedReLU: torch.nn.ReLU})


def fold(layer: torch.nn.Conv2d | torch.nn.Linear | None, bn: torch.nn.BatchNorm2d | None, relu: torch.nn.ReLU | None,
         names: tuple[str, ...], owner: torch.nn.Module, slots: tuple, relu_exclusive: bool = True) -> BatchNormFold:
    """Folds the run in place (classes changed, objects and Parameters kept). ``owner`` and
    ``slots``: see BatchNormFold. A ReLU not the run's alone (``relu_exclusive`` False) may be
    another run's already: that run keeps it (its class and the original class it restores)."""
    relu_run = None if relu is None else fold_of(relu)  # another run's ReLU already
    classes = tuple(None if m is None else type(m) for m in (layer, bn, relu))
    if relu_run is not None:
        classes = (*classes[:2], relu_run.classes[2])
    run = BatchNormFold(layer, bn, relu, classes, names, owner, slots, relu_exclusive)
    if layer is not None:
        layer.__class__ = FoldedLinear if isinstance(layer, torch.nn.Linear) else FoldedConv2d
    if bn is not None:
        bn.__class__ = FoldedBatchNorm2d
    if relu is not None and relu_run is None:
        relu.__class__ = FoldedReLU
    for module in (layer, bn, relu if relu_run is None else None):
        if module is not None:
            object.__setattr__(module, FOLD_ATTR, run)
    return run


def unfold(run: BatchNormFold) -> None:
    """Restores the classes ``fold`` changed (a shared ReLU: by the run that owns it)."""
    for module, cls in zip((run.layer, run.bn, run.relu), run.classes):
        if module is not None and fold_of(module) is run:
            module.__class__ = cls
            module.__dict__.pop(FOLD_ATTR, None)


def obstacles(conv, bn, relu) -> list[str]:
    """Why the run cannot fold (empty if it can)."""
    reasons = []
    if bn is None or conv is None:
        return reasons
    if bn.num_features != conv.out_channels:
        reasons.append(f"the batch norm's {bn.num_features} features are not the conv's {conv.out_channels} channels")
    if bn.running_mean is not None and bn.running_mean.dtype != conv.weight.dtype:
        reasons.append("the batch norm's dtype differs from the conv's")
    return reasons
