"""Direct calls of the ``fastml::`` custom ops with bad arguments (fastml/ops/_contract.py).

fastml's public functions validate before they reach an op, but ``torch.ops.fastml.<op>`` can be
called directly, and its kernels trust their inputs: a wrong shape, dtype, list or index read or
wrote past a tensor's end (segfaults, heap garbage, silent wrong numbers). Each case takes a valid
call from test_compile's opcheck cases, spoils one argument, and expects a clear error naming the
op and the argument: ShapeError (a ValueError) for shapes, DTypeError (a TypeError) for dtypes,
ValueError for values, IndexError for class targets as the forward's check and torch raise. The
fakes check the same, so a graph being traced fails at trace time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rand
from test_compile import OPCHECK_CASES

from fastml.functional import DTypeError, ShapeError
from fastml.ops import LIBRARY

pytestmark = pytest.mark.skipif(not LIBRARY, reason="torch < 2.4 has no torch.library.custom_op")


def ints(*shape, high=3, dtype=torch.int64):
    return torch.randint(0, high, shape).to(dtype)


def probs(*shape):
    return torch.randn(shape).softmax(-1)


# id → (opcheck case, {argument position: bad value, or a function of the valid arguments},
#       expected error type, message pattern: the op and the argument it names)
CASES = {
    "linear-x-1d": ("linear", {0: rand(13)}, ShapeError, r"fastml::linear: x must be 2-D"),
    "linear-in-features": ("linear", {1: rand(5, 7)}, ShapeError, r"fastml::linear: x has 13 features .* weight"),
    "linear-bias-length": ("linear", {2: rand(2)}, ShapeError, r"fastml::linear: bias must have shape \(O,\) = \(5,\)"),
    "linear-weight-dtype": ("linear", {1: lambda a: a[1].double()}, DTypeError,
                            r"fastml::linear: weight has dtype torch.float64"),
    "linear-int-x": ("linear", {0: ints(7, 13), 1: ints(5, 13), 2: None}, DTypeError,
                     r"fastml::linear: x must be a floating-point tensor"),
    "linear-bool-x": ("linear", {0: ints(7, 13) > 0, 1: ints(5, 13) > 0, 2: None}, DTypeError,
                      r"fastml::linear: x must be a floating-point"),
    "linear_backward-grad-shape": ("linear_backward", {0: rand(7, 4)}, ShapeError,
                                   r"fastml::linear_backward: grad must have shape \(N, O\) = \(7, 5\)"),
    "linear_backward-grad-rows": ("linear_backward", {0: rand(3, 5)}, ShapeError, r"linear_backward: grad must"),
    "linear_backward-x-features": ("linear_backward", {1: rand(7, 4)}, ShapeError,
                                   r"fastml::linear_backward: x has 4 features"),
    "linear_backward-x-dtype": ("linear_backward", {1: lambda a: a[1].double()}, DTypeError,
                                r"fastml::linear_backward: weight has dtype .* x has dtype"),
    "linear_mse-target-shape": ("linear_mse-mean", {3: rand(7, 2)}, ShapeError,
                                r"fastml::linear_mse: target must have shape \(N, O\) = \(7, 3\)"),
    "linear_mse-bias-length": ("linear_mse-mean", {2: rand(1)}, ShapeError, r"fastml::linear_mse: bias must"),
    "linear_mse-in-features": ("linear_mse-mean", {1: rand(3, 11)}, ShapeError, r"fastml::linear_mse: x has 13"),
    "linear_mse-target-dtype": ("linear_mse-mean", {3: lambda a: a[3].double()}, DTypeError,
                                r"fastml::linear_mse: target has dtype"),
    "linear_mse-reduction": ("linear_mse-mean", {4: "avg"}, ValueError,
                             r"fastml::linear_mse: 'avg' is not a valid value for reduction"),
    "mse_loss-target-numel": ("mse_loss-mean", {1: rand(7, 3, 4)}, ShapeError,
                              r"fastml::mse_loss: target must have shape input's"),
    "mse_loss-target-transposed": ("mse_loss-mean", {1: rand(5, 3, 7)}, ShapeError, r"fastml::mse_loss: target"),
    "mse_loss-target-dtype": ("mse_loss-mean", {1: lambda a: a[1].double()}, DTypeError,
                              r"fastml::mse_loss: target has dtype"),
    "mse_loss-int": ("mse_loss-mean", {0: ints(7, 5), 1: ints(7, 5)}, DTypeError,
                     r"fastml::mse_loss: input must be a floating-point"),
    "mse_loss-reduction": ("mse_loss-mean", {2: "avg"}, ValueError, r"fastml::mse_loss: 'avg' is not a valid"),
    "mse_loss_backward-grad-shape": ("mse_loss_backward", {1: rand(3)}, ShapeError,
                                     r"fastml::mse_loss_backward: grad must have shape \(\) or diff's"),
    "mse_loss_backward-grad-dtype": ("mse_loss_backward", {1: lambda a: a[1].double()}, DTypeError,
                                     r"fastml::mse_loss_backward: grad has dtype"),
    "mse_loss_backward-reduction": ("mse_loss_backward", {2: "avg"}, ValueError, r"mse_loss_backward: 'avg'"),
    "cdist-features": ("cdist-2", {1: rand(2, 11, 3)}, ShapeError,
                       r"fastml::cdist: x1 \(2, 7, 5\) and x2 \(2, 11, 3\) must have the same batch and feature"),
    "cdist-batch": ("cdist-2", {1: rand(1, 11, 5)}, ShapeError, r"fastml::cdist: x1 .* and x2 .* same batch"),
    "cdist-x1-2d": ("cdist-2", {0: rand(7, 5)}, ShapeError, r"fastml::cdist: x1 must be 3-D"),
    "cdist-p": ("cdist-2", {2: -1.0}, ValueError, r"fastml::cdist: p must be one of"),
    "cdist-x2-dtype": ("cdist-2", {1: lambda a: a[1].double()}, DTypeError, r"fastml::cdist: x2 has dtype"),
    "knn-k-above-references": ("knn", {2: 14}, ValueError,
                               r"fastml::knn: k must be between 1 and the number of reference points \(13\), got k=14"),
    "knn-k-zero": ("knn", {2: 0}, ValueError, r"fastml::knn: k must be between 1"),
    "knn-k-negative": ("knn", {2: -2}, ValueError, r"fastml::knn: k must be between 1"),
    "knn-features": ("knn", {1: rand(2, 13, 3)}, ShapeError, r"fastml::knn: query .* and reference .* feature"),
    "knn-reference-dtype": ("knn", {1: lambda a: a[1].double()}, DTypeError, r"fastml::knn: reference has dtype"),
    "knn-int": ("knn", {0: ints(2, 7, 5), 1: ints(2, 13, 5)}, DTypeError, r"fastml::knn: query must be a floating"),
    "knn-p": ("knn-reference-p3", {3: -1.0}, ValueError, r"fastml::knn: p must be a non-negative number"),
    "max_pool2d-x-3d": ("max_pool2d", {0: rand(3, 11, 9)}, ShapeError, r"fastml::max_pool2d: x must be 4-D"),
    "max_pool2d-kernel-zero": ("max_pool2d", {1: [0, 0], 3: [0, 0]}, ValueError,
                               r"fastml::max_pool2d: kernel must be positive"),
    "max_pool2d-stride-zero": ("max_pool2d", {2: [0, 1]}, ValueError, r"fastml::max_pool2d: stride must be positive"),
    "max_pool2d-dilation-zero": ("max_pool2d", {4: [0, 0]}, ValueError, r"fastml::max_pool2d: dilation must be"),
    "max_pool2d-padding-negative": ("max_pool2d", {3: [-3, 0]}, ValueError,
                                    r"fastml::max_pool2d: padding must be non-negative"),
    "max_pool2d-padding-above-half-kernel": ("max_pool2d", {3: [2, 1]}, ValueError,
                                             r"fastml::max_pool2d: padding must be at most half the kernel"),
    "max_pool2d-kernel-one-element": ("max_pool2d", {1: [3]}, ValueError,
                                      r"fastml::max_pool2d: kernel must be a \(rows, columns\) pair"),
    "max_pool2d-stride-three-elements": ("max_pool2d", {2: [2, 2, 2]}, ValueError,
                                         r"fastml::max_pool2d: stride must be a \(rows, columns\) pair"),
    "max_pool2d-kernel-above-input": ("max_pool2d", {0: rand(2, 3, 4, 4), 1: [7, 7], 3: [0, 0]}, ValueError,
                                      r"fastml::max_pool2d: the window .* is larger than the padded input"),
    "max_pool2d-int": ("max_pool2d", {0: ints(2, 3, 11, 9)}, DTypeError,
                       r"fastml::max_pool2d: x must be a floating-point"),
    "max_pool2d_backward-index-above-plane": ("max_pool2d_backward", {1: torch.full((2, 3, 5, 4), 10_000_000)},
                                              ValueError, r"fastml::max_pool2d_backward: indices holds 10000000, "
                                                          r"but must be below 99"),
    "max_pool2d_backward-index-just-past-plane": ("max_pool2d_backward", {1: torch.full((2, 3, 5, 4), 99)},
                                                  ValueError, r"fastml::max_pool2d_backward: indices holds 99"),
    "max_pool2d_backward-indices-shape": ("max_pool2d_backward", {1: ints(2, 3, 2, 2)}, ShapeError,
                                          r"fastml::max_pool2d_backward: indices must have shape grad's"),
    "max_pool2d_backward-indices-int32": ("max_pool2d_backward", {1: ints(2, 3, 5, 4, dtype=torch.int32)},
                                          DTypeError, r"fastml::max_pool2d_backward: indices must be int64"),
    "max_pool2d_backward-indices-float": ("max_pool2d_backward", {1: rand(2, 3, 5, 4)}, DTypeError,
                                          r"fastml::max_pool2d_backward: indices must be int64"),
    "max_pool2d_backward-height-negative": ("max_pool2d_backward", {2: -1}, ValueError,
                                            r"fastml::max_pool2d_backward: height and width must be non-negative"),
    "max_pool2d_backward-grad-3d": ("max_pool2d_backward", {0: rand(3, 5, 4), 1: ints(3, 5, 4)}, ShapeError,
                                    r"fastml::max_pool2d_backward: grad must be 4-D"),
    "max_pool2d_backward-partial-window": ("max_pool2d_backward", {4: [3, 3]}, ValueError,
                                           r"fastml::max_pool2d_backward: kernel, stride, padding and dilation "
                                           r"are given all four or none"),
    "batch_norm-x-3d": ("batch_norm-relu", {0: rand(3, 5, 7)}, ShapeError, r"fastml::batch_norm: x must be 4-D"),
    "batch_norm-weight-length": ("batch_norm-relu", {1: rand(2)}, ShapeError,
                                 r"fastml::batch_norm: weight must have shape \(C,\) = \(5,\)"),
    "batch_norm-bias-length": ("batch_norm-relu", {2: rand(2)}, ShapeError, r"fastml::batch_norm: bias must have"),
    "batch_norm-weight-dtype": ("batch_norm-relu", {1: lambda a: a[1].double()}, DTypeError,
                                r"fastml::batch_norm: weight has dtype"),
    "batch_norm-int": ("batch_norm-relu", {0: ints(3, 5, 7, 6), 1: None, 2: None}, DTypeError,
                       r"fastml::batch_norm: x must be a floating-point"),
    "batch_norm_backward-grad-shape": ("batch_norm_backward", {0: rand(3, 5, 2, 2)}, ShapeError,
                                       r"fastml::batch_norm_backward: grad must have shape x's"),
    "batch_norm_backward-stats-channels": ("batch_norm_backward", {4: rand(3, 2)}, ShapeError,
                                           r"fastml::batch_norm_backward: stats must have shape \(3, C\) = \(3, 5\)"),
    "batch_norm_backward-stats-rows": ("batch_norm_backward", {4: rand(1, 5)}, ShapeError,
                                       r"fastml::batch_norm_backward: stats must have shape"),
    "batch_norm_backward-weight-length": ("batch_norm_backward", {2: rand(2)}, ShapeError,
                                          r"fastml::batch_norm_backward: weight must have shape"),
    "batch_norm_backward-stats-dtype": ("batch_norm_backward", {4: lambda a: a[4].double()}, DTypeError,
                                        r"fastml::batch_norm_backward: stats has dtype"),
    "batch_norm_backward-grad-dtype": ("batch_norm_backward", {0: lambda a: a[0].double()}, DTypeError,
                                       r"fastml::batch_norm_backward: grad has dtype"),
    "conv2d-channels": ("conv2d", {1: rand(4, 5, 3, 3)}, ShapeError,
                        r"fastml::conv2d: x has 3 channels but weight of shape \(4, 5, 3, 3\) with groups=1 expects 5"),
    "conv2d-x-3d": ("conv2d", {0: rand(3, 11, 9)}, ShapeError, r"fastml::conv2d: x must be 4-D"),
    "conv2d-weight-3d": ("conv2d", {1: rand(4, 3, 3)}, ShapeError, r"fastml::conv2d: weight must be 4-D"),
    "conv2d-bias-length": ("conv2d", {2: rand(9)}, ShapeError, r"fastml::conv2d: bias must have shape \(K,\) = \(4,\)"),
    "conv2d-groups-zero": ("conv2d", {6: 0}, ValueError, r"fastml::conv2d: groups must be a positive divisor"),
    "conv2d-groups-not-dividing": ("conv2d-groups-dilated-channels_last", {1: rand(5, 2, 2, 3)}, ValueError,
                                   r"fastml::conv2d: groups must be a positive divisor of weight's 5 output"),
    "conv2d-stride-zero": ("conv2d", {3: [0, 1]}, ValueError, r"fastml::conv2d: stride must be positive"),
    "conv2d-padding-negative": ("conv2d", {4: [-2, 1]}, ValueError, r"fastml::conv2d: padding must be non-negative"),
    "conv2d-dilation-zero": ("conv2d", {5: [0, 1]}, ValueError, r"fastml::conv2d: dilation must be positive"),
    "conv2d-stride-one-element": ("conv2d", {3: [1]}, ValueError, r"fastml::conv2d: stride must be a \(rows, col"),
    "conv2d-kernel-above-input": ("conv2d", {0: rand(2, 3, 2, 2), 4: [0, 0]}, ValueError,
                                  r"fastml::conv2d: weight's window .* is larger than the padded input"),
    "conv2d-weight-dtype": ("conv2d", {1: lambda a: a[1].double()}, DTypeError, r"fastml::conv2d: weight has dtype"),
    "conv2d-int": ("conv2d", {0: ints(2, 3, 11, 9), 1: ints(4, 3, 3, 3), 2: None}, DTypeError,
                   r"fastml::conv2d: x must be a floating-point"),
    "conv2d_backward-grad-shape": ("conv2d_backward", {0: rand(2, 4, 3, 3)}, ShapeError,
                                   r"fastml::conv2d_backward: grad must have shape \(N, K, OH, OW\) = \(2, 4, 6, 9\)"),
    "conv2d_backward-channels": ("conv2d_backward", {2: rand(4, 6, 3, 3)}, ShapeError,
                                 r"fastml::conv2d_backward: x has 3 channels"),
    "conv2d_backward-needs-two": ("conv2d_backward", {7: [True, True]}, ValueError,
                                  r"fastml::conv2d_backward: needs must be three flags"),
    "conv2d_backward-grad-dtype": ("conv2d_backward", {0: lambda a: a[0].double()}, DTypeError,
                                   r"fastml::conv2d_backward: grad has dtype"),
    "fused-channels": ("conv2d_relu_max_pool2d", {1: rand(5, 4, 3, 3)}, ShapeError,
                       r"fastml::conv2d_relu_max_pool2d: x has 3 channels"),
    "fused-bias-length": ("conv2d_relu_max_pool2d", {2: rand(2)}, ShapeError,
                          r"fastml::conv2d_relu_max_pool2d: bias must have shape"),
    "fused-groups-zero": ("conv2d_relu_max_pool2d", {6: 0}, ValueError, r"conv2d_relu_max_pool2d: groups must be"),
    "fused-pool-kernel-zero": ("conv2d_relu_max_pool2d", {7: [0, 0]}, ValueError,
                               r"fastml::conv2d_relu_max_pool2d: pool_kernel must be positive"),
    "fused-pool-stride-zero": ("conv2d_relu_max_pool2d", {8: [0, 2]}, ValueError,
                               r"fastml::conv2d_relu_max_pool2d: pool_stride must be positive"),
    "fused-pool-kernel-three": ("conv2d_relu_max_pool2d", {7: [2, 2, 2]}, ValueError,
                                r"fastml::conv2d_relu_max_pool2d: pool_kernel must be a \(rows, columns\) pair"),
    "fused-pool-kernel-above-conv-output": ("conv2d_relu_max_pool2d", {7: [13, 2]}, ValueError,
                                            r"fastml::conv2d_relu_max_pool2d: pool_kernel \[13, 2\] is larger"),
    "fused-pool-kernel-above-int8": ("conv2d_relu_max_pool2d", {0: rand(1, 3, 20, 20), 7: [12, 12]}, ValueError,
                                     r"fastml::conv2d_relu_max_pool2d: pool_kernel must hold at most 127"),
    "fused-weight-dtype": ("conv2d_relu_max_pool2d", {1: lambda a: a[1].double()}, DTypeError,
                           r"fastml::conv2d_relu_max_pool2d: weight has dtype"),
    "fused_backward-argmax-above-window": ("conv2d_relu_max_pool2d_backward",
                                           {1: torch.full((2, 5, 6, 5), 100, dtype=torch.int8)}, ValueError,
                                           r"fastml::conv2d_relu_max_pool2d_backward: argmax holds 100, but must "
                                           r"be below 4"),
    "fused_backward-argmax-int64": ("conv2d_relu_max_pool2d_backward", {1: ints(2, 5, 6, 5)}, DTypeError,
                                    r"fastml::conv2d_relu_max_pool2d_backward: argmax must be int8"),
    "fused_backward-argmax-shape": ("conv2d_relu_max_pool2d_backward", {1: ints(2, 5, 2, 2, dtype=torch.int8)},
                                    ShapeError, r"fastml::conv2d_relu_max_pool2d_backward: argmax must have shape"),
    "fused_backward-grad-shape": ("conv2d_relu_max_pool2d_backward", {0: rand(2, 5, 3, 3)}, ShapeError,
                                  r"fastml::conv2d_relu_max_pool2d_backward: grad must have shape"),
    "fused_backward-needs-two": ("conv2d_relu_max_pool2d_backward", {10: [True, True]}, ValueError,
                                 r"fastml::conv2d_relu_max_pool2d_backward: needs must be three flags"),
    "cross_entropy-target-rows": ("cross_entropy-mean", {1: ints(5, high=7)}, ShapeError,
                                  r"fastml::cross_entropy: target must have shape \(M,\) class indices = \(11,\)"),
    "cross_entropy-probs-shape": ("cross_entropy-mean", {1: probs(11, 3)}, ShapeError,
                                  r"fastml::cross_entropy: target must have shape \(M, C\) probabilities"),
    "cross_entropy-probs-dtype": ("cross_entropy-mean", {1: probs(11, 7).double()}, DTypeError,
                                  r"fastml::cross_entropy: target has dtype"),
    "cross_entropy-target-int32": ("cross_entropy-mean", {1: ints(11, high=7, dtype=torch.int32)}, DTypeError,
                                   r"fastml::cross_entropy: target must be int64 class indices or floating-point"),
    "cross_entropy-class-weight-length": ("cross_entropy-mean", {2: rand(3).abs()}, ShapeError,
                                          r"fastml::cross_entropy: class_weight must have shape \(C,\) = \(7,\)"),
    "cross_entropy-class-weight-dtype": ("cross_entropy-mean", {2: rand(7, dtype=torch.float64).abs()}, DTypeError,
                                         r"fastml::cross_entropy: class_weight has dtype"),
    "cross_entropy-logits-1d": ("cross_entropy-mean", {0: rand(7), 1: ints(1, high=7)}, ShapeError,
                                r"fastml::cross_entropy: logits must be 2-D"),
    "cross_entropy-reduction": ("cross_entropy-mean", {5: "avg"}, ValueError, r"fastml::cross_entropy: 'avg'"),
    "cross_entropy-smoothing-above-one": ("cross_entropy-mean", {4: 1.5}, ValueError,
                                          r"fastml::cross_entropy: label_smoothing must be between 0.0 and 1.0"),
    "cross_entropy-int-logits": ("cross_entropy-mean", {0: ints(11, 7)}, DTypeError,
                                 r"fastml::cross_entropy: logits must be a floating-point"),
    "cross_entropy_backward-target-above-classes": ("cross_entropy_backward", {1: torch.full((11,), 1_000_000)},
                                                    IndexError, r"fastml::cross_entropy_backward: Target 1000000 is "
                                                                r"out of bounds"),
    "cross_entropy_backward-target-negative": ("cross_entropy_backward", {1: torch.full((11,), -1_000_000)},
                                               IndexError, r"cross_entropy_backward: Target -1000000 is out of"),
    "cross_entropy_backward-grad-output-length": ("cross_entropy_backward", {5: rand(3)}, ShapeError,
                                                  r"fastml::cross_entropy_backward: grad_output must have shape "
                                                  r"\(M,\) = \(11,\)"),
    "cross_entropy_backward-target-rows": ("cross_entropy_backward", {1: ints(3, high=7)}, ShapeError,
                                           r"fastml::cross_entropy_backward: target must have shape"),
    "cross_entropy_backward-class-weight-length": ("cross_entropy_backward", {2: rand(2).abs()}, ShapeError,
                                                   r"fastml::cross_entropy_backward: class_weight must have"),
    "linear_cross_entropy-in-features": ("linear_cross_entropy-mean", {1: rand(7, 5)}, ShapeError,
                                         r"fastml::linear_cross_entropy: x has 13 features"),
    "linear_cross_entropy-bias-length": ("linear_cross_entropy-mean", {2: rand(2)}, ShapeError,
                                         r"fastml::linear_cross_entropy: bias must have shape"),
    "linear_cross_entropy-target-rows": ("linear_cross_entropy-mean", {3: ints(3, high=7)}, ShapeError,
                                         r"fastml::linear_cross_entropy: target must have shape"),
    "linear_cross_entropy-class-weight-length": ("linear_cross_entropy-mean", {4: rand(2).abs()}, ShapeError,
                                                 r"fastml::linear_cross_entropy: class_weight must have shape"),
    "linear_cross_entropy-probs-shape": ("linear_cross_entropy-probs-none", {3: probs(11, 3)}, ShapeError,
                                         r"fastml::linear_cross_entropy: target must have shape \(M, C\)"),
    "linear_cross_entropy-weight-dtype": ("linear_cross_entropy-mean", {1: lambda a: a[1].double()}, DTypeError,
                                          r"fastml::linear_cross_entropy: weight has dtype"),
    "linear_cross_entropy-reduction": ("linear_cross_entropy-mean", {7: "avg"}, ValueError,
                                       r"fastml::linear_cross_entropy: 'avg'"),
    "linear_cross_entropy_backward-grad-output-length": ("linear_cross_entropy_backward", {7: rand(3)}, ShapeError,
                                                         r"fastml::linear_cross_entropy_backward: grad_output must"),
    "linear_cross_entropy_backward-target-above-classes": ("linear_cross_entropy_backward",
                                                           {3: torch.full((11,), 1_000_000)}, IndexError,
                                                           r"fastml::linear_cross_entropy_backward: Target 1000000"),
    "linear_cross_entropy_backward-in-features": ("linear_cross_entropy_backward", {1: rand(7, 5)}, ShapeError,
                                                  r"fastml::linear_cross_entropy_backward: x has 13 features"),
    "sgd_step-fewer-grads": ("sgd_step", {1: lambda a: a[1][:2]}, ValueError,
                             r"fastml::sgd_step: grads has 2 entries but params has 3"),
    "sgd_step-fewer-buffers": ("sgd_step", {2: lambda a: a[2][:1]}, ValueError,
                               r"fastml::sgd_step: buffers has 1 entries but params has 3"),
    "sgd_step-fewer-fresh": ("sgd_step", {3: [True]}, ValueError, r"fastml::sgd_step: fresh has 1 entries"),
    "sgd_step-grad-numel": ("sgd_step", {1: lambda a: [rand(2, 2), *a[1][1:]]}, ShapeError,
                            r"fastml::sgd_step: grads\[0\] has shape \(2, 2\) but params\[0\] has \(3, 5\)"),
    "sgd_step-grad-transposed": ("sgd_step", {1: lambda a: [rand(5, 3), *a[1][1:]]}, ShapeError,
                                 r"fastml::sgd_step: grads\[0\] has shape \(5, 3\)"),
    "sgd_step-buffer-numel": ("sgd_step", {2: lambda a: [*a[2][:1], rand(100), a[2][2]]}, ShapeError,
                              r"fastml::sgd_step: buffers\[1\] has shape \(100,\) but params\[1\] has \(7,\)"),
    "sgd_course_step-fewer-grads": ("sgd_course_step", {1: []}, ValueError,
                                    r"fastml::sgd_course_step: grads has 0 entries but params has 1"),
    "sgd_course_step-grad-numel": ("sgd_course_step", {1: [rand(2)]}, ShapeError,
                                   r"fastml::sgd_course_step: grads\[0\] has shape \(2,\)"),
    "adam_step-fewer-grads": ("adam_step", {1: lambda a: a[1][:1]}, ValueError,
                              r"fastml::adam_step: grads has 1 entries but params has 2"),
    "adam_step-fewer-exp-avgs": ("adam_step", {2: lambda a: a[2][:1]}, ValueError,
                                 r"fastml::adam_step: exp_avgs has 1 entries"),
    "adam_step-fewer-state-steps": ("adam_step", {5: lambda a: a[5][:1]}, ValueError,
                                    r"fastml::adam_step: state_steps has 1 entries"),
    "adam_step-no-max-with-amsgrad": ("adam_step", {4: []}, ValueError,
                                      r"fastml::adam_step: max_exp_avg_sqs has 0 entries"),
    "adam_step-exp-avg-numel": ("adam_step", {2: lambda a: [rand(2), a[2][1]]}, ShapeError,
                                r"fastml::adam_step: exp_avgs\[0\] has shape \(2,\) but params\[0\] has \(3, 5\)"),
    "adam_step-exp-avg-sq-numel": ("adam_step", {3: lambda a: [a[3][0], rand(100, 100).abs()]}, ShapeError,
                                   r"fastml::adam_step: exp_avg_sqs\[1\] has shape \(100, 100\)"),
}


def spoiled(case: str, rng) -> tuple:
    """(op, arguments): a valid opcheck case's arguments (float32), one or more replaced (a
    position past the case's arguments gives the optional ones before it as None)."""
    base, changes, _, _ = CASES[case]
    op, make_args = OPCHECK_CASES[base]
    args = list(make_args(torch.float32, rng))
    valid = list(args)
    for position, value in changes.items():
        args += [None] * (position + 1 - len(args))
        args[position] = value(valid) if callable(value) else value
    return op, args


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_raises_naming_it(case, rng):
    op, args = spoiled(case, rng)
    error, match = CASES[case][2:]
    with pytest.raises(error, match=match):
        op(*args)


