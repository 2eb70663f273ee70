"""``fastml.tune(model, *example_inputs)``: make the measured choice for every covered layer of a
model ahead of time, forward and backward, and report it as a table.

The first call of each shape class times fastml's kernel against torch's implementation
(fastml/_tune.py); ``tune`` makes those first calls on purpose, with the example inputs, so that
training and inference afterwards start with every decision made. It leaves the model as it
found it: gradients are taken with ``torch.autograd.grad`` (nothing accumulates in ``.grad``),
and the buffers (BatchNorm's running statistics) and the random number generators are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import re

import torch

from fastml import _layout, _memory, _route, _runs, _tune
from fastml.ops import forced_backend
from fastml import nn as fastml_nn

_COVERED = tuple(getattr(fastml_nn, name) for name in fastml_nn.__all__)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One decision for one layer: which implementation runs its ``op`` in ``phase`` ("forward"
    or "backward"; "step" for an optimizer), and each candidate's time per call in seconds
    ("reference" is torch's own implementation)."""
    layer: str
    type: str
    op: str
    phase: str
    choice: str
    seconds: dict
    rule: str

    @property
    def runs(self) -> str:
        """The implementation in words: "torch" for the reference, "torch (<variant>)" for a
        variant of torch's (a layer row's "channels_last"), else the fastml backend."""
        if self.op == "layout":
            return "channels-last activations" if self.choice == "channels_last" else "the input's layout"
        if self.op == "unpatched":
            return "torch's modules, as unpatched" if self.choice == "reference" else "the patched model"
        if self.choice == "reference":
            return _tune.label(self.op, self.choice)
        if self.op.startswith("layer ") and self.choice != "fastml":
            return f"torch ({self.choice.replace('_', '-')})"
        return f"fastml {self.choice}"

    @property
    def whole_call(self) -> bool:
        """A choice for a whole layer ("layer ...") or a whole fused functional ("function
        ...", its torch twin a sequence of torch calls), timed forward and backward together."""
        return self.op.startswith(("layer ", "function "))


@dataclasses.dataclass
class TuneTable:
    """What ``fastml.tune`` decided, one row per (layer, op, phase)."""
    rows: list[LayerChoice] = dataclasses.field(default_factory=list)

    def by_layer(self) -> dict[str, dict[str, str]]:
        """{layer: {phase: implementation ("torch" or "fastml <backend>")}}. Where the whole layer
        measured faster as torch's module (its "layer" row), or a fused functional it calls as
        torch's sequence (its "function" row), every phase runs torch; where the
        whole model did (the "model" row), every layer does."""
        table: dict[str, dict[str, str]] = {}
        model_on_torch = any(row.op in ("model", "unpatched") and row.choice == "reference" for row in self.rows)
        whole_layer = {row.layer: row.runs for row in self.rows if row.whole_call and row.choice != "fastml"}
        for row in self.rows:
            # (a choice between a kernel's own variants says nothing of who runs the layer)
            if not row.whole_call and row.op not in ("model", "layout", "unpatched", *_tune.VARIANT_BASELINES):
                runs = "torch" if model_on_torch else whole_layer.get(row.layer, row.runs)
                table.setdefault(row.layer, {})[row.phase] = runs
        return table

    def __str__(self) -> str:
        if not self.rows:
            return "fastml.tune: no layer fastml covers ran"
        candidates = sorted({name for row in self.rows for name in row.seconds}, key=lambda n: (n == "reference", n))
        head = ["layer", "type", "op", "phase", "runs", *[f"{'torch' if n == 'reference' else n} µs" for n in candidates]]
        lines = [head]
        for row in self.rows:
            times = [f"{row.seconds[n] * 1e6:.1f}" if n in row.seconds else "-" for n in candidates]
            lines.append([row.layer or "(model)", row.type, row.op, row.phase,
                          row.runs + ("" if row.rule == "measured" else f" ({row.rule})"), *times])
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _check_inputs(model, example_inputs) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"tune() argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise TypeError("tune() needs example inputs: tune(model, *example_inputs), as model(*example_inputs) "
                        "is called")


