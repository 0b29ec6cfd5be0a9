"""MAML and Meta-SGD that adapt a whole meta-batch of tasks at once (fastmeta.MAML,
fastmeta.MetaSGD); see wrappers.py for the API and batched.py for the math."""

from fastmeta.maml.batched import BatchedLearner
from fastmeta.maml.task_model import STRATEGIES, default_strategy
from fastmeta.maml.wrappers import MAML, Learner, MetaSGD

__all__ = ["BatchedLearner", "Learner", "MAML", "MetaSGD", "STRATEGIES", "default_strategy"]
