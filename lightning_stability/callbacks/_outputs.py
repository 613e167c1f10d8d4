"""What the callbacks that read a step's outputs say when a step returns only its loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

#: The step output these callbacks read (the loss-dict protocol), as the messages show it.
PROTOCOL = "{'loss': total, 'losses': {name: unweighted term, ...}, 'preds': output, 'target': reference}"


def only_the_loss(outputs: Any) -> bool:
    """Whether a step returned its loss alone: a bare tensor, which Lightning passes on to the callbacks as is
    (evaluation) or as ``{"loss": loss}`` (training with automatic optimization)."""
    return isinstance(outputs, Tensor) or (isinstance(outputs, Mapping) and list(outputs) == ["loss"])


def only_the_loss_message(hook: str) -> str:
    return (
        f"`{hook}` returned only the loss (a bare tensor; Lightning passes it on as {{'loss': loss}}): return the "
        f"loss-dict instead, {PROTOCOL}"
    )
