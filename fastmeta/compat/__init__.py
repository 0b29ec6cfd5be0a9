"""Drop-in replacements for other meta-learning libraries' functions, on fastmeta's
kernels: the same module layout, names, arguments and numbers, so that changing the
import is the whole migration.

    fastmeta.compat.torchmeta     torchmeta.utils.prototype (get_num_samples,
                                  get_prototypes, prototypical_loss)

Planned: fastmeta.compat.learn2learn and fastmeta.compat.higher. Each module's
docstring says what it covers and what still differs from the original.
"""
