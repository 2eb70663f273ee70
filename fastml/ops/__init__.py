"""One package per op: the autograd.Function and per-backend dispatch in ``__init__``, the
pure-PyTorch oracle in ``reference``, and one module per kernel backend (``cpp_impl``,
``numba_impl``, ``triton_impl``) exposing the same functions with the same signatures."""
