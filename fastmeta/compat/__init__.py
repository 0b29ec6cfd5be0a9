"""Drop-in replacements for other meta-learning libraries' functions, on fastmeta's
kernels: the same module layout, names, arguments and numbers, so that changing the
import is the whole migration.

    fastmeta.compat.torchmeta     torchmeta.utils.prototype (get_num_samples,
                                  get_prototypes, prototypical_loss)
    fastmeta.compat.higher        higher (innerloop_ctx, monkeypatch, get_diff_optim;
                                  higher.patch, higher.optim: SGD, Adam, AdamW;
                                  higher.utils)

Planned: fastmeta.compat.learn2learn. Each module's docstring says what it covers and
what still differs from the original.
"""
