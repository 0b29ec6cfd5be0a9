"""Adapting T tasks at once: fast weights stacked [T, P] in one flat buffer.

Step 1 starts from the shared initial parameters theta [P]; every step takes the
support-loss gradient of every task, g [T, P], and applies the update to all tasks
and all parameters in one call:

    step 1:   fast = theta - alpha_1 * g          fastmeta.inner_update (the fused op:
                                                  d theta = sum_t d fast, reduced in-kernel)
    step k>1: fast = fast - alpha_k * g           one elementwise pass over [T, P]

alpha_k is a float (MAML), a per-step float (MAML++), or a learnable tensor [P]
(Meta-SGD). With create_graph (second order) g stays differentiable, so the
meta-gradient flows through every step into theta and alpha.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastmeta.maml.task_model import TaskModel, batch_statistics_only
from fastmeta.ops.inner_update import inner_update


def check_support(support_x: Tensor, support_y: Tensor, steps: int) -> None:
    """Clear errors for what would otherwise fail deep inside the model or the loss."""
    for name, value in (("support_x", support_x), ("support_y", support_y)):
        if not isinstance(value, Tensor) or value.dim() < 1:
            raise ValueError(
                f"adapt_batch: {name} must be a tensor [T, ...] with the task "
                f"dimension first, got {_describe(value)}"
            )
    if support_x.shape[0] == 0:
        raise ValueError(
            f"adapt_batch: no task to adapt: support_x {list(support_x.shape)} (T = 0)"
        )
    if support_x.shape[0] != support_y.shape[0]:
        raise ValueError(
            f"adapt_batch: support_x {list(support_x.shape)} and support_y "
            f"{list(support_y.shape)} must have the same number of tasks T "
            f"(dimension 0)"
        )
    if not (support_y.dtype == torch.int64 or support_y.is_floating_point()):
        raise ValueError(
            f"adapt_batch: support_y must hold int64 class indices or floating "
            f"targets, got dtype {support_y.dtype}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"adapt_batch: steps must be an integer >= 1, got {steps!r}")


def _describe(value) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


class BatchedLearner:
    """T adapted copies of a module. Call it with per-task inputs:
    learner(query_x [T, ...]) -> outputs [T, ...] (task t uses its own fast weights).

    fast_weights: [T, P] (differentiable w.r.t. the initial parameters and the rates);
    params(t) -> {name: tensor} for task t; strategy: 'loop' or 'vmap'.
    """

    def __init__(self, task_model: TaskModel, fast_weights: Tensor, strategy: str):
        self.task_model, self.fast_weights, self.strategy = task_model, fast_weights, strategy

    @property
    def num_tasks(self) -> int:
        return self.fast_weights.shape[0]

    def params(self, t: int) -> dict[str, Tensor]:
        return self.task_model.layout.unflatten(self.fast_weights[t])

    def __call__(self, query_x: Tensor):
        if (
            not isinstance(query_x, Tensor)
            or query_x.dim() < 1
            or query_x.shape[0] != self.num_tasks
        ):
            raise ValueError(
                f"BatchedLearner: query_x must be [T = {self.num_tasks}, ...] "
                f"(one input batch per adapted task), got {_describe(query_x)}"
            )
        with batch_statistics_only(self.task_model.module):
            return self.task_model.forward(self.fast_weights, query_x, self.strategy)


def adapt_batch(
    task_model: TaskModel,
    theta: Tensor,
    alphas: Callable[[int], Tensor | float],
    support_x: Tensor,
    support_y: Tensor,
    loss_fn,
    steps: int,
    first_order: bool,
    strategy: str,
    allow_unused: bool,
) -> BatchedLearner:
    """Runs `steps` inner steps for all tasks; alphas(k) is step k's learning rate
    (a float, or a tensor [] or [P])."""
    check_support(support_x, support_y, steps)
    weights = theta
    with batch_statistics_only(task_model.module):
        for k in range(steps):
            g = task_model.task_gradients(
                weights,
                support_x,
                support_y,
                loss_fn,
                strategy,
                create_graph=not first_order,
                allow_unused=allow_unused,
            )
            alpha = alphas(k)
            weights = inner_update(theta, alpha, g) if k == 0 else weights - alpha * g
    return BatchedLearner(task_model, weights, strategy)
