"""Ops that are differentiable once: their backward op gets an autograd formula that
raises, so a second derivative fails loudly instead of silently being zero."""


def forbid_second_derivative(backward_op, name: str) -> None:
    """Registers, for `backward_op` (a torch.library custom op), a derivative that
    raises a RuntimeError naming `name` (fastmeta uses such ops only where no second
    derivative is taken)."""
    def raise_on_derivative(ctx, *grads):
        raise RuntimeError(f"{name} is differentiable once: its backward has no derivative "
                           f"(fastmeta uses it only where none is taken)")

    backward_op.register_autograd(raise_on_derivative,
                                  setup_context=lambda ctx, inputs, output: None)
