"""learn2learn's MAML, MetaSGD and module utilities on fastmeta's kernels, under
learn2learn's module layout: replace `learn2learn` by `fastmeta.compat.learn2learn` in
the import.

    import learn2learn as l2l
    import fastmeta.compat.learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=0.5, first_order=False)
    learner = maml.clone()                      # an nn.Module: .module, train/eval/to
    learner.adapt(loss_fn(learner(xs), ys))     # one step on fastmeta's fused inner_update
    loss_fn(learner(xq), yq).backward()         # meta-gradient into model's parameters

Covered: learn2learn.algorithms.MAML(model, lr, first_order=False, allow_unused=None,
allow_nograd=False) and MetaSGD(model, lr=1.0, first_order=False, lrs=None) with
learn2learn's signatures, maml_update and meta_sgd_update (also in
algorithms.maml / algorithms.meta_sgd), and learn2learn.utils' clone_module,
update_module, detach_module, clone_parameters, clone_named_parameters, magic_box
and accuracy (also at the top level, as in learn2learn). A clone is fastmeta's
Learner: an nn.Module whose `.module` is a copy of the model's tree (parameters
cloned, buffers that need no grad shared, so batch norm's running statistics are the
model's), whose parameters()/named_parameters() line up with the wrapper's (frozen
ones included), that train()/eval()/to() act on, that can be cloned again, and whose
adapt(loss, first_order=None, allow_unused=None, allow_nograd=None) takes
p - lr * grad (MetaSGD: its rates) for every parameter that requires grad, second
order unless first_order. fastmeta's own adapt_batch (T tasks at once) is on both
wrappers too.

Not covered: learn2learn.data, vision, text, gym, nn and optim, algorithms.GBML and
the Lightning modules, utils' distribution helpers and flatten_config; keep importing
those from learn2learn (asking this module for them says so).

What differs from learn2learn:
* clone() returns a fastmeta.maml.Learner, not a MAML or MetaSGD: isinstance(clone,
  MAML) is False. Its `lr` and `lrs` are the wrapper's, read-only (a MetaSGD clone
  does not copy the rates; the meta-gradient reaches the wrapper's directly).
  MetaSGD's clone() and adapt() take all of MAML's flags (learn2learn's take none and
  first_order); allow_nograd=True lets a MetaSGD leave frozen parameters as they are.
* Errors name the argument: adapting parameters that do not require grad without
  allow_nograd is a ValueError naming them (learn2learn prints a traceback, then
  fails with an UnboundLocalError); flags that are not bools, a model that is not an
  nn.Module, an lr that is not a finite number, lrs of the wrong count or shape, and
  grads or updates of the wrong count are TypeErrors or ValueErrors (learn2learn
  warns and zips the shorter list). A parameter the loss does not use without
  allow_unused is torch's RuntimeError, as in learn2learn.
* MAML.adapt / MetaSGD.adapt on the wrapper itself is a TypeError: adapt a clone
  (learn2learn's replaces the wrapped model's parameters in place).
* lr is read once, as a number (a one-element tensor is taken, but not learned: learn
  rates with MetaSGD); a model with no parameter that requires grad is a ValueError
  when wrapped.
* The numbers: adapted parameters and meta-gradients equal plain torch's in float64
  (the tests compare to 1e-12; on the CPU the fused p - lr * g is bit for bit
  learn2learn's p + (-lr * g)); other backends may round lr * g differently.
"""

from fastmeta.compat.learn2learn import algorithms, utils
from fastmeta.compat.learn2learn.utils import *  # noqa: F403 (learn2learn's `from .utils import *`)

__all__ = ["algorithms", "utils", *utils.__all__]

_NOT_COVERED = ("data", "vision", "text", "gym", "nn", "optim")


def __getattr__(name: str):
    if name in _NOT_COVERED:
        raise AttributeError(
            f"fastmeta.compat.learn2learn does not cover learn2learn.{name}: import it "
            f"from learn2learn (fastmeta covers algorithms.MAML, algorithms.MetaSGD and "
            f"the module utilities)"
        )
    raise AttributeError(f"module 'fastmeta.compat.learn2learn' has no attribute {name!r}")
