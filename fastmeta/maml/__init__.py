"""MAML and Meta-SGD that adapt a whole meta-batch of tasks at once (fastmeta.MAML,
fastmeta.MetaSGD); see wrappers.py for the API and batched.py for the math, meta_step.py
for the meta-step in bounded memory."""

from fastmeta.maml.batched import BatchedLearner
from fastmeta.maml.meta_step import MetaStepResult
from fastmeta.maml.task_model import STRATEGIES, default_strategy
from fastmeta.maml.wrappers import MAML, Learner, MetaSGD

__all__ = [
    "BatchedLearner",
    "Learner",
    "MAML",
    "MetaSGD",
    "MetaStepResult",
    "STRATEGIES",
    "default_strategy",
]
