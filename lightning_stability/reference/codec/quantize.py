"""Residual vector quantization (RVQ) as in SoundStream / EnCodec, with DAC's factorised codebooks as an option.

References: Zeghidour et al. 2021 (SoundStream, arXiv:2107.03312), Défossez et al. 2022 (EnCodec,
arXiv:2210.13438; ``audiocraft/quantization/core_vq.py``), Kumar et al. 2023 (DAC, arXiv:2306.06546;
``dac/nn/quantize.py``), van den Oord et al. 2017 (VQ-VAE, EMA codebooks).

Per stage ``i`` with residual ``r_i`` (``r_1 = x``) and nearest code ``q_i``::

    codebook loss   L_cb_i  = mse(q_i, sg(r_i))        # moves the codebook (zero gradient with EMA codebooks)
    commitment loss L_cm_i  = mse(r_i, sg(q_i))        # moves the encoder
    straight-through  x_1   = r_1 + sg(q_1 - r_1)      # per stage; for i > 1 the input is sg(r_i):
                      x_i   = sg(r_i) + sg(q_i - r_i)  #   (value q_i, see below)
    next residual   r_{i+1} = r_i - sg(x_i)            # detached (encodec issue #25): L_cm_{i+1} reaches the encoder
    quantized               = sum_i x_i                # value sum_i q_i; d quantized / d x = identity
    losses                  = mean over the stages used

With the residual detached, ``d r_i / d x = I`` for every stage, so a plain per-stage straight-through would hand the
encoder ``n_q`` copies of the decoder's gradient. Taking the straight-through path of stages ``i > 1`` from ``sg(r_i)``
passes it exactly once (audiocraft's ``x + sg(sum_i q_i - x)``), while each stage's projections (below) still receive
the decoder's gradient through their own straight-through, and each stage's commitment loss still reaches the encoder.

``sg`` is stop-gradient. Distances are computed in fp32 even under autocast (an ``autocast(enabled=False)`` island).

Options (all per :class:`ResidualVectorQuantizer`):

- ``ema=True``: codebooks are buffers updated by exponential moving averages of cluster counts ``N`` and sums ``S``
  (decay 0.99) with Laplace smoothing ``N_k <- (N_k + eps) / (sum N + K eps) * sum N`` and ``e_k = S_k / N_k``.
  **A batch whose counts or sums are not finite is refused** (the EMA keeps its previous value, chosen on the device
  with ``torch.where``, no host sync): one NaN batch cannot poison the codebook (issue 10, defence in depth).
  ``ema=False``: codebooks are parameters learned through the codebook loss.
- ``kmeans_init``: the codebook is initialised by k-means on the first training batch's residuals (a batch with
  non-finite values is not used; the next one is).
- Dead codes (in training, finite batches only; counts are tracked for learned codebooks too): every
  ``dead_code_check_every`` steps, codes whose EMA count ``N_k`` is below a threshold are replaced by vectors drawn
  from the current batch. With ``dead_code_usage_ratio`` (default 0.1, Moshi's rule) the threshold is that fraction
  of the count a code would have under uniform use, ``ratio * sum_k N_k / K``, so it does not depend on the batch size
  (EnCodec's absolute ``threshold_ema_dead_code = 2`` assumes batches of thousands of frames: at 8 x 37 frames every
  code sits below it and the codebook is recycled every step); ``dead_code_usage_ratio=None`` uses the absolute
  ``threshold_ema_dead_code``. A replaced code starts with the uniform share ``sum_k N_k / K`` of the counts (the
  absolute threshold with the absolute rule), so it has about ``ln(1 / ratio) / (1 - decay)`` steps (230 at the
  defaults) to be chosen before it can expire again. Its EMA sum is written together with its count
  (``S_k = N_k * e_k``), so the next EMA update keeps the new vector instead of overwriting it with the old
  ``S_k / N_k`` (the audiocraft/EnCodec bug, encodec issue #61: the replacement there is undone in the same forward).
  The decision is taken on the device (``torch.where``, no host sync).
- ``quantizer_dropout``: probability that a training batch uses only the first ``n ~ U{1..n_q}`` stages (bitrate
  scalability as SoundStream/DAC). The draw comes from a seeded counter, so every DDP rank draws the same ``n``.
- ``codebook_dim``: DAC's factorised lookup: project ``r_i`` with a weight-normalised 1x1 convolution to
  ``codebook_dim`` (e.g. 8) dimensions, ``z_i = in_proj(r_i)``, look up there, and project the code back,
  ``x_i = out_proj(z_i + sg(q_i - z_i))``. With ``l2_normalize`` the lookup compares L2-normalised vectors (cosine
  similarity); losses are computed in the low-dimensional space as in DAC.

Distributed (plain ``torch.distributed``, no lightning): when a process group is initialised, the EMA statistics are
summed over ranks before the update, and codebook tensors are broadcast from rank 0 after k-means initialisation and
after dead-code replacement, so every rank keeps identical codebooks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_stability._checks import check_bool, check_int, check_interval, check_number, check_positive
from lightning_stability.reference.codec.seanet import _Conv1d

__all__ = ["QuantizedResult", "ResidualVectorQuantizer", "VectorQuantizer"]


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Copy rank 0's values into ``tensors`` on every rank (no-op without a process group)."""
    if not _dist_active():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed % (2**63))


