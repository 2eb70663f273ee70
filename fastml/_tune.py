"""The measured choice: which implementation runs each op, decided by timing it on this machine.

fastml's promise is that a drop-in is never slower than what it replaces. A kernel that wins on
the course's shapes on one CPU can lose on a ResNet's shapes, on another CPU family, or on a GPU,
so no fixed rule can keep that promise. Instead, for every op and *shape class* (the op, the
phase: forward or backward, the sizes, layout, dtype, device, thread count and the arguments
that change a kernel's cost), the candidates are timed the first time the class is seen, as
``torch.backends.cudnn.benchmark`` and Triton's autotuner do:

- the fastml kernel for the input's device: ``triton`` on CUDA; ``cpp`` on the CPU, or ``numba``
  where the C++ extension is absent (numba mirrors the C++ kernels loop for loop and compiling it
  costs seconds per kernel, so it is not timed beside them);
- torch's own implementation, the ``reference`` backend.

A fastml kernel is chosen only when its best time beats torch's by more than ``MARGIN``;
otherwise torch's path runs. Ties, noise and losses all go to torch.

How a class is timed (``measure``): one untimed warm-up call per candidate (compilation,
allocation, first touch), then ``ROUNDS`` interleaved rounds, each a loop of calls lasting about
``SAMPLE_SECONDS`` (one call for a slow op), keeping each candidate's fastest per-call time. The
loop's length comes from the warm-up call, then from the fastest timed call (a warm-up that
carried one-time costs would leave a fast candidate one call per sample).
Tuning a new class costs ``1 + ROUNDS`` calls per candidate for a large op, a few milliseconds of
repeated calls for a small one, and nothing per call afterwards: the decision is a dictionary
lookup. A call that takes longer than ``SLOW_CALL_SECONDS`` gets one timed round instead of
``ROUNDS``. CUDA work is synchronised around every sample. Where the times leave the verdict
within a margin's width of the line (``near_the_line``), the fastest kernel and torch's are timed
once more, each keeping its fastest time of both: a decision persists, and a single burst of
noise on a shared machine had routed linear_mse (65536 x 256 -> 1) to torch for good, its kernel
timed at 8.15 ms against torch's 8.41 where its steady call took 5.1 ms against 9.2.

Inputs too small to time: a class whose input has no elements is not timed; it follows the
static rule (below), which runs torch's implementation for every op but the few whose win is
structural. Every non-empty input is timed, however small: per-call overhead is exactly what
fastml's small-model wins are made of, and a loop of calls measures it reliably.

The static rule (``FASTML_TUNE=off``, ``set_tuning("off")``): deterministic, no timing, and
conservative. It runs torch's implementation everywhere except where fastml's kernel does
asymptotically less work or traffic than torch's sequence of ops whatever the machine:
``STATIC_KERNEL_OPS`` (a whole SGD epoch of linear regression in one call; the optimizer steps,
one pass over each tensor). k-nearest neighbours is not among them: its reference screens with
torch's matrix product (fastml/ops/knn/reference.py), which beats the cpp kernel where the CPU
lacks AVX-512.

The optimizer steps of a process in a torch.distributed group of several also follow the static
rule (``REPLICATED_OPS``): every rank must update its replica with the same arithmetic, and
timings taken apart can disagree.

Decisions persist in a JSON file under the user's cache directory (``FASTML_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastml``, else ``~/.cache/fastml``), one file per machine and versions: its
name and header carry a fingerprint of the CPU model and ISA flags, the GPU names, and the
fastml and torch versions, and every entry's key carries the thread count. The file is written
atomically (a temporary file, then a rename) under an advisory lock, merged with what another
process wrote meanwhile. A corrupt, unreadable, mismatched or read-only cache never fails a call:
fastml warns once, measures again, and keeps its decisions in memory.

Layers (fastml/_route.py) add one decision of their own. A kernel that wins inside fastml's
dispatch can still lose to torch's module once that dispatch is counted (argument checks, an
autograd.Function in Python: ~15 µs a call, which decides a layer of a few µs). So where one of a
layer's ops chose a kernel, the whole layer, forward and backward, is timed once more against
torch's module (a class "layer <type>" in the same store); where all chose torch's, the layer
calls torch's module directly from then on.

Inputs whose sizes vary from call to call (sequence lengths, a last short batch, images of
several sizes) would have every new size timed, some milliseconds each: a patched two-layer MLP
fed 100 sequence lengths spent 3.8 s of its 4.5 s timing them, against torch's 0.3 s for the
whole run. So a class's *family* (its key with the main input's sizes left out: the op, phase,
parameters' shapes and settings) has its first ``TIMED_PER_FAMILY`` sizes timed; a later size
within ``NEAR_FACTOR`` of a timed one in every dimension takes that one's choice untimed
(``Decision.rule`` "nearest timed size", kept in memory, not in the file). A class belongs to
up to two families (``_families``):

- across layers, where its key holds a parameter's shape besides the input's: the key with the
  input's sizes left out. Layers of one weight's shape (a transformer's repeated blocks) share
  their timings. A key without a parameter's shape (a pooling's, a batch norm's backward, a
  loss's) forms none: it would make one family of every such layer of a model, each of which a
  model of fixed shapes must have timed;
- within one layer (the ``scope`` a drop-in layer opens while it decides, which its ops'
  backward keep for autograd's backward): the key with every size left out, so a pooling's, a
  batch norm's backward, a loss's, or a convolution's backward (whose second shape, the input's,
  follows the input's size) have families too. A layer of a model of fixed shapes sees one size
  or two, never TIMED_PER_FAMILY.

So a model of fixed shapes meets the rule nowhere (each of fastml.zoo's twelve models, trained
and evaluated patched with fx=True, had every decision timed).

``use_backend(name)`` / ``FASTML_BACKEND`` still force one backend: then nothing is timed.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from fastml import _env

MARGIN = 0.05
"""A fastml kernel runs only where its time × (1 + MARGIN) is below torch's: the noise between
interleaved rounds of the same call on a quiet machine is a few percent, so a kernel that merely
ties is never chosen, and one chosen by noise cannot cost more than a few percent."""

LAYER_MARGIN = 2 * MARGIN
"""The margin a whole layer's (or fused functional's) fastml path must win by over torch's module
or sequence of calls (fastml/_route.py): a
layer timed alone finds its input hot in cache, which inside a model it is not, so a memory-bound
layer (a max-pool) looks a few percent faster alone than it runs in place (seen on DenseNet's stem
pool: 8% faster alone, no faster in the model). A whole model's timings (fastml.tune's "model" and
"layout" rows) are taken in the very context they decide for, so they use ``MARGIN``."""

ROUNDS = 3
TIMED_PER_FAMILY = 4
"""Sizes of one family timed before a nearby size takes a timed one's choice (module docstring):
the first few sizes of a layer fed varying inputs are timed exactly, as every size of a model
of fixed shapes is."""
NEAR_FACTOR = 2.0
"""How far (a factor, in every dimension of the main input) a size may lie from a timed size of
its family and take that one's choice: a kernel's lead over torch's changes slowly with size,
and the margin absorbs what it changes within a factor of 2."""
WRITE_INTERVAL = 1.0
"""Seconds at least between two writes of the cache file. A write rewrites the whole file, about
10 µs per decision it holds (20 ms at 2,000 on a 2-core Zen 4), so writing at every new decision
made a run that decides thousands of classes quadratic: this test suite's pooling checks, 300
sample shapes each, took 80 s in the suite against 14 s alone. Decisions measured in between go
with the next write, when the count is read (``stored_count``), at ``clear_tuning`` and at
exit; a process killed first measures them again next time."""
SAMPLE_SECONDS = 2e-3
MAX_CALLS_PER_SAMPLE = 2000
SLOW_CALL_SECONDS = 0.25
DROP_RATIO = 3.0
"""A candidate whose first timed round took more than DROP_RATIO x torch's is not timed again: no
noise makes up a factor of 3, and on a CPU where a kernel is far slower (fastml's convolution
tiles, written for AVX-512's 32 registers, on an AVX2-only CPU: 10x to 25x oneDNN on real
models' shapes) the rounds it would get cost most of a model's tuning. Not judged on the
untimed first call, which carries one-time costs (a variant's weight packing or transform)."""

TUNE_VAR = "FASTML_TUNE"
CACHE_VAR = "FASTML_CACHE_DIR"
MODES = ("on", "off")
FORMAT = 1

STATIC_KERNEL_OPS = {
    "cpp": frozenset({"sgd_epoch", "sgd_step", "sgd_course_step", "adam_step"}),
    "numba": frozenset({"sgd_epoch", "sgd_step", "sgd_course_step", "adam_step"}),
    "triton": frozenset(),  # measured on the H100: torch's cuBLAS / cuDNN paths win (issue 17)
}
"""Per backend, the ops the static rule runs on fastml's kernel (see the module docstring)."""

VARIANT_BASELINES = {"linear_mse way": "blocks"}
"""Choices among ways of one kernel rather than between a kernel and torch's op, by their op
name (a shape class's first item): what their "reference", the way that runs unless another wins
by the margin, is called in reports (``label``)."""


def label(op: str, choice: str) -> str:
    """How a report names ``choice`` for ``op``: "torch" for torch's implementation (the
    reference), a variant's name for the baseline of a choice among a kernel's own variants."""
    return VARIANT_BASELINES.get(op, "torch") if choice == "reference" else choice


REPLICATED_OPS = frozenset({"sgd_step", "sgd_course_step", "adam_step"})
"""Ops whose results must be the same bits in every process of a torch.distributed group: the
optimizer steps, which update each rank's replica of the parameters from the same all-reduced
gradients. Two backends round differently (AdamW's update differs in its last bit between the
C++ kernel and torch's), so ranks that timed their candidates apart and chose differently would
let the replicas drift, which torch's own optimizers never do. In a group of more than one
process these ops follow the static rule, which is deterministic and the same on every rank;
every other op's result is either all-reduced afterwards (gradients) or exact (neighbours)."""

clock: Callable[[], float] = time.perf_counter
"""The timer (tests replace it with a fake clock)."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which implementation runs one shape class, and the figures behind the choice.

    choice: the backend that runs ("reference" is torch's own implementation).
    seconds: each candidate's best time per call (empty when nothing was timed).
    rule: "measured", "static" (tuning off), "static (torch.distributed: ...)" (an optimizer step
    in a process group: REPLICATED_OPS), "empty input" (nothing to time) or "nearest timed size"
    (a timed size of the class's family near enough: TIMED_PER_FAMILY).
    """
    choice: str
    seconds: dict = dataclasses.field(default_factory=dict)
    rule: str = "measured"
    margin: float = MARGIN

    def to_json(self) -> dict:
        return {"choice": self.choice, "seconds": self.seconds, "rule": self.rule, "margin": self.margin}


# ------------------------------------------------------------------------------------ settings

_mode_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastml_tune", default=None)
_tune_env = _env.reader(TUNE_VAR)
_tune_env_stored = _env.raw_reader(TUNE_VAR)


def _check_mode(value, name: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, MODES))}, got {value!r}")
    return value.strip().lower()


