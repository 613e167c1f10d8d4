"""Test helper shared by the scale / spectral-norm tests."""

from __future__ import annotations

import pytest
import torch


class NoHostReads:
    """Makes every tensor-to-host read raise while active (the reads that would synchronise a GPU).

    Uses its own ``pytest.MonkeyPatch`` so leaving the block does not undo the test's other patches.
    """

    NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __enter__(self) -> NoHostReads:
        def forbidden(*args, **kwargs):
            raise AssertionError("host read of a tensor in the per-step path")

        self.patch = pytest.MonkeyPatch()
        for name in self.NAMES:
            self.patch.setattr(torch.Tensor, name, forbidden)
        return self

    def __exit__(self, *exc) -> None:
        self.patch.undo()