def test_every_op_has_a_bad_argument_case():
    assert {str(OPCHECK_CASES[base][0]) for base, *_ in CASES.values()} == {str(op) for op, _ in
                                                                           OPCHECK_CASES.values()}


# Cases whose check reads the data (an index a kernel writes at): the op's, not the fake's.
INDEX_CASES = {"max_pool2d_backward-index-above-plane", "max_pool2d_backward-index-just-past-plane",
               "fused_backward-argmax-above-window", "cross_entropy_backward-target-above-classes",
               "cross_entropy_backward-target-negative", "linear_cross_entropy_backward-target-above-classes"}


@pytest.mark.parametrize("case", [c for c in CASES if c not in INDEX_CASES])
def test_fake_raises_at_trace_time(case, rng):
    """The fakes run the same check on fake tensors, so a bad call fails while a graph is traced."""
    op, args = spoiled(case, rng)
    error, match = CASES[case][2:]
    mode = torch._subclasses.fake_tensor.FakeTensorMode()

    def fake(value):
        if isinstance(value, list):
            return [fake(v) for v in value]
        return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    fakes = [fake(a) for a in args]
    with mode, pytest.raises(error, match=match):
        op(*fakes)


def test_a_target_of_ignore_index_passes_the_backward_check(rng):
    """ignore_index outside [0, C) (torch's -100) is no class index: the check lets it through."""
    logits, target, weight = rand(5, 4, generator=rng), torch.tensor([0, -100, 3, -100, 1]), rand(4).abs()
    grad = torch.ops.fastml.cross_entropy_backward(logits, target, weight, -100, 0.0, rand(5, generator=rng))
    assert grad.shape == (5, 4) and torch.equal(grad[1], torch.zeros(4))