@contextlib.contextmanager
def _untouched(model: torch.nn.Module):
    """Restores the model's buffers and the random number generators on leaving."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _detached(value):
    """A copy of a layer's input that autograd treats as a leaf (requiring grad as the original)."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _forward_and_backward(call, inputs, parameters, backward: bool) -> None:
    """call(*inputs), then the gradients of its floating outputs with respect to ``inputs`` and
    ``parameters`` that require grad, for a random upstream gradient (into no ``.grad``)."""
    out = call(*inputs)
    if not backward:
        return
    outputs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    wrt = [t for t in (*_tensors(inputs), *parameters) if t.requires_grad]
    if outputs and wrt:
        torch.autograd.grad(outputs, wrt, [torch.randn_like(t) for t in outputs], allow_unused=True)


def tune(model: torch.nn.Module, *example_inputs, backward: bool | None = None) -> TuneTable:
    """Decides, ahead of time, which implementation runs every layer of ``model`` that fastml
    covers (fastml.nn modules, and the layers fastml.patch swapped in), for the shape classes
    ``model(*example_inputs)`` gives, and returns the per-layer :class:`TuneTable`: the
    implementation chosen and each candidate's time.

    backward: also decide the backward pass (default: when gradients are enabled and the
    output requires grad, as in training). Decisions persist in the cache (fastml.info()).
    With a backend forced (use_backend, FASTML_BACKEND) or tuning off, nothing is timed and the
    table shows the forced backend or the static rule.
    """
    _check_inputs(model, example_inputs)
    want_backward = torch.is_grad_enabled() if backward is None else bool(backward) and torch.is_grad_enabled()
    parameters = [p for p in model.parameters() if p.requires_grad]
    layout = _layout.of(model)
    _route.run_as_torch(model, False)  # a verdict of an earlier tune is made again too
    table = TuneTable()
    with _untouched(model):
        if layout is None:
            rows, captured = _tune_layers(model, example_inputs, parameters, want_backward)
        else:
            # Every layer decided for both layouts, then the whole model timed both ways.
            layout.enabled = False
            own = _tune_layers(model, example_inputs, parameters, want_backward)
            layout.enabled = True
            converted = _tune_layers(model, example_inputs, parameters, want_backward)
            layout_row = _layout_choice(model, layout, example_inputs, parameters, want_backward)
            layout.enabled = layout_row.choice == "channels_last"
            rows, captured = converted if layout.enabled else own
            table.rows.append(layout_row)
        table.rows.extend(rows)
        row = _model_choice(model, example_inputs, parameters, want_backward, captured)
        if row is not None:
            table.rows.append(row)
        if (captured or layout is not None) and _tune.mode() == "on" and not forced_backend():
            if (want_backward and (row is None or row.choice == "reference")
                    and not (layout is not None and layout.enabled)):
                table.rows.append(_unpatched_by_rule(model))
            else:
                table.rows.append(_unpatched_choice(model, layout, example_inputs, parameters, want_backward))
    return table


def _tune_layers(model, example_inputs, parameters, backward: bool) -> tuple[list[LayerChoice], list]:
    """Runs the model once, so that every decision it needs is made, then each covered layer
    alone on the inputs it got, to attribute the decisions: (the table's rows, the layers with
    their inputs as [(name, module, args)])."""
    captured: list[tuple[str, torch.nn.Module, tuple]] = []
    seen: set[int] = set()

    def capture(name):
        def hook(module, args):
            if id(module) not in seen:
                seen.add(id(module))
                captured.append((name, module, _detached(args)))
        return hook

    handles = [m.register_forward_pre_hook(capture(name)) for name, m in model.named_modules()
               if isinstance(m, _COVERED)]
    try:
        # The whole model once: every decision it needs is made here (layers called from
        # forward, functional calls), and each layer's inputs are caught on the way.
        with _runs.hooks_watch_only():  # (the capture hooks: the runs still compute as one)
            _forward_and_backward(model, _detached(example_inputs), parameters, backward)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    # Then layer by layer, to attribute the decisions (made above, so looked up now).
    for name, module, args in captured:
        # Without its routes, so that the call reaches the ops, which record; those of other
        # signatures (the other layout) are kept.
        others = _route.take_routes(module)
        # Nor the fused functionals' routes the model's run settled: a call settled on torch's
        # sequence would not reach its ops, and the layer would get no rows.
        # A run's modules compute as the model runs them, not as modules called on their own
        # (fastml/_runs.py): the first the whole run, the later ones pass their input through.
        with _route.function_routes_set_aside(), _tune.recording() as decisions, _runs.as_runs():
            _forward_and_backward(module, args, [p for p in module.parameters() if p.requires_grad], backward)
        for sig, route in others.items():
            _route.routes(module).get(sig) or _route.remember(module, sig, route)
        by_op = {}
        for key, decision in decisions:
            by_op[(key[0], key[1])] = LayerChoice(name, type(module).__name__, key[0], key[1], decision.choice,
                                                  dict(decision.seconds), decision.rule)
        rows.extend(by_op.values())
    return rows, captured


