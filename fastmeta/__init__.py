"""fastmeta: fused Triton and C++/CUDA kernels for meta-learning.

import fastmeta
print(fastmeta.backends())          # what was built, what runs here
out = fastmeta.inner_update(theta, 0.4, grads)   # [P], lr, [T, P] -> [T, P]
loss, acc = fastmeta.functional.prototypical_loss(support, ys, queries, yq, num_classes)
model = fastmeta.ProtoNet(encoder)                # logits / loss from raw episodes
metanet = fastmeta.MetaNetwork(ways=5)            # Meta Networks, conv4 for 28x28
maml = fastmeta.MAML(model, lr=0.4)              # learner = maml.adapt_batch(xs, ys, loss_fn)
with fastmeta.use_backend("reference"):          # force a backend
    ...
with fastmeta.validate_args(False):              # skip label value checks (speed)
    ...
"""

from fastmeta._version import __version__

try:
    import torch  # noqa: F401
except ModuleNotFoundError as _error:
    if _error.name != "torch":
        raise
    raise ModuleNotFoundError(
        f"fastmeta {__version__} needs PyTorch (torch >= 2.13), which is not installed in "
        "this environment: install torch first (pip install torch, or the CPU or CUDA build "
        "for your machine from https://pytorch.org/get-started/locally/), then run this again",
        name="torch",
    ) from None

from fastmeta import functional  # noqa: E402
from fastmeta.backend import BACKENDS, BackendUnavailableError, last_backend, use_backend
from fastmeta.cpu_pool import check_pool_setting, empty_cpu_cache
from fastmeta.maml import MAML, MetaSGD
from fastmeta.metanet import MetaNetwork
from fastmeta.ops import inner_update
from fastmeta.protonet import ProtoNet
from fastmeta.report import backends
from fastmeta.validation import raise_deferred_errors, set_validate_args, validate_args

check_pool_setting()

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendUnavailableError",
    "MAML",
    "MetaNetwork",
    "MetaSGD",
    "ProtoNet",
    "backends",
    "empty_cpu_cache",
    "functional",
    "inner_update",
    "last_backend",
    "raise_deferred_errors",
    "set_validate_args",
    "use_backend",
    "validate_args",
]
