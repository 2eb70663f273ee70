"""fastml's ops as torch.library custom ops in the ``fastml`` namespace (torch >= 2.4).

Each op package's ``library`` module registers its forward and backward as ``fastml::<name>``
custom ops with fake (meta) implementations and autograd, so that torch.compile (fullgraph
included) and torch.export trace a fastml layer as one opaque call to its kernels instead of
falling back to torch's ops. fastml routes a call there only while a graph is being traced
(fastml.ops.in_custom_op_graph); eager calls keep their autograd.Functions. Registering in
fastml's own namespace changes nothing else in torch. On an older torch nothing is registered
and traced calls run torch's own ops, as before.
"""

import importlib

from fastml.ops import LIBRARY

OPS = ("linear", "linear_mse", "mse_loss", "cdist", "knn", "max_pool2d", "batch_norm", "conv2d",
       "conv2d_relu_max_pool2d", "cross_entropy", "linear_cross_entropy", "sgd", "adam")


def _register() -> None:
    for op in OPS:
        importlib.import_module(f"fastml.ops.{op}.library")


if LIBRARY:
    _register()
