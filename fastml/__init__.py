"""fastml: compiled kernels (Triton, C++, numba) for the classic models of an introductory
deep-learning course, as drop-ins for the PyTorch modules people already use.

Importing fastml changes nothing global: swap layers yourself (``fastml.nn.Linear``, ...).
"""

from fastml import data, functional, linear_model, neighbors, nn, optim, training
from fastml._backend import BackendUnavailableError, use_backend
from fastml._info import info

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "data", "functional", "info", "linear_model", "neighbors", "nn", "optim",
           "training", "use_backend"]