@functools.lru_cache(maxsize=8)
def _env_mode(text: str) -> str:
    return _check_mode(text, TUNE_VAR) if text.strip() else "on"


def mode() -> str:
    """"on" (measured choice, the default) or "off" (the static rule): set_tuning, tuning or
    FASTML_TUNE, in that order."""
    value = _mode_override.get()
    return value if value is not None else _env_mode(_tune_env())


def set_tuning(value: str | None) -> str | None:
    """Turn the measured choice "on" or "off" (the static rule) from now on, in this thread and
    the code it calls; None follows ``FASTML_TUNE`` again (its default). Returns the previous
    setting (None where there was none), to restore it with. ``fastml.tuning(value)`` does the
    same for a ``with`` block."""
    previous = _mode_override.get()
    _mode_override.set(None if value is None else _check_mode(value, "tuning"))
    return previous


@contextlib.contextmanager
def tuning(value: str):
    """Measured choice "on" or "off" (the static rule) inside a ``with`` block."""
    token = _mode_override.set(_check_mode(value, "tuning"))
    try:
        yield value
    finally:
        _mode_override.reset(token)


# ------------------------------------------------------------------------- the machine's key

def _cpu_description() -> tuple[str, str]:
    """(CPU model, ISA flags) as the OS reports them."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                field, _, value = line.partition(":")
                field = field.strip().lower()
                if field in ("model name", "hardware", "cpu model") and model in ("", platform.processor()):
                    model = value.strip()
                elif field in ("flags", "features") and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return model, flags


@functools.cache
def fingerprint() -> dict:
    """What a decision depends on beyond its shape class: the machine and the versions."""
    import fastml

    cpu, flags = _cpu_description()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    module = _cpp_module()
    return {"cpu": cpu, "isa_flags": flags, "gpus": gpus, "fastml": fastml.__version__, "torch": torch.__version__,
            "cpp_module": module, "cpp_build": _module_digest(module)}


def _cpp_module() -> str | None:
    """The C++ module this process runs (a dispatch build's level can be forced lower with
    FASTML_CPU_LEVEL: its kernels are slower, so the decisions measured for another don't hold)."""
    from fastml import _cpp

    try:
        return _cpp.cpu_level()["module"]
    except ValueError:  # a bad FASTML_CPU_LEVEL: raised where the cpp backend is probed
        return None


def _module_digest(module: str | None) -> str | None:
    """A digest of the compiled module's file: decisions measured for one build of the kernels do
    not hold for another (a rebuild from changed sources, or with other flags, keeps the version
    string and the module's name; its decisions stayed in force, measured on the old kernels)."""
    if module is None:
        return None
    try:
        spec = importlib.util.find_spec(module if "." in module else f"fastml.{module}")
        with open(spec.origin, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        return None


def cache_dir() -> Path:
    """Where the decisions are kept: FASTML_CACHE_DIR, else the user's cache directory."""
    configured = os.environ.get(CACHE_VAR, "").strip()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "fastml"


def cache_path() -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"decisions-{digest}.json"


# ------------------------------------------------------------------------------ the store

@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def _key_text(key: tuple) -> str:
    return repr(key)


def _read(path: Path) -> dict[str, dict]:
    """The decisions in the file at ``path`` ({} when there is none). Raises ValueError / OSError
    for a file that cannot be used."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("decisions"), dict):
        raise ValueError("not a fastml decisions file of format 1")
    if data.get("machine") != fingerprint():
        raise ValueError("written for another machine or other versions of fastml / torch")
    return data["decisions"]


@contextlib.contextmanager
def _locked(path: Path):
    """An advisory lock beside ``path`` across processes, where the platform has one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Store:
    """The decisions of this process (memory) and of the cache file (loaded once per path)."""

    def __init__(self):
        self.decisions: dict[tuple, Decision] = {}
        self.measured: dict[str, dict] = {}  # what this process measured, by key text, to persist
        self.loaded: dict[Path, dict[str, dict]] = {}
        self.timed: dict[tuple, list[tuple[tuple, Decision]]] = {}  # family: [(sizes, timed decision)]
        self.lock = threading.RLock()
        self.unwritten: Path | None = None  # the file the decisions measured since the last write go to
        self.last_write = -math.inf  # time.monotonic() of the last write

    def note_timed(self, family: tuple, sizes: tuple, decision: Decision) -> None:
        """A timed decision (this process's, or the file's) of a class of ``family`` (``_families``)
        joins its family's timed sizes."""
        self.timed.setdefault(family, []).append((sizes, decision))

    def nearest(self, family: tuple, sizes: tuple, kernels: tuple[str, ...]) -> Decision | None:
        """The choice of a timed size of ``family`` within NEAR_FACTOR of ``sizes`` in every
        dimension (the nearest), once the family has TIMED_PER_FAMILY timed sizes; else None."""
        timed = self.timed.get(family, ())
        if len(timed) < TIMED_PER_FAMILY:
            return None
        reach = math.log(NEAR_FACTOR) + 1e-9
        best, best_distance = None, math.inf
        for other, decision in timed:
            steps = [abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(sizes, other)]
            if max(steps, default=0.0) <= reach and sum(steps) < best_distance:
                best, best_distance = decision, sum(steps)
        if best is None or best.choice not in (*kernels, "reference"):
            return None
        return Decision(best.choice, rule="nearest timed size", margin=best.margin)

    def from_disk(self, key: tuple, kernels: tuple[str, ...]) -> Decision | None:
        path = cache_path()
        if path not in self.loaded:
            try:
                self.loaded[path] = _read(path)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                _warn_once(f"fastml: the tuning cache {path} cannot be used ({exc}); its decisions are "
                           "measured again")
                self.loaded[path] = {}
        entry = self.loaded[path].get(_key_text(key))
        try:
            decision = Decision(entry["choice"], dict(entry["seconds"]), entry.get("rule", "measured"),
                                entry.get("margin", MARGIN))
        except (TypeError, KeyError, ValueError):
            return None
        if decision.choice not in (*kernels, "reference"):
            return None
        if decision.rule == "measured" and set(decision.seconds) != {*kernels, "reference"}:
            return None  # timed among other candidates (a fastml that offered fewer): time it again
        return decision

    def persist(self, key: tuple, decision: Decision) -> None:
        """Keeps a measured decision for the cache file: written now, or with the next write
        (``WRITE_INTERVAL``)."""
        path = cache_path()
        if self.unwritten is not None and self.unwritten != path:
            self.write()  # (the folder changed: what was measured for the other one goes there)
        self.measured[_key_text(key)] = decision.to_json()
        self.unwritten = path
        if time.monotonic() - self.last_write >= WRITE_INTERVAL:
            self.write()

    def write(self) -> None:
        """Writes what this process measured into its cache file, merged with what the file holds
        (another process's), if anything is unwritten."""
        path, self.unwritten = self.unwritten, None
        if path is None:
            return
        self.last_write = time.monotonic()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                try:
                    on_disk = _read(path)
                except (OSError, ValueError, UnicodeDecodeError):
                    on_disk = {}  # corrupt or foreign: replaced (load() has warned)
                on_disk.update(self.measured)
                self.loaded[path] = on_disk
                body = json.dumps({"format": FORMAT, "machine": fingerprint(), "decisions": on_disk}, indent=1)
                handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
                try:
                    with os.fdopen(handle, "w") as f:
                        f.write(body)
                    os.replace(temporary, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise
        except OSError as exc:
            _warn_once(f"fastml: cannot write the tuning cache {path} ({exc}); decisions are kept for this "
                       "process only")

    def clear(self, persisted: bool) -> None:
        global _generation
        with self.lock:
            _generation += 1  # layers forget the routes they learned from these decisions
            if not persisted:
                self.write()  # (what this process measured stays, as a process that exits leaves it)
            self.decisions.clear()
            self.measured.clear()
            self.loaded.clear()
            self.timed.clear()
            self.unwritten, self.last_write = None, -math.inf
            if persisted:
                with contextlib.suppress(OSError):
                    cache_path().unlink()


def _write_at_exit() -> None:
    with _store.lock:
        _store.write()


_store = _Store()
atexit.register(_write_at_exit)
_generation = 0


def generation() -> int:
    """A count that changes whenever decisions are forgotten (fastml/_route.py keys on it)."""
    return _generation


def state() -> tuple:
    """The tuning mode as set (set_tuning's, FASTML_TUNE's text) and the decisions' generation:
    equal whenever ``mode()`` and ``generation()`` are, without validating the mode (a decision
    made under it calls ``mode``, which does), for the check every drop-in layer's call makes
    (fastml/_route.py)."""
    return _mode_override.get(), _tune_env_stored(), _generation


def settings() -> tuple | None:
    """What this module's choices depend on besides their shape classes, as a value that changes
    whenever they may: the tuning mode (set_tuning's and FASTML_TUNE's), the decisions' generation
    and whether the process is in a torch.distributed group (REPLICATED_OPS). None while
    ``recording``, whose every choice must be seen. A caller that remembers a choice with this
    value beside it may reuse it while the value is equal (fastml/_backend.py's ``settings``)."""
    if _recorder.get() is not None:
        return None
    return state(), _in_process_group()


def clear_tuning(persisted: bool = False) -> None:
    """Forget this process's decisions (and with ``persisted=True`` the cache file's), so every
    shape class is measured again on its next call."""
    if not isinstance(persisted, bool):
        raise TypeError(f"clear_tuning: persisted must be a bool, got {type(persisted).__name__}")
    _store.clear(persisted)


def stored_count() -> int:
    """How many decisions the cache file holds (0 when it is absent or cannot be read), this
    process's unwritten ones written first."""
    with _store.lock:
        _store.write()
    try:
        return len(_read(cache_path()))
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def decisions() -> dict[tuple, Decision]:
    """This process's decisions so far, by shape class."""
    return dict(_store.decisions)


# -------------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(run: Callable[[str], object], name: str, calls: int, device: torch.device) -> float:
    _synchronize(device)
    start = clock()
    for _ in range(calls):
        run(name)
    _synchronize(device)
    return clock() - start


def _calls_per_sample(seconds_per_call: float) -> int:
    """Calls in a sample of about SAMPLE_SECONDS (at least one, at most MAX_CALLS_PER_SAMPLE)."""
    return max(1, min(MAX_CALLS_PER_SAMPLE, int(SAMPLE_SECONDS / max(seconds_per_call, 1e-9))))


def measure(names: tuple[str, ...], run: Callable[[str], object], device: torch.device,
            rounds: int | None = None) -> dict[str, float]:
    """Each candidate's best time per call (see the module docstring), under no_grad, as the
    kernels run inside an autograd.Function. ``rounds``: that many rounds however slow a call."""
    with torch.no_grad():
        warm = {name: _seconds(run, name, 1, device) for name in names}
        calls = {name: _calls_per_sample(t) for name, t in warm.items()}
        if rounds is None:  # (a candidate far slower than torch's does not make the others' rounds few)
            near = [t for name, t in warm.items() if "reference" not in warm or t <= DROP_RATIO * warm["reference"]]
            rounds = 1 if max(near) > SLOW_CALL_SECONDS else ROUNDS
        best = dict.fromkeys(names, math.inf)
        timed = list(names)
        for _ in range(rounds):
            for name in timed:  # interleaved: a slow drift of the machine touches every candidate alike
                best[name] = min(best[name], _seconds(run, name, calls[name], device) / calls[name])
                # A warm-up call that carried one-time costs (a lazy import, a weight's packing, the
                # decisions of the ops inside a layer: up to 50x a steady call) set too few calls
                # per sample, where the timer and cold caches weigh most: a Linear layer whose
                # steady call took 90 us, torch's 138, was timed at 135 against 138 so and routed
                # to torch. The next rounds' samples take their length from the timed calls.
                calls[name] = max(calls[name], _calls_per_sample(best[name]))
            if "reference" in best:  # judged on a timed round: a first call carries one-time costs
                timed = [name for name in timed if best[name] <= DROP_RATIO * best["reference"]]
    return best


def verdict(seconds: dict[str, float], kernels: tuple[str, ...], margin: float = MARGIN) -> str:
    """The fastest kernel where it beats torch's time (``seconds["reference"]``) by more than
    ``margin``; otherwise "reference"."""
    fastest = min(kernels, key=lambda name: seconds[name])
    return fastest if seconds[fastest] * (1.0 + margin) < seconds["reference"] else "reference"


def near_the_line(seconds: dict[str, float], kernels: tuple[str, ...], margin: float = MARGIN) -> bool:
    """Whether ``verdict`` hangs on noise: torch's time within a factor (1 + ``margin``) of the
    line where the fastest kernel wins (its time × (1 + ``margin``)), on either side. Slow calls
    too, whose single round is the least evidence: the VGG-sized conv block's forward + backward
    (about 0.9 s) read 0.99 s for fastml's path against 0.98 s for torch's on an Ice Lake Xeon,
    where the same path ran at 0.83 s a call, steadily."""
    fastest = min(seconds[name] for name in kernels)
    if fastest <= 0:
        return False
    ratio = seconds["reference"] / fastest
    return 1.0 / (1.0 + margin) <= ratio <= (1.0 + margin) ** 2


def static_choice(op: str, kernels: tuple[str, ...]) -> str:
    """The static rule: the kernel for the ops of STATIC_KERNEL_OPS, torch's implementation
    (the reference) for every other."""
    for name in kernels:
        if op in STATIC_KERNEL_OPS.get(name, ()):
            return name
    return "reference"


# ------------------------------------------------------------------------------- choosing

_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastml_tune_recorder", default=None)
_scope: contextvars.ContextVar[object] = contextvars.ContextVar("fastml_tune_scope", default=None)


@contextlib.contextmanager
def scope(token):
    """Decisions made inside the block are of one layer, ``token`` (hashable, unique to the layer,
    a weak reference to it): their classes also join that layer's families (``_families``)."""
    saved = _scope.set(token)
    try:
        yield
    finally:
        _scope.reset(saved)


def current_scope():
    """The layer deciding now (``scope``), or None: a Function keeps it for its backward."""
    return _scope.get()


@contextlib.contextmanager
def recording():
    """Collects (shape class, Decision) for every choice made inside the block (fastml.tune). A
    block inside another hands its choices on to the outer one too (fastml.tune's model rows
    reach the bench that called tune)."""
    outer = _recorder.get()
    seen: list = []
    token = _recorder.set(seen)
    try:
        yield seen
    finally:
        _recorder.reset(token)
        if outer is not None:
            outer.extend(seen)


def _static_rule(op: str) -> str | None:
    """Why ``op`` follows the static rule instead of being timed, or None where it is timed."""
    if mode() == "off":
        return "static"
    if op in REPLICATED_OPS and _in_process_group():
        return "static (torch.distributed: every rank's replica must update alike)"
    return None


if torch.distributed.is_available():
    def _in_process_group() -> bool:
        """Whether this process is one of several in an initialised torch.distributed group."""
        return _distributed_initialized() and torch.distributed.get_world_size() > 1

    _distributed_initialized = torch.distributed.is_initialized  # looked up once: called every step
else:  # pragma: no cover - a torch built without torch.distributed
    def _in_process_group() -> bool:
        return False


def decided(key: tuple, kernels: tuple[str, ...]) -> str | None:
    """The choice for ``key`` if it is made, or needs no timing (the static rule, or a nearby
    timed size of its families, ``_nearest``, which it will take when it comes), else None. A
    layer fed a new size then settles its route at the first call, the backward's choice known
    before autograd runs it."""
    if _static_rule(key[0]) is not None:
        return static_choice(key[0], kernels)
    decision = _store.decisions.get(key)
    if decision is None:
        decision = _nearest(key, kernels, _scope.get())
    return None if decision is None else decision.choice


def note(key: tuple | None, choice: str, rule: str) -> str:
    """Records a choice made without the measured rule (a forced backend, an input no kernel
    covers) for fastml.tune's table; returns ``choice``."""
    seen = _recorder.get()
    if seen is not None and key is not None:
        seen.append((key, Decision(choice, rule=rule)))
    return choice


def choose(key: tuple, kernels: tuple[str, ...], tensor: torch.Tensor, run: Callable[[str], object] | None,
           rounds: int | None = None, within=None) -> str:
    """The backend for shape class ``key`` (its first item the op's name) among ``kernels`` (the
    fastml backends covering ``tensor``) and the reference. ``run(name)`` calls the op on that
    backend with this call's inputs, without side effects on them; None when it cannot be timed.
    ``rounds``: see ``measure``. ``within``: the layer (``scope``) the call belongs to, where it is
    not the current one (a backward, run by autograd after the layer's call)."""
    static = _static_rule(key[0])
    if static is not None:
        decision = Decision(static_choice(key[0], kernels), rule=static)
    else:
        decision = _store.decisions.get(key)
        if decision is None:
            decision = _decide(key, kernels, tensor, run, rounds, _scope.get() if within is None else within)
    seen = _recorder.get()
    if seen is not None:
        seen.append((key, decision))
    return decision.choice


def _decide(key, kernels, tensor, run, rounds=None, within=None) -> Decision:
    with _store.lock:  # one measurement at a time: two would time each other
        decision = _store.decisions.get(key)
        if decision is not None:
            return decision
        decision = _store.from_disk(key, kernels)
        families = _families(key, within)
        if decision is None:
            if run is None or tensor.numel() == 0:
                decision = Decision(static_choice(key[0], kernels), rule="empty input" if run else "static")
            else:
                decision = _nearest(key, kernels, within, families)
            if decision is None:
                seconds = measure((*kernels, "reference"), run, tensor.device, rounds)
                # A layer timed alone needs the wider margin; a whole model is timed in its own context.
                margin = LAYER_MARGIN if key[0].startswith(("layer ", "function ")) else MARGIN
                if rounds is None and near_the_line(seconds, kernels, margin):
                    fastest = min(kernels, key=lambda name: seconds[name])  # the two the verdict hangs on
                    again = measure((fastest, "reference"), run, tensor.device)
                    seconds = {name: min(t, again.get(name, t)) for name, t in seconds.items()}
                decision = Decision(verdict(seconds, kernels, margin), seconds, margin=margin)
                _store.persist(key, decision)
        if decision.rule == "measured":
            for family, sizes in families:
                _store.note_timed(family, sizes, decision)
        _store.decisions[key] = decision
        return decision


def _nearest(key: tuple, kernels: tuple[str, ...], within, families: list | None = None) -> Decision | None:
    """The choice of a timed size near ``key``'s in one of its families (``_Store.nearest``)."""
    for family, sizes in _families(key, within) if families is None else families:
        decision = _store.nearest(family, sizes, kernels)
        if decision is not None:
            return decision
    return None


def _families(key: tuple, within=None) -> list[tuple[tuple, tuple]]:
    """[(family, sizes)] of a shape class (module docstring): the family across layers where the
    key holds a parameter's shape besides the main input's (shape_class, backward_class, a
    layer's or a fused functional's key put the input's first): the key with that first
    torch.Size left as its length, and that Size; then, where the class is decided within a
    layer (``within``, a ``scope``'s token), that layer's family: the key with every Size left
    as its length, and all their sizes in one tuple. Empty for a whole model's key, or a key
    without a parameter's shape decided outside a layer."""
    def strip(item, every: bool, found: list):
        """``item`` with its first Size (every Size) left as its length, each Size into ``found``."""
        if isinstance(item, torch.Size):
            found.append(tuple(item))
            return ("sizes of rank", len(item)) if every or len(found) == 1 else item
        if isinstance(item, tuple):
            return tuple([strip(i, every, found) for i in item])
        return item

    families = []
    sizes: list = []
    across = strip(key, False, sizes)
    if len(sizes) > 1:
        families.append((across, sizes[0]))
    if within is not None:
        sizes = []
        mine = strip(key, True, sizes)
        families.append(((within, mine), tuple(n for size in sizes for n in size)))
    return families
