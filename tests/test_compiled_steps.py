"""Whole training steps under torch.compile(fullgraph=True): a ProtoNet step (conv4,
the fused loss, its gradients, an SGD update) and MAML / Meta-SGD adapt_batch
meta-steps, each equal to the same step run eagerly for a few steps.

The update is `torch._foreach_add_` inside the graph: torch.optim's `step()` breaks the
graph on purpose (torch/optim/optimizer.py, `_use_grad`), so no step calling it
compiles with fullgraph=True; compile it on its own as torch's docs show. CPU runs
use backend="aot_eager" (Dynamo's fullgraph capture and AOTAutograd through the
fastmeta ops, without Inductor's minutes of C++ codegen); the GPU check runs the same
steps with Inductor and CUDA graphs (tests/test_gpu_kernels.py).
"""

import copy

import pytest
import torch
import torch.nn.functional as TF

import fastmeta
from fastmeta.models import conv4


def sgd_step(loss_fn, params: list[torch.Tensor], lr: float = 0.01):
    """step(*batch) -> loss: loss_fn(*batch), its gradients, params -= lr * grads."""

    def step(*batch):
        loss = loss_fn(*batch)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-lr)
        return loss.detach()

    return step


def compiled_equals_eager(make_step, batch, tol: float = 1e-5, steps: int = 3, **compile_args):
    """Runs make_step() (a fresh copy of the model each) eagerly and compiled with
    fullgraph=True and `compile_args` (default backend="aot_eager") side by side."""
    eager, compiled = make_step(), make_step()
    run = torch.compile(compiled.step, fullgraph=True, **({"backend": "aot_eager"} | compile_args))
    for _ in range(steps):
        torch.testing.assert_close(run(*batch), eager.step(*batch), rtol=tol, atol=tol / 10)
    for a, b in zip(compiled.params, eager.params):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol / 10)


class ProtoNetStep:
    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.step = sgd_step(self.loss, self.params)

    def loss(self, support_x, support_y, query_x, query_y):
        return self.model.loss(support_x, support_y, query_x, query_y, num_classes=3)[0]


class MetaStep:
    def __init__(self, meta):
        self.meta = copy.deepcopy(meta)
        self.params = list(self.meta.parameters())
        self.step = sgd_step(self.loss, self.params)

    def loss(self, xs, ys, xq, yq):
        learner = self.meta.adapt_batch(xs, ys, TF.cross_entropy, steps=2)
        return TF.cross_entropy(learner(xq).flatten(0, 1), yq.flatten())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A step takes gradients (autograd.grad, and adapt_batch's inner loop), which
    Dynamo traces only with trace_autograd_ops (torch 2.14's switch, off by default)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def test_protonet_training_step_compiles_with_fullgraph():
    torch.manual_seed(0)
    model = fastmeta.ProtoNet(conv4(), learn_tau=True)
    batch = (
        torch.randn(2, 6, 1, 28, 28),
        torch.arange(3).repeat(2).expand(2, -1).contiguous(),
        torch.randn(2, 9, 1, 28, 28),
        torch.arange(3).repeat(3).expand(2, -1).contiguous(),
    )
    compiled_equals_eager(lambda: ProtoNetStep(model), batch)


@pytest.mark.parametrize("meta", ["MAML", "MetaSGD"])
def test_maml_meta_step_compiles_with_fullgraph(meta):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    wrapped = getattr(fastmeta, meta)(model, lr=0.3)
    batch = (
        torch.randn(5, 6, 4),
        torch.randint(0, 3, (5, 6)),
        torch.randn(5, 9, 4),
        torch.randint(0, 3, (5, 9)),
    )
    compiled_equals_eager(lambda: MetaStep(wrapped), batch)