def _sample_vectors(samples: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """``num`` rows of ``samples`` (without replacement when there are enough rows), drawn from ``seed``."""
    n = samples.shape[0]
    g = _generator(seed, samples.device)
    if n >= num:
        idx = torch.randperm(n, device=samples.device, generator=g)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device, generator=g)
    return samples[idx]


def _kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means on ``samples [N, D]`` (fp32) -> ``(centroids [K, D], counts [K])``; empty clusters keep seeds."""
    means = _sample_vectors(samples, num_clusters, seed)
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in range(num_iters):
        assign = torch.cdist(samples, means).argmin(dim=-1)
        counts = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
    return means, counts


@dataclass
class QuantizedResult:
    """What :class:`ResidualVectorQuantizer` returns.

    Attributes:
        quantized: ``[B, D, T]`` sum of the straight-through quantized stages (same dtype as the input).
        codes: ``[B, n_q_used, T]`` int64 code indices, stage-major.
        codebook_loss: scalar, mean over stages used of ``mse(q_i, sg(r_i))``.
        commitment_loss: scalar, mean over stages used of ``mse(r_i, sg(q_i))``.
        stage_codebook_losses: ``[n_q_used]`` the per-stage codebook losses.
        stage_commitment_losses: ``[n_q_used]`` the per-stage commitment losses (each with its own gradient).
        n_q: number of stages used (smaller than the quantizer's ``n_q`` under quantizer dropout).
        metrics: detached ``[n_q_used]`` tensors: ``perplexity`` (``exp`` of the entropy of the batch's code
            histogram, at most ``codebook_size``), ``usage`` (fraction of codes used in the batch),
            ``dead_fraction`` (fraction of codes whose EMA count is below the dead-code threshold), ``entropy``
            (entropy of the EMA counts divided by ``log(codebook_size)``: 1 for uniform use, Moshi's
            ``rvq_entropy``) and ``expired`` (fraction of codes replaced in this forward; 0 between checks).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    stage_codebook_losses: torch.Tensor
    stage_commitment_losses: torch.Tensor
    n_q: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def penalty(self, codebook_weight: float = 1.0, commitment_weight: float = 0.25) -> torch.Tensor:
        """``codebook_weight * codebook_loss + commitment_weight * commitment_loss`` (DAC's 1 and 0.25)."""
        return codebook_weight * self.codebook_loss + commitment_weight * self.commitment_loss


def _check_codebook_args(
    *,
    dim: Any,
    codebook_size: Any,
    codebook_dim: Any,
    l2_normalize: Any,
    ema: Any,
    decay: Any,
    epsilon: Any,
    kmeans_init: Any,
    kmeans_iters: Any,
    threshold_ema_dead_code: Any,
    dead_code_usage_ratio: Any,
    dead_code_check_every: Any,
) -> None:
    """The arguments :class:`VectorQuantizer` and :class:`ResidualVectorQuantizer` share (one contract)."""
    check_int("dim", dim, 1)
    check_int("codebook_size", codebook_size, 2)
    check_int("codebook_dim", codebook_dim, 1, allow_none=True)
    check_bool("l2_normalize", l2_normalize)
    check_bool("ema", ema)
    check_interval("decay", decay, 0, 1, low_open=True, high_open=True)
    check_positive("epsilon", epsilon)
    check_bool("kmeans_init", kmeans_init)
    check_int("kmeans_iters", kmeans_iters, 1)
    check_number("threshold_ema_dead_code", threshold_ema_dead_code, minimum=0)
    check_interval("dead_code_usage_ratio", dead_code_usage_ratio, 0, 1, high_open=True, allow_none=True)
    check_int("dead_code_check_every", dead_code_check_every, 1)


class VectorQuantizer(nn.Module):
    """One stage: nearest-neighbour lookup in a codebook of ``codebook_size`` vectors (see the module docstring).

    ``forward(r [B, D, T]) -> (x_st [B, D, T], codes [B, T], codebook_loss, commitment_loss, stats)``; used by
    :class:`ResidualVectorQuantizer`, which is the public entry point.
    """

    def __init__(
        self,
        dim: int,
        *,
        codebook_size: int = 1024,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
        ema: bool = True,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        dead_code_usage_ratio: float | None = 0.1,
        dead_code_check_every: int = 5,
    ) -> None:
        super().__init__()
        _check_codebook_args(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            l2_normalize=l2_normalize,
            ema=ema,
            decay=decay,
            epsilon=epsilon,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            dead_code_usage_ratio=dead_code_usage_ratio,
            dead_code_check_every=dead_code_check_every,
        )
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        self.l2_normalize = l2_normalize
        self.ema = ema
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.dead_code_usage_ratio = dead_code_usage_ratio
        self.dead_code_check_every = dead_code_check_every
        if self.codebook_dim != dim:
            self.in_proj: nn.Module = _Conv1d(dim, self.codebook_dim, 1)  # weight-normalised 1x1 convolutions
            self.out_proj: nn.Module = _Conv1d(self.codebook_dim, dim, 1)
        else:
            self.in_proj = nn.Identity()
            self.out_proj = nn.Identity()
        init = torch.zeros if kmeans_init else torch.randn
        embed = init(codebook_size, self.codebook_dim)
        if not kmeans_init and not ema:
            nn.init.kaiming_uniform_(embed)
        if ema:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.full((codebook_size,), 0.0 if kmeans_init else 1.0))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._known_initialized = False  # host-side cache of `initialized` (avoids a sync per step once it is True)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _codebook_tensors(self) -> list[torch.Tensor]:
        tensors = [self.embed, self.cluster_size, self.initialized]
        if self.ema:
            tensors.append(self.embed_avg)
        return tensors

    def _lookup_space(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1) if self.l2_normalize else v

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Code indices ``[N]`` of the nearest codebook rows to ``flat [N, Dc]``, computed in fp32."""
        with torch.autocast(flat.device.type, enabled=False):
            x = self._lookup_space(flat.detach().float())
            embed = self._lookup_space(self.embed.detach().float())
            if self.l2_normalize:  # cosine similarity
                return (x @ embed.t()).argmax(dim=-1)
            dist_ = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None, :]
            return dist_.argmin(dim=-1)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor, seed: int) -> None:
        """k-means initialisation from this batch (skipped, to retry next batch, when the batch is not finite)."""
        samples = self._lookup_space(flat.detach().float())
        if not bool(torch.isfinite(samples).all()):
            return
        means, counts = _kmeans(samples, self.codebook_size, self.kmeans_iters, seed)
        self.embed.data.copy_(means)
        # EnCodec keeps the k-means counts as the initial EMA counts; a floor (the absolute threshold, or with the
        # relative rule the uniform share a replaced code gets) leaves the codes that k-means could not seed some
        # steps to be used before they are replaced.
        uniform_share = counts.sum() / self.codebook_size
        floor = self.threshold_ema_dead_code if self.dead_code_usage_ratio is None else uniform_share
        self.cluster_size.data.copy_(counts.clamp(min=floor))
        if self.ema:
            self.embed_avg.data.copy_(means * self.cluster_size[:, None])
        self.initialized.fill_(True)
        _broadcast(self._codebook_tensors())

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA of counts (and, with ``ema``, sums and the codebook); refuses non-finite statistics on the device."""
        x = flat.detach().float()
        counts = torch.bincount(codes, minlength=self.codebook_size).to(x.dtype)
        sums = torch.zeros(self.codebook_size, self.codebook_dim, device=x.device).index_add_(0, codes, x)
        if _dist_active():
            packed = _all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
            counts, sums = packed[:, 0], packed[:, 1:]
        ok = torch.isfinite(counts).all() & torch.isfinite(sums).all() & self.initialized
        d = self.decay
        new_size = torch.where(ok, self.cluster_size * d + counts * (1 - d), self.cluster_size)
        self.cluster_size.copy_(new_size)
        if not self.ema:
            return
        new_avg = torch.where(ok, self.embed_avg * d + sums * (1 - d), self.embed_avg)
        self.embed_avg.copy_(new_avg)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.embed.copy_(torch.where(ok, self.embed_avg / smoothed.clamp(min=self.epsilon)[:, None], self.embed))

    def _dead_threshold(self) -> torch.Tensor | float:
        """The EMA count under which a code is dead: a fraction of uniform use, or the absolute threshold."""
        if self.dead_code_usage_ratio is None:
            return self.threshold_ema_dead_code
        return self.dead_code_usage_ratio * self.cluster_size.sum() / self.codebook_size

    def _replaces_dead_codes(self) -> bool:
        if self.dead_code_usage_ratio is None:
            return self.threshold_ema_dead_code > 0
        return self.dead_code_usage_ratio > 0

    @torch.no_grad()
    def _replace_dead_codes(self, flat: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """Replace the dead codes by vectors of this batch every ``dead_code_check_every`` steps; returns the fraction
        of codes replaced (a 0-dim tensor, 0 on steps without a check).

        Taken on the device with ``torch.where`` (no host sync); the decision is the same on every rank (the counts are
        identical), and the drawn vectors are broadcast from rank 0. A non-finite batch replaces nothing.
        """
        zero = flat.new_zeros((), dtype=torch.float32)
        if not self._replaces_dead_codes() or (step + 1) % self.dead_code_check_every:
            return zero
        x = flat.detach().float()
        dead = (self.cluster_size < self._dead_threshold()) & torch.isfinite(x).all() & self.initialized
        candidates = _sample_vectors(x, self.codebook_size, seed)
        if self.dead_code_usage_ratio is None:
            fresh = torch.full_like(self.cluster_size, self.threshold_ema_dead_code)
        else:
            fresh = (self.cluster_size.sum() / self.codebook_size).expand_as(self.cluster_size)
        self.embed.data.copy_(torch.where(dead[:, None], candidates, self.embed.data))
        self.cluster_size.copy_(torch.where(dead, fresh, self.cluster_size))
        if self.ema:  # the sum and the count together, so the next EMA update keeps the new vector (encodec #61)
            self.embed_avg.copy_(torch.where(dead[:, None], candidates * self.cluster_size[:, None], self.embed_avg))
        _broadcast(self._codebook_tensors())
        return dead.float().mean()

    # -- forward ---------------------------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, T] -> [B, D, T]`` (the codebook vectors, projected back with ``out_proj``)."""
        q = F.embedding(codes, self.embed).transpose(1, 2)  # B, Dc, T
        return self.out_proj(q)

    def forward(self, r: torch.Tensor, detach_straight_through: bool = False, seed: int = 0, step: int = 0):
        """Quantize ``r [B, D, T]``; ``detach_straight_through`` takes the straight-through path from ``sg(r)``.

        ``seed`` seeds the random draws of this call (k-means seeds, dead-code replacements), so they do not touch
        the global RNG and a resumed run draws what an uninterrupted one would; ``step`` (the training-forward count)
        schedules the dead-code checks.
        """
        B, D, T = r.shape
        z = self.in_proj(r)  # B, Dc, T
        flat = z.transpose(1, 2).reshape(B * T, self.codebook_dim)
        if self.training and not self._known_initialized:
            if not bool(self.initialized):
                self._init_from(flat, seed)
            self._known_initialized = bool(self.initialized)
        codes = self._nearest(flat)  # B*T
        q = F.embedding(codes, self.embed).view(B, T, self.codebook_dim).transpose(1, 2).to(z.dtype)  # B, Dc, T
        codebook_loss = F.mse_loss(q, z.detach())
        commitment_loss = F.mse_loss(z, q.detach())
        z_src = z
        if detach_straight_through:
            z_src = z.detach() if isinstance(self.in_proj, nn.Identity) else self.in_proj(r.detach())
        z_st = z_src + (q - z_src).detach()  # straight-through
        expired = z.new_zeros((), dtype=torch.float32)
        if self.training:
            self._update_statistics(flat, codes)
            expired = self._replace_dead_codes(flat, seed + 1, step)
        counts = torch.bincount(codes.detach(), minlength=self.codebook_size).float()
        probs = counts / counts.sum().clamp(min=1)
        entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
        usage = self.cluster_size.float()
        p_ema = usage / usage.sum().clamp(min=1e-12)
        ema_entropy = -(p_ema * torch.log(p_ema.clamp(min=1e-12))).sum()
        stats = {
            "perplexity": entropy.exp(),
            "usage": (counts > 0).float().mean(),
            "dead_fraction": (self.cluster_size < self._dead_threshold()).float().mean(),
            "entropy": ema_entropy / math.log(self.codebook_size),
            "expired": expired,
        }
        return self.out_proj(z_st), codes.view(B, T), codebook_loss, commitment_loss, stats


class ResidualVectorQuantizer(nn.Module):
    """``n_q`` stages of :class:`VectorQuantizer` on successive residuals (see the module docstring for the maths).

    ``forward(x [B, dim, T]) -> QuantizedResult``; ``encode(x) -> codes [B, n_q, T]``;
    ``decode(codes [B, n, T]) -> [B, dim, T]`` (any ``n <= n_q`` leading stages).

    Args:
        dim: input dimension (the encoder's latent dimension).
        n_q: number of stages (EnCodec 24 kHz: 8 stages x 1024 codes at 75 Hz = 6 kbps).
        codebook_size: codes per stage.
        codebook_dim: ``None`` (lookup in ``dim``) or DAC's factorised low dimension (e.g. 8).
        l2_normalize: cosine lookup on L2-normalised vectors (DAC; meaningful with ``codebook_dim``).
        ema: EMA codebooks (EnCodec) instead of learned ones (DAC).
        decay, epsilon: EMA decay and Laplace smoothing.
        kmeans_init, kmeans_iters: k-means initialisation on the first training batch.
        threshold_ema_dead_code: absolute dead-code threshold in EMA counts (EnCodec: 2; 0 disables replacement),
            used when ``dead_code_usage_ratio`` is ``None``.
        dead_code_usage_ratio: dead-code threshold as a fraction of uniform usage (Moshi: 0.1; 0 disables
            replacement); ``None`` uses ``threshold_ema_dead_code``.
        dead_code_check_every: steps between dead-code checks (Moshi: 5).
        quantizer_dropout: probability that a training batch uses a random number of stages ``U{1..n_q}``.
        seed: seed of the quantizer-dropout draws, k-means seeds and dead-code replacements (combined with the
            ``num_updates`` counter, a buffer: the same on every rank, and a resumed run continues the sequence).
    """

    def __init__(
        self,
        dim: int = 128,
        *,
        n_q: int = 8,
        codebook_size: int = 1024,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
        ema: bool = True,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        dead_code_usage_ratio: float | None = 0.1,
        dead_code_check_every: int = 5,
        quantizer_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("n_q", n_q, 1)
        _check_codebook_args(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            l2_normalize=l2_normalize,
            ema=ema,
            decay=decay,
            epsilon=epsilon,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            dead_code_usage_ratio=dead_code_usage_ratio,
            dead_code_check_every=dead_code_check_every,
        )
        check_interval("quantizer_dropout", quantizer_dropout, 0, 1)
        check_int("seed", seed)
        self.dim = dim
        self.n_q = n_q
        self.codebook_size = codebook_size
        self.quantizer_dropout = quantizer_dropout
        self.seed = seed
        self.layers = nn.ModuleList(
            VectorQuantizer(
                dim,
                codebook_size=codebook_size,
                codebook_dim=codebook_dim,
                l2_normalize=l2_normalize,
                ema=ema,
                decay=decay,
                epsilon=epsilon,
                kmeans_init=kmeans_init,
                kmeans_iters=kmeans_iters,
                threshold_ema_dead_code=threshold_ema_dead_code,
                dead_code_usage_ratio=dead_code_usage_ratio,
                dead_code_check_every=dead_code_check_every,
            )
            for _ in range(n_q)
        )
        # Number of training forwards so far: drives the quantizer-dropout draws, so a resumed run draws the same.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def bits_per_frame(self) -> float:
        """``n_q * log2(codebook_size)``; times the frame rate this is the bitrate."""
        return self.n_q * math.log2(self.codebook_size)

    def _draw_n_q(self) -> int:
        step = int(self.num_updates)  # one small sync on an accelerator (the draw happens on the host)
        rng = random.Random(self.seed * 1_000_003 + step)
        if rng.random() < self.quantizer_dropout:
            return rng.randint(1, self.n_q)
        return self.n_q

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> QuantizedResult:
        """Quantize ``x [B, dim, T]`` with ``n_q`` stages (default: all, or a random number under dropout)."""
        if x.dim() != 3 or x.shape[1] != self.dim:
            raise ValueError(f"ResidualVectorQuantizer expects [B, {self.dim}, T], got {tuple(x.shape)}")
        if n_q is None:
            n_q = self._draw_n_q() if self.training and self.quantizer_dropout > 0 else self.n_q
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"`n_q` must be in [1, {self.n_q}], got {n_q!r}")
        step = int(self.num_updates) if self.training else 0  # host copy: seeds this step's random draws
        if self.training:
            self.num_updates += 1
        residual = x
        quantized = torch.zeros_like(x)
        codes, cb_losses, cm_losses, stats = [], [], [], []
        for i, layer in enumerate(self.layers[:n_q]):
            seed = (self.seed * 1_000_003 + step) * 1_009 + 2 * i
            q, c, cb, cm, s = layer(residual, detach_straight_through=i > 0, seed=seed, step=step)
            residual = residual - q.detach()  # detached residual: later commitment losses reach the encoder
            quantized = quantized + q
            codes.append(c)
            cb_losses.append(cb)
            cm_losses.append(cm)
            stats.append(s)
        stage_cb = torch.stack(cb_losses)
        stage_cm = torch.stack(cm_losses)
        codebook_loss = stage_cb.mean()
        if self.training and n_q < self.n_q:
            # Keep the dropped stages' parameters in the graph (zero gradient) so DDP sees every parameter used.
            unused = [p for layer in self.layers[n_q:] for p in layer.parameters() if p.requires_grad]
            if unused:
                codebook_loss = codebook_loss + 0.0 * sum(p.sum() for p in unused)
        metrics = {k: torch.stack([s[k] for s in stats]).detach() for k in stats[0]}
        return QuantizedResult(
            quantized=quantized,
            codes=torch.stack(codes, dim=1),
            codebook_loss=codebook_loss,
            commitment_loss=stage_cm.mean(),
            stage_codebook_losses=stage_cb,
            stage_commitment_losses=stage_cm,
            n_q=n_q,
            metrics=metrics,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Codes ``[B, n_q, T]`` of ``x [B, dim, T]`` (no statistics are updated)."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(x, n_q=n_q).codes
        finally:
            self.train(was_training)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, n, T]`` (``n <= n_q``) -> quantized latents ``[B, dim, T]``."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(f"`codes` must have shape [B, n, T] with 1 <= n <= {self.n_q}, got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(
                f"`codes` must be in [0, {self.codebook_size}), got values in [{int(codes.min())}, {int(codes.max())}]"
            )
        out = None
        for i in range(codes.shape[1]):
            q = self.layers[i].decode(codes[:, i])
            out = q if out is None else out + q
        return out
