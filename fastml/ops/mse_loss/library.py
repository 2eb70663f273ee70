"""fastml::mse_loss and fastml::mse_loss_backward: the squared error as torch.library custom ops,
with fakes and autograd, for torch.compile / torch.export (see fastml/_library.py). Inputs of
any shape and strides; the kernels see them flattened, as MSELossFunction's do."""

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import graph_backend, placeholder
from fastml.ops.mse_loss import IMPLEMENTED, error_scale, impl


def _flat(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1)


@torch.library.custom_op("fastml::mse_loss", mutates_args=())
def mse_loss(input: Tensor, target: Tensor, reduction: str, keep_diff: bool) -> tuple[Tensor, Tensor]:
    """input, target of one shape → (loss: 0-dim, or input's shape for "none"; diff = input -
    target when keep_diff, else an empty (0,) tensor)."""
    _check(input, target, reduction)

    def run(name):
        return impl(name).forward(_flat(input), _flat(target), reduction, keep_diff)

    loss, diff = run(graph_backend("mse_loss", "forward", IMPLEMENTED, (input, target, reduction, keep_diff), run))
    return (loss.reshape(input.shape) if reduction == "none" else loss,
            diff.reshape(input.shape) if keep_diff else placeholder(input))


def _check(input: Tensor, target: Tensor, reduction: str) -> None:
    contract.floating("mse_loss", "input", input)
    contract.same("mse_loss", "input", input, target=target)
    contract.shape("mse_loss", "target", target, input.shape, "input's")
    contract.reduction("mse_loss", reduction)


@mse_loss.register_fake
def _(input, target, reduction, keep_diff):
    _check(input, target, reduction)
    return (input.new_empty(input.shape if reduction == "none" else ()),
            input.new_empty(input.shape) if keep_diff else placeholder(input))


@torch.library.custom_op("fastml::mse_loss_backward", mutates_args=())
def mse_loss_backward(diff: Tensor, grad: Tensor, reduction: str) -> Tensor:
    """d loss / d input for diff = input - target and the incoming grad (0-dim, or diff's shape
    for "none")."""
    _check_backward(diff, grad, reduction)
    grad = grad.contiguous() if grad.dim() == 0 else _flat(grad)

    def run(name):
        return impl(name).backward(_flat(diff), grad, error_scale(reduction, diff.numel()))

    return run(graph_backend("mse_loss", "backward", IMPLEMENTED, (diff, grad, reduction), run)).reshape(diff.shape)


def _check_backward(diff: Tensor, grad: Tensor, reduction: str) -> None:
    contract.floating("mse_loss_backward", "diff", diff)
    contract.same("mse_loss_backward", "diff", diff, grad=grad)
    if grad.dim() != 0:
        contract.shape("mse_loss_backward", "grad", grad, diff.shape, "() or diff's")
    contract.reduction("mse_loss_backward", reduction)


@mse_loss_backward.register_fake
def _(diff, grad, reduction):
    _check_backward(diff, grad, reduction)
    return diff.new_empty(diff.shape)


def _setup_context(ctx, inputs, output):
    _, _, ctx.reduction, ctx.kept_diff = inputs
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _):
    (diff,) = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[:2]
    if not ctx.kept_diff:
        raise RuntimeError("fastml::mse_loss: backward needs the forward call's keep_diff=True")
    grad_input = torch.ops.fastml.mse_loss_backward(diff, grad, ctx.reduction)
    return (grad_input if need_input else None), (-grad_input if need_target else None), None, None


mse_loss.register_autograd(_backward, setup_context=_setup_context)
