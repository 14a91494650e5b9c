"""Whether calling a module would run a hook: the passes that call a module's maths
directly (``F.linear`` on its weight) call the module instead when one would."""

from __future__ import annotations

from torch import nn

__all__ = ["hooked"]


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook (its own or a global one)."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _GLOBAL_HOOKS[0]
        or _GLOBAL_HOOKS[1]
        or _GLOBAL_HOOKS[2]
        or _GLOBAL_HOOKS[3]
    )


_GLOBAL_HOOKS = (
    nn.modules.module._global_forward_pre_hooks,
    nn.modules.module._global_forward_hooks,
    nn.modules.module._global_backward_hooks,
    nn.modules.module._global_backward_pre_hooks,
)
