"""torchmeta's ProtoNet functions on fastmeta's kernels, under torchmeta's module
layout: replace `torchmeta` by `fastmeta.compat.torchmeta` in the import.

    from torchmeta.utils.prototype import get_prototypes, prototypical_loss
    from fastmeta.compat.torchmeta.utils.prototype import get_prototypes, prototypical_loss

Covered: torchmeta.utils.prototype (get_num_samples, get_prototypes, prototypical_loss),
also importable from torchmeta.utils as in torchmeta. Not covered: torchmeta's
datasets, data loaders, transforms, `torchmeta.modules` (MetaModule) and the rest of
`torchmeta.utils` (gradient_update_parameters, matching_*, hardness_metric); keep
importing those from torchmeta. Differences: fastmeta.compat.torchmeta.utils.prototype.
"""

from fastmeta.compat.torchmeta import utils

__all__ = ["utils"]
