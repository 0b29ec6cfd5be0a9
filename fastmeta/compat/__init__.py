"""Drop-in replacements for other meta-learning libraries' functions, on fastmeta's
kernels: the same module layout, names, arguments and numbers, so that changing the
import is the whole migration.

    fastmeta.compat.torchmeta     torchmeta.utils.prototype (get_num_samples,
                                  get_prototypes, prototypical_loss)
    fastmeta.compat.learn2learn   learn2learn.algorithms (MAML, MetaSGD, maml_update,
                                  meta_sgd_update) and learn2learn.utils' module
                                  functions (clone_module, update_module,
                                  detach_module, ...)
    fastmeta.compat.higher        higher (innerloop_ctx, monkeypatch, get_diff_optim;
                                  higher.patch, higher.optim: SGD, Adam, AdamW;
                                  higher.utils)

Each module's docstring says what it covers and what still differs from the original.
"""
