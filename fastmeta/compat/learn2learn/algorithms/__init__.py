"""learn2learn.algorithms' MAML and MetaSGD (see fastmeta.compat.learn2learn)."""

from fastmeta.compat.learn2learn.algorithms import maml, meta_sgd
from fastmeta.compat.learn2learn.algorithms.maml import MAML, maml_update
from fastmeta.compat.learn2learn.algorithms.meta_sgd import MetaSGD, meta_sgd_update

__all__ = ["MAML", "MetaSGD", "maml", "maml_update", "meta_sgd", "meta_sgd_update"]
