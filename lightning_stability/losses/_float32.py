"""A module whose own floating-point buffers stay float32 when the model around it is cast to half precision."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class Float32Buffers(nn.Module):
    """Keeps this module's own floating-point buffers in float32 through ``.to(dtype)``, ``.half()``, ``.bfloat16()``.

    Lightning's ``precision="bf16-true"`` / ``"16-true"`` call ``module.to(dtype)`` on the whole LightningModule,
    losses included. A loss's constants (STFT windows, mel filterbanks) rounded to bf16 change its value (a bf16
    filterbank has 3 significant digits), and a mix of float32 and half operands fails (``einsum``: "expected
    scalar type Float but found BFloat16"); running averages kept in bf16 stop moving (``0.999 * x`` rounds back
    to ``x``). Device moves still apply; only the dtype change is undone, from the float32 values held before it,
    so nothing is rounded.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32 and new.is_floating_point():
                self._buffers[name] = old.to(device=new.device)
        return self
