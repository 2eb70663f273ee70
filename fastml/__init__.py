"""fastml: compiled kernels (Triton, C++, numba) for the classic models of an introductory
deep-learning course, as drop-ins for the PyTorch modules people already use.

Importing fastml changes nothing global: swap layers yourself (``fastml.nn.Linear``, ...) or call
``fastml.patch(model)``.
"""

# _library registers every op as a fastml::* torch.library custom op (for torch.compile / export)
from fastml import _library, data, functional, linear_model, neighbors, nn, optim, training  # noqa: F401
from fastml._backend import BackendUnavailableError, use_backend
from fastml._cpp import cpu_level
from fastml._info import info
from fastml._patch import PatchReport, patch, unpatch
from fastml._memory import empty_cache, keep_freed_memory
from fastml._tune import clear_tuning, set_tuning, tuning
from fastml._tune_model import TuneTable, tune

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "PatchReport", "TuneTable", "clear_tuning", "cpu_level", "data", "empty_cache",
           "functional", "info", "keep_freed_memory", "linear_model", "neighbors", "nn", "optim", "patch", "set_tuning", "training", "tune",
           "tuning", "unpatch", "use_backend"]
