"""The reference codec as a latent encoder: what ``LatentPairDataModule(encoder=CHECKPOINT)`` runs.

The data module only runs callables ``audio [B, 1, S] -> latents [B, D, T]``; turning a ``CodecModule`` checkpoint into
one is the codec's business, here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_stability._checks import check_int, check_path
from lightning_stability.nn.scale import normalize

__all__ = ["CodecLatentEncoder", "load_codec_encoder"]


class CodecLatentEncoder(nn.Module):
    """The continuous (pre-quantisation) latents of a ``CodecModule``, computed as its ``forward`` does:
    ``audio [B, 1, S]`` -> EnCodec scale normalisation (``x / rms(x)``, when the codec has ``normalize_scale``) ->
    zero-pad to a multiple of the hop -> ``codec.encoder`` -> ``[B, 128, ceil(S / hop)]``."""

    def __init__(self, codec: nn.Module) -> None:
        super().__init__()
        encoder = getattr(codec, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"`codec` must be a CodecModule (a module with an `encoder` nn.Module to compute latents with), "
                f"got {type(codec).__name__}"
            )
        self.encoder = encoder
        hparams = getattr(codec, "hparams", {})
        self.normalize_scale = bool(hparams.get("normalize_scale", False))
        self.hop = int(getattr(codec, "hop_length", 1))

    def forward(self, audio: Tensor) -> Tensor:
        if self.normalize_scale:
            audio, _ = normalize(audio)
        extra = (-audio.shape[-1]) % self.hop
        if extra:
            audio = torch.nn.functional.pad(audio, (0, extra))
        return self.encoder(audio)


def load_codec_encoder(path: str | Path, *, sample_rate: int | None = None) -> CodecLatentEncoder:
    """The :class:`CodecLatentEncoder` of the ``CodecModule`` checkpoint at ``path`` (loaded on the CPU).

    Raises:
        ValueError: ``sample_rate`` is given and differs from the codec's.
    """
    from lightning_stability.reference.codec.module import CodecModule

    check_path("path", path)
    check_int("sample_rate", sample_rate, 1, allow_none=True)
    codec = CodecModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    rate = getattr(codec, "sample_rate", None)
    if sample_rate is not None and rate is not None and int(rate) != sample_rate:
        raise ValueError(f"the codec checkpoint {str(path)!r} works at {rate} Hz but `sample_rate`={sample_rate}")
    return CodecLatentEncoder(codec)