def _forget_derived_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        _route.forget_derived_weights(module)


def _time_whole_model(model, kind: str, candidates: tuple[str, ...], example_inputs, parameters, backward: bool,
                      arrange, *key_extra):
    """The Decision among ``candidates`` and "reference" for ``model`` as a whole: each timed as
    one call (forward, and backward when training) after ``arrange(name)`` sets the model up as
    that candidate, every call interleaved ``_tune.ROUNDS`` times however long (one sample each is
    too few for a verdict), by ``_tune.MARGIN`` (the model is timed in its own context). The
    shape class: "<kind> <model type>", the phase, threads, the first input's dtype and device,
    the inputs' shapes and strides (their layouts), whether freed memory is kept
    (``fastml.keep_freed_memory``: a training step's page faults, which it removes, change which
    layout wins: ResNet-18 on a 2-core Zen 5 trained 1.09x to 1.18x faster channels-last than on
    (N, C, H, W) with it, 1.02x to 1.04x without, in three runs each), the model's architecture
    (``_architecture``), then ``key_extra``."""
    inputs = _detached(example_inputs)
    grad_on = torch.is_grad_enabled()
    fresh_weights = _route.retimes_derived_weights(parameters)

    def run(name):
        if fresh_weights:  # each call a training step's: the weights derived anew
            _forget_derived_weights(model)
        arrange(name)
        with torch.set_grad_enabled(grad_on):
            _forward_and_backward(model, inputs, parameters, backward)

    first = _tensors(example_inputs)[0]
    key = (f"{kind} {type(model).__name__}", _phase(backward), torch.get_num_threads(), first.dtype, first.device,
           tuple((tuple(t.shape), _strides(t)) for t in _tensors(example_inputs)),
           "freed memory kept" if _memory.keeping_freed_memory() else "freed memory returned", _architecture(model),
           *key_extra)
    with _untouched(model), _tune.recording() as decisions:
        _tune.choose(key, candidates, first, run, rounds=_tune.ROUNDS)
    return decisions[-1][1]


