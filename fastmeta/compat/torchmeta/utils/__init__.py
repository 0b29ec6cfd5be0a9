"""torchmeta.utils' ProtoNet names (see fastmeta.compat.torchmeta)."""

from fastmeta.compat.torchmeta.utils import prototype
from fastmeta.compat.torchmeta.utils.prototype import (
    get_num_samples,
    get_prototypes,
    prototypical_loss,
)

__all__ = ["get_num_samples", "get_prototypes", "prototypical_loss", "prototype"]
