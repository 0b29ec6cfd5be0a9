"""higher's differentiable inner loops on fastmeta, under higher's module layout:
`import fastmeta.compat.higher as higher` is the whole migration.

    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(loss_fn(fmodel(x_support), y_support))   # new fast weights
        loss_fn(fmodel(x_query), y_query).backward()          # meta-gradient into model

Covered: innerloop_ctx, monkeypatch, get_diff_optim, create_diff_optim,
register_optim (also importable from here, as in higher); higher.patch
(make_functional, monkeypatch, buffer_sync; the patched model's forward(x, params=),
parameters(time=), fast_params, init_fast_params, update_params,
track_higher_grads), higher.optim (DifferentiableOptimizer with step(loss,
params=None, override=None, grad_callback=None), per-group hyperparameters,
`override` tensors that require grad, state copied from the torch optimizer,
get/apply_trainable_opt_params) and higher.utils (flatten, get_func_params).
Differentiable SGD (momentum, dampening, nesterov, weight_decay, maximize), Adam
and AdamW (amsgrad, weight_decay, maximize) step as torch.optim's own steps do, to
rounding; first order with track_higher_grads=False; BatchNorm buffers update in
training mode on the patched model's own copies. Every SGD and Adam parameter
write is fastmeta's fused inner_update op on each group's flattened parameters
(optim's _rules.py).

What differs from higher 0.2.1:
* Optimizers: SGD, Adam and AdamW (higher has no AdamW); higher's Adadelta,
  Adagrad, Adamax, ASGD, RMSprop and Rprop raise a ValueError naming them (add one
  with register_optim, or keep higher for it).
* Adam adds eps as torch.optim.Adam does, after the bias correction
  (sqrt(v) / sqrt(1 - beta2^t) + eps); higher adds it before (its steps differ from
  torch's by a relative O(eps) amount). maximize is honoured (higher ignores it).
* track_higher_grads=False keeps parameters with requires_grad=False frozen
  (higher makes them require grad after the first step and updates them after).
* diffopt.step raises a ValueError when the loss depends on no fast weight (a loss
  computed with the model instead of fmodel), and `override` on a hyperparameter
  the optimizer does not have raises; higher does nothing in both cases.
* The patched model keeps the model's hooks (higher drops them); its submodules,
  called directly, run on the latest fast weights but take no params=.
* get_trainable_opt_params leaves flags (nesterov, amsgrad, ...) out; higher turns
  them into tensors too. apply_trainable_opt_params writes numbers as floats.
* Bad arguments raise a TypeError or ValueError naming the argument and what was
  given (a params list of the wrong length or shapes, a time with no fast weights).
"""

from contextlib import contextmanager

from fastmeta.compat.higher import optim, patch, utils
from fastmeta.compat.higher.optim import create_diff_optim, get_diff_optim, register_optim
from fastmeta.compat.higher.patch import monkeypatch

__all__ = [
    "create_diff_optim",
    "get_diff_optim",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]


@contextmanager
def innerloop_ctx(
    model,
    opt,
    device=None,
    copy_initial_weights: bool = True,
    override: dict | None = None,
    track_higher_grads: bool = True,
):
    """Yields (fmodel, diffopt): fmodel = monkeypatch(model, device,
    copy_initial_weights, track_higher_grads), a patched copy of model running on
    fast weights, and diffopt = get_diff_optim(opt, model.parameters(), fmodel, ...),
    whose step(loss) differentiates loss with respect to fmodel's fast weights and
    gives fmodel new ones by opt's rule.

    copy_initial_weights=True (the default, as in higher) starts from detached
    copies of model's parameters, so no meta-gradient reaches them: MAML wants
    False. override: {hyperparameter: [value] or [one value per group]}, values may
    be tensors that require grad (learned learning rates). track_higher_grads=False:
    first order, each step's fast weights detached (leaves that require grad).
    """
    fmodel = monkeypatch(
        model,
        device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    yield fmodel, diffopt
