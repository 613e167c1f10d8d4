"""Codebook usage of a residual vector quantizer: perplexity and dead-code fraction per stage."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_stability._checks import check_int
from lightning_stability.metrics.functional import codebook_histogram, codebook_perplexity, dead_code_fraction

__all__ = ["CodebookUsage"]


class CodebookUsage(Metric):
    r"""Per-stage code histogram of a residual VQ, reported as perplexity and dead-code fraction.

    For stage :math:`s` with counts :math:`n_{s,k}` accumulated since the last ``reset()``:

    .. math::
        p_{s,k} = \frac{n_{s,k}}{\sum_k n_{s,k}}, \qquad
        \mathrm{perplexity}_s = \exp\Big(-\sum_k p_{s,k}\log p_{s,k}\Big), \qquad
        \mathrm{dead}_s = \frac{\#\{k : n_{s,k} = 0\}}{K}

    Perplexity is the "effective number of codes in use", from 1 (collapse onto one code) to ``K`` (uniform use);
    SoundStream/EnCodec/DAC report it to detect codebook collapse. The dead fraction counts codes with zero use in the
    accumulated window (so it depends on how much data was seen: compute it over a validation epoch, not a batch).
    A stage that saw nothing has perplexity 0.0 and dead fraction 1.0.

    Args:
        num_codebooks: ``n_q``, the number of quantizer stages.
        codebook_size: ``K``, the number of codes per stage.
        validate_args: check each update's code range (one host sync per update); without it an out-of-range code
            is an indexing error.

    - ``update(codes)``: ``[B, n_q, T]`` integer codes in ``[0, K)``.
    - ``compute()``: ``{"perplexity": [n_q], "dead_fraction": [n_q]}`` float32.

    State: ``histogram`` ``[n_q, K]`` int64, reduced with ``sum`` across ranks.
    """

    full_state_update: bool = False
    is_differentiable: bool = False
    higher_is_better: bool | None = None  # perplexity: higher; dead fraction: lower

    histogram: Tensor

    def __init__(self, num_codebooks: int, codebook_size: int, *, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_codebooks = num_codebooks = check_int("num_codebooks", num_codebooks, 1)
        self.codebook_size = codebook_size = check_int("codebook_size", codebook_size, 1)
        self.validate_args = bool(validate_args)
        self.add_state(
            "histogram", default=torch.zeros(num_codebooks, codebook_size, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, codes: Tensor) -> None:
        """Add the code counts of a batch ``[B, n_q, T]``."""
        self.histogram += codebook_histogram(codes, self.codebook_size, self.num_codebooks, validate=self.validate_args)

    def compute(self) -> dict[str, Tensor]:
        return {"perplexity": codebook_perplexity(self.histogram), "dead_fraction": dead_code_fraction(self.histogram)}