def _architecture(model: torch.nn.Module) -> str:
    """A digest of the model's module tree and tensors: every module's name, class (with its
    module's name: timm has many a ``Block``), mode and settings (``_settings``: a convolution's
    stride, which no parameter's shape tells), every parameter's and buffer's name, shape, strides
    (a channels-last weight takes oneDNN's other paths), dtype and whether it requires grad.
    Models of one class fed inputs of one shape are not one model: torchvision's ResNet-18 and
    ResNet-50 are both ``ResNet``, and with the class's name alone ResNet-50 took ResNet-18's layout
    verdict (the input's layout) in the zoo benchmark and trained at 0.94x and 1.06x unpatched,
    where channels-last, its own verdict, trains it at 1.11x. A fresh instance of the same model (in
    another process) finds its decisions again. What the digest cannot see (attributes a custom
    forward reads, autocast) makes no other key; torch's modules' settings are in it."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        cls = type(module)
        digest.update(f"{name}:{cls.__module__}.{cls.__qualname__}:{module.training}:{_settings(module)};".encode())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if torch.nn.parameter.is_lazy(tensor):  # (a lazy layer the forward never reached has no shape)
            described = "uninitialized"
        else:
            described = f"{tuple(tensor.shape)}:{_strides(tensor)}:{tensor.dtype}:{tensor.requires_grad}"
        digest.update(f"{name}:{described};".encode())
    return digest.hexdigest()[:16]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_SETTINGS = 1000


def _settings(module: torch.nn.Module) -> str:
    """The module's ``extra_repr``, without object addresses (which differ between processes, so
    the decisions file would never match) and at most ``_MAX_SETTINGS`` characters (a repr that
    prints a tensor's values). A user's repr that raises leaves the rest of the digest to tell
    models apart."""
    try:
        text = module.extra_repr()
    except Exception:  # noqa: BLE001 (any user code: a digest must not fail tune)
        return "?"
    return _ADDRESS.sub("", text)[:_MAX_SETTINGS]


def _strides(tensor: torch.Tensor):
    return tensor.stride() if tensor.layout is torch.strided else str(tensor.layout)


def _phase(backward: bool) -> str:
    return "forward+backward" if backward else "forward"


def _model_row(model, op: str, backward: bool, decision) -> LayerChoice:
    return LayerChoice("", type(model).__name__, op, _phase(backward), decision.choice, dict(decision.seconds),
                       decision.rule)


def _layout_choice(model, layout, example_inputs, parameters, backward: bool) -> LayerChoice:
    """The whole model with channels-last activations (``patch(channels_last=True)``) against the
    model on its input's own layout ("reference"), each with its layers' routes as decided for
    it (``_time_whole_model``)."""
    def arrange(name):
        layout.enabled = name == "channels_last"

    decision = _time_whole_model(model, "model layout", ("channels_last",), example_inputs, parameters, backward,
                                 arrange)
    return _model_row(model, "layout", backward, decision)


def _model_choice(model, example_inputs, parameters, backward: bool, captured) -> LayerChoice | None:
    """The whole model with its layers' routes as decided ("fastml") against the same model with
    every fastml layer on torch's module ("reference") (``_time_whole_model``). A layer can
    measure faster alone than in the model (its input hot in cache, its neighbours' memory
    traffic absent): this is the check that the model, as the user runs it, is not slower for
    them. Where torch's wins, every layer that chose fastml keeps torch's module for this
    signature (``_route.veto``). None where no layer runs fastml's path (nothing to check)."""
    on_fastml = [(name, module, sig, route) for name, module, _ in captured
                 for sig, route in _route.routes(module).items() if route != "reference"]
    if not on_fastml:
        return None

    def arrange(name):
        for _, module, sig, route in on_fastml:
            _route.remember(module, sig, "reference" if name == "reference" else route)

    # (each layer's route in the key: a layer re-decided onto another variant makes another model)
    routed = tuple(f"{name}:{type(module).__name__}:{route}" for name, module, _, route in on_fastml)
    decision = _time_whole_model(model, "model", ("fastml",), example_inputs, parameters, backward, arrange, routed)
    for _, module, sig, route in on_fastml:
        if decision.choice == "reference":
            _route.veto(module, sig)
        _route.remember(module, sig, "reference" if decision.choice == "reference" else route)
    return _model_row(model, "model", backward, decision)


def _unpatched_by_rule(model) -> LayerChoice:
    """The model run as if unpatched, without timing it, where training leaves nothing of
    fastml's in it: every layer on torch's module (none chose a fastml route, or the whole-model
    check vetoed them) and the input's own layout, with no folds (undone in training). The patched
    model then computes what the unpatched one does, plus every layer's dispatch, so it can only
    measure faster by the machine's noise: the Zen 3 zoo's ResNet-18 kept it on such a verdict and
    trained at 0.93x unpatched. (The layout is off already: the caller's condition.)"""
    _route.run_as_torch(model, True)
    return LayerChoice("", type(model).__name__, "unpatched", _phase(True), "reference", {},
                       "nothing of fastml's left")


def _unpatched_choice(model, layout, example_inputs, parameters, backward: bool) -> LayerChoice:
    """The model as tune leaves it ("fastml": its routes, folds and layout) against the same
    model run as if unpatched ("reference": every module as torch's own, folds undone, the
    input's layout) (``_time_whole_model``). Patching costs every layer a dispatch (finding its
    route: a few microseconds in Python) that no layer's or route's timing sees, as both sides of
    those pay it: on a model of many small layers it can exceed all the routes gain
    (EfficientNet-B0 at batch 1 on a 2-core Zen 3: 0.92x unpatched). Where the patched model is
    not faster, every module runs as torch's own (``_route.run_as_torch``) until the next tune,
    patch or unpatch. Not with the static rule (tuning off, or a forced backend): that rule
    decides nothing by time."""
    layout_on = layout is not None and layout.enabled

    def as_unpatched(on: bool) -> None:
        _route.run_as_torch(model, on)
        if layout is not None:
            layout.enabled = layout_on and not on

    # (each layer's routes in the key, as the model check's: other routes make another model)
    patched = tuple(f"{name}:{type(m).__name__}:{','.join(sorted(set(_route.routes(m).values())))}"
                    for name, m in model.named_modules() if isinstance(m, _COVERED))
    decision = _time_whole_model(model, "model unpatched", ("fastml",), example_inputs, parameters, backward,
                                 lambda name: as_unpatched(name == "reference"), layout_on, patched)
    as_unpatched(decision.choice == "reference" and decision.rule == "measured")
    return _model_row(model, "unpatched", backward, decision)
