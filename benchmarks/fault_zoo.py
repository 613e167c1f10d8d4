"""Fault zoo: every spike guard on five small model families, ten fault kinds and seven kinds of healthy run.

The big brother of ``benchmarks/peers.py``: the same methods (its ``METHODS``: each peer from its own package, as its
authors ship it), the same run (``peers.run_one``: seeded, ``rescue.Probe``'s fixed held-out batch in eval mode, mean
over the last ``eval_tail`` steps, host reads counted the peers' way), on models and faults the guard was not built
around.

Families (tiny CPU models, a few ms per step; each a LightningModule below, data synthesised per batch from a seed):

- ``conv_ae``: a 1-D conv autoencoder on sums of sinusoids with random amplitudes plus noise; L1 + 0.1 x an STFT
  magnitude loss; Adam 2e-3, batch 8 x 512 samples;
- ``transformer``: 2 pre-LN transformer layers (width 32, causal) doing next-step regression on multi-channel
  sinusoid sequences; ``precision="bf16-mixed"``, AdamW 1e-3;
- ``gan``: a manual-optimization GAN codec: conv generator (an autoencoder with BatchNorm) and conv discriminator,
  hinge loss + feature matching + L1/STFT reconstruction, two Adams (2e-3 each); two optimizer steps per batch;
- ``deep_attn``: 16 pre-LN attention blocks of width 16, BatchNorm after the input projection, batch 4, regressing a
  fixed random teacher; Adam 1e-3;
- ``gru`` (held out: the guard's defaults were not tuned on it): a GRU regressing a leaky integral of its input;
  Adam 3e-3.

Fault kinds (applied by the module, or the ``InfGradInjector`` callback, at ``event_step``; ``way="clean"`` builds
the same run without the fault, the fault's reference):

- ``nan_batch``: the input batch is NaN; ``inf_grad``: after backward, one gradient element is set to inf;
- ``loss_x10`` / ``loss_x100`` / ``loss_x1000``: that step's loss multiplied (a corrupted batch);
- ``wrong_scale``: one batch read as raw int16 (the input, and the target where it is the signal, x3000);
- ``disc_blowup`` (gan only): the discriminator loss x1000 for one step;
- ``nan_microbatch`` (automatic optimization only): ``accumulate_grad_batches=4`` for the whole run, one of the four
  micro-batches of the fault step is NaN (its reference is the same accumulation without the NaN);
- ``overflow``: an activation multiplied by 1e38 (inside the bf16 autocast region for ``transformer``, fp32
  elsewhere), so the forward overflows to inf;
- ``slow_divergence``: from the onset (``event_step``) the learning rate grows 5 % per step. Lead time = the plain
  run's failure step (first non-finite training loss, or first held-out loss above 10x its value at the onset:
  ``peers.divergence_step``) minus a method's first warning (skip, clip, guard event of any kind, detection) at or
  after the onset.

Healthy kinds (must not be disturbed; ``event_step`` is the step of the change): ``clean``; ``warmup_end`` (a linear
lr warm-up over 150 steps, 60 % of the run at most, to 3x the family's lr); ``loss_switch`` (the loss weight x5 from
the step); ``curriculum`` (segment length x2 from the step; ``deep_attn``: batch size x2); ``disc_on`` (gan: the
discriminator and the adversarial terms switched on at the step); ``unfreeze`` (part of the model frozen until the
step); ``lr_restart`` (cosine schedule with a warm restart at the step).

Fault and change steps are drawn (seeded by family, kind and seed) in the middle third of the run.

``--traces OUT.json`` runs only ``plain`` on every selected case and seed and writes, per optimizer step and per
optimizer (gan: ``gen`` and ``disc``), the total gradient norm, the training loss as ``GradientGuard`` sees it in
``on_before_backward`` (summed over micro-batches), the learning rate, and the case's event step: the raw material for
tuning a spike rule.

Usage::

    python benchmarks/fault_zoo.py                  # full mode (estimate printed first)
    python benchmarks/fault_zoo.py --quick          # CI mode
    python benchmarks/fault_zoo.py --families conv_ae --cases loss_x100,clean --methods plain,guard --seeds 0
    python benchmarks/fault_zoo.py --traces /tmp/traces.json --families gan --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import lightning.pytorch as pl
import peers
import rescue
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

# ---------------------------------------------------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------------------------------------------------
FAULTS = (
    "nan_batch",
    "inf_grad",
    "loss_x10",
    "loss_x100",
    "loss_x1000",
    "wrong_scale",
    "disc_blowup",
    "nan_microbatch",
    "overflow",
    "slow_divergence",
)
HEALTHY = ("clean", "warmup_end", "loss_switch", "curriculum", "disc_on", "unfreeze", "lr_restart")
KINDS = FAULTS + HEALTHY
LOSS_FACTORS = {"loss_x10": 10.0, "loss_x100": 100.0, "loss_x1000": 1000.0}
WRONG_SCALE = 3000.0
OVERFLOW = 1e38
SWITCH_WEIGHT = 5.0
GROWTH = 1.05
WARMUP_STEPS = 150
WARMUP_PEAK = 3.0  # x the family's lr
ACCUMULATE = 4  # nan_microbatch


def kind_of(kind: str) -> str:
    return "divergence" if kind == "slow_divergence" else "failure" if kind in FAULTS else "healthy"


# ---------------------------------------------------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------------------------------------------------
def sinusoids(g: torch.Generator, batch: int, channels: int, length: int, rate: float = 16000.0) -> Tensor:
    """``[batch, channels, length]`` sums of 4 sinusoids (80-2000 Hz at ``rate``) with random amplitudes and phases,
    plus a little noise; RMS about 0.2."""
    t = torch.arange(length) / rate
    f = 80 + 1920 * torch.rand(batch, channels, 4, 1, generator=g)
    a = torch.rand(batch, channels, 4, 1, generator=g)
    phase = 6.283 * torch.rand(batch, channels, 4, 1, generator=g)
    x = (a * torch.sin(6.283 * f * t + phase)).sum(dim=2) / 4
    return x + 0.02 * torch.randn(batch, channels, length, generator=g)


def stft_mag(x: Tensor, n_fft: int = 128) -> Tensor:
    window = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x.reshape(-1, x.shape[-1]).float(), n_fft, n_fft // 4, window=window, return_complex=True)
    return spec.abs()


def recon_loss(y: Tensor, x: Tensor) -> Tensor:
    """L1 + 0.1 x the STFT magnitude L1."""
    return F.l1_loss(y, x) + 0.1 * F.l1_loss(stft_mag(y), stft_mag(x))


class ZooModule(pl.LightningModule):
    """What every family shares: the per-batch synthetic data, the fault and change of ``kind`` at ``event_step``, the
    learning-rate schedule, and the step numbering (``zoo_step``: the optimizer step of automatic optimization, the
    batch of the two-optimizer gan) that fault steps, change steps and traces use.

    ``inject=False`` is the fault's reference: the same run with nothing injected (healthy changes stay)."""

    family = ""
    lr = 1e-3
    batch_size = 8
    length = 512
    target_is_input = True  # wrong_scale scales the target too (it is the signal)
    precision: str | None = None
    steps_per_batch = 1

    def __init__(self, *, kind: str = "clean", event_step: int | None = None, steps: int = 250, seed: int = 0,
                 inject: bool = True, accumulate: int = 1, warmup: int = WARMUP_STEPS) -> None:  # fmt: skip
        super().__init__()
        self.kind, self.event_step, self.steps, self.seed = kind, event_step, steps, seed
        self.inject, self.accumulate, self.warmup = inject, accumulate, warmup
        self.zoo_step = 0
        self.micro = 0
        self._overflow = False
        self._unfrozen = False
        torch.manual_seed(seed)
        self.build()
        if kind == "unfreeze":
            self.frozen_part().requires_grad_(False)

    # -- per family ------------------------------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def generate(self, g: torch.Generator, batch: int, length: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def task_loss(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def frozen_part(self) -> nn.Module:
        raise NotImplementedError

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr)

    # -- faults and changes ----------------------------------------------------------------------------------------
    def fault_now(self, kind: str) -> bool:
        return self.inject and self.kind == kind and self.zoo_step == self.event_step

    def changed(self) -> bool:
        return self.event_step is not None and self.zoo_step >= self.event_step

    def poke(self, h: Tensor) -> Tensor:
        """An activation on the overflow fault's path: x1e38 at the fault step."""
        return h * OVERFLOW if self._overflow else h

    def shape_now(self) -> tuple[int, int]:
        """(batch, length) of the next micro-batch: under accumulation the batch is split, so a step costs about the
        same; ``curriculum`` doubles the length from its step."""
        batch = max(self.batch_size // self.accumulate, 1)
        if self.kind == "curriculum" and self.changed():
            return batch, 2 * self.length
        return batch, self.length

    def sample(self, index: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        batch, length = self.shape_now()
        x, y = self.generate(g, batch, length)
        if self.fault_now("nan_batch") or (self.fault_now("nan_microbatch") and self.micro == 1):
            x = torch.full_like(x, math.nan)
        if self.fault_now("wrong_scale"):
            x = x * WRONG_SCALE
            y = y * WRONG_SCALE if self.target_is_input else y
        return x.to(self.device), y.to(self.device)

    def eval_batch(self) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(10**9 + self.seed)
        return self.generate(g, 16, self.length)

    def loss_factor(self) -> float:
        f = LOSS_FACTORS.get(self.kind, 1.0) if self.fault_now(self.kind) else 1.0
        if self.kind == "loss_switch" and self.changed():
            f *= SWITCH_WEIGHT
        return f

    def lr_factor(self, step: int) -> float:
        e = self.event_step
        if self.kind == "warmup_end":
            return WARMUP_PEAK * min(1.0, (step + 1) / self.warmup)
        if self.kind == "lr_restart" and e:
            phase = step / e if step < e else (step - e) / max(self.steps - e, 1)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(phase, 1.0)))
        if self.kind == "slow_divergence" and self.inject and e is not None:
            return GROWTH ** max(step - e, 0)
        return 1.0

    def begin_step(self, batch_idx: int) -> None:
        self.zoo_step = self.global_step // self.steps_per_batch
        self.micro = batch_idx % self.accumulate
        if self.kind == "unfreeze" and self.changed() and not self._unfrozen:
            self.frozen_part().requires_grad_(True)
            self._unfrozen = True
        self._overflow = self.fault_now("overflow")

    # -- Lightning -------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self.begin_step(batch_idx)
        x, y = self.sample(batch_idx)
        loss = self.task_loss(x, y) * self.loss_factor()
        self._overflow = False
        return {"loss": loss}

    def eval_loss(self, batch) -> Tensor:
        x, y = batch
        return self.task_loss(x.to(self.device), y.to(self.device)).float()

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters(), self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        n = (self.steps + 10) * self.accumulate
        return DataLoader(range(n), batch_size=1, shuffle=False)  # the index only: data is synthesised per batch


class _ConvCodec(nn.Module):
    """``[B, 1, T] -> [B, 1, T]``: two strided convs down (x4), two transposed convs up."""

    def __init__(self, ch: int = 16, batchnorm: bool = False) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm1d(c)) if batchnorm else (lambda c: nn.Identity())
        self.encoder = nn.Sequential(
            nn.Conv1d(1, ch, 7, padding=3), nn.GELU(), nn.Conv1d(ch, ch, 4, stride=2, padding=1), norm(ch), nn.GELU(),
            nn.Conv1d(ch, 8, 4, stride=2, padding=1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(8, ch, 4, stride=2, padding=1), norm(ch), nn.GELU(),
            nn.ConvTranspose1d(ch, ch, 4, stride=2, padding=1), nn.GELU(), nn.Conv1d(ch, 1, 7, padding=3),
        )  # fmt: skip

    def forward(self, x: Tensor, poke: Callable[[Tensor], Tensor] = lambda h: h) -> Tensor:
        h = self.decoder[:3](self.encoder(x))
        return self.decoder[3:](poke(h))  # after the decoder's norm: a poked activation reaches the output


class ConvAE(ZooModule):
    family = "conv_ae"
    lr = 2e-3

    def build(self) -> None:
        self.net = _ConvCodec()

    def generate(self, g, batch, length):
        x = sinusoids(g, batch, 1, length)
        return x, x

    def task_loss(self, x, y):
        return recon_loss(self.net(x, self.poke), y)

    def frozen_part(self):
        return self.net.encoder


class Transformer(ZooModule):
    family = "transformer"
    lr = 1e-3
    batch_size = 8
    length = 32
    precision = "bf16-mixed"

    def build(self) -> None:
        self.inp = nn.Linear(4, 32)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True) for _ in range(2)
        )
        self.out = nn.Linear(32, 4)

    def generate(self, g, batch, length):
        seq = sinusoids(g, batch, 4, length + 1, rate=16000.0).transpose(1, 2)  # [B, T+1, 4]
        return seq[:, :-1], seq[:, 1:]

    def task_loss(self, x, y):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.inp(x)
        for i, layer in enumerate(self.layers):
            h = layer(h, src_mask=mask, is_causal=True)
            if i == 0:
                h = self.poke(h)
        return F.mse_loss(self.out(h).float(), y)

    def frozen_part(self):
        return self.layers[0]

    def make_optimizer(self, params, lr):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


class _PreLNBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = rescue._PlainAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: Tensor) -> Tensor:
        a = self.n1(h)
        h = h + self.attn(a)
        return h + self.mlp(self.n2(h))


def teacher(x: Tensor) -> Tensor:
    """A fixed random 2-layer network mixing neighbouring frames of ``[B, T, 8]`` (the same for every seed)."""
    task = torch.Generator().manual_seed(12345)
    w1 = torch.randn(8, 32, generator=task) / math.sqrt(8)
    w2 = torch.randn(32, 8, generator=task) / math.sqrt(32)
    return torch.tanh((x + 0.5 * torch.roll(x, 1, dims=1)) @ w1) @ w2


class DeepAttn(ZooModule):
    family = "deep_attn"
    lr = 1e-3
    batch_size = 4
    length = 16
    target_is_input = False
    depth = 16

    def build(self) -> None:
        self.inp = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.blocks = nn.ModuleList(_PreLNBlock(16, 2) for _ in range(self.depth))
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 8)

    def shape_now(self):
        batch, length = super().shape_now()
        return (2 * batch, length) if self.kind == "curriculum" and self.changed() else (batch, self.length)

    def generate(self, g, batch, length):
        x = torch.randn(batch, length, 8, generator=g)
        return x, teacher(x)

    def task_loss(self, x, y):
        h = self.bn(self.inp(x).transpose(1, 2)).transpose(1, 2)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.depth // 2:
                h = self.poke(h)
        return F.mse_loss(self.out(self.norm(h)), y)

    def frozen_part(self):
        return self.blocks[: self.depth // 2]


class GRUReg(ZooModule):
    family = "gru"
    lr = 3e-3
    batch_size = 8
    length = 48
    target_is_input = False

    def build(self) -> None:
        self.gru = nn.GRU(4, 32, batch_first=True)
        self.out = nn.Linear(32, 2)

    def generate(self, g, batch, length):
        x = torch.randn(batch, length, 4, generator=g)
        state, ys = torch.zeros(batch, 2), []
        for t in range(length):  # a leaky integral of two input mixes, squashed
            state = 0.9 * state + 0.3 * torch.stack((x[:, t, 0] - x[:, t, 1], x[:, t, 2] + 0.5 * x[:, t, 3]), 1)
            ys.append(torch.tanh(state))
        return x, torch.stack(ys, 1)

    def task_loss(self, x, y):
        h, _ = self.gru(x)
        return F.mse_loss(self.out(self.poke(h)), y)

    def frozen_part(self):
        return self.gru


class GanCodec(ZooModule):
    """Manual optimization: per batch a discriminator step (hinge) then a generator step (L1 + STFT reconstruction,
    adversarial hinge term, feature matching); ``zoo_step`` is the batch (two optimizer steps). Faults on the loss
    hit the generator loss; ``disc_blowup`` the discriminator's. ``hparams.gradient_clip_val`` (peers' ``clip``) is
    applied to both optimizers with ``clip_gradients``."""

    family = "gan"
    lr = 2e-3
    disc_lr = 2e-3
    steps_per_batch = 2

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.phase = "disc"

    def build(self) -> None:
        self.gen = _ConvCodec(batchnorm=True)
        self.disc = nn.ModuleList([
            nn.Sequential(nn.Conv1d(1, 16, 7, padding=3), nn.LeakyReLU(0.2)),
            nn.Sequential(nn.Conv1d(16, 16, 8, stride=4, padding=2), nn.LeakyReLU(0.2)),
            nn.Sequential(nn.Conv1d(16, 16, 8, stride=4, padding=2), nn.LeakyReLU(0.2)),
            nn.Conv1d(16, 1, 3, padding=1),
        ])  # fmt: skip

    def generate(self, g, batch, length):
        x = sinusoids(g, batch, 1, length)
        return x, x

    def discriminate(self, x: Tensor) -> list[Tensor]:
        feats = []
        for layer in self.disc:
            x = layer(x)
            feats.append(x)
        return feats

    def task_loss(self, x, y):  # the held-out loss: reconstruction only
        return recon_loss(self.gen(x), y)

    def frozen_part(self):
        return self.gen.encoder

    def adversarial_on(self) -> bool:
        return self.kind != "disc_on" or self.changed()

    def training_step(self, batch, batch_idx):
        self.begin_step(batch_idx)
        x, _ = self.sample(batch_idx)
        opt_g, opt_d = self.optimizers()
        clip = self.hparams.get("gradient_clip_val")
        adv = 1.0 if self.adversarial_on() else 0.0
        y = self.gen(x, self.poke)
        self._overflow = False

        self.phase = "disc"
        real, fake = self.discriminate(x)[-1], self.discriminate(y.detach())[-1]
        d_loss = adv * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        if self.fault_now("disc_blowup"):
            d_loss = d_loss * 1000.0
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        if clip:
            self.clip_gradients(opt_d, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_d.step()

        self.phase = "gen"
        feats_fake, feats_real = self.discriminate(y), [f.detach() for f in self.discriminate(x)]
        g_adv = -feats_fake[-1].mean()
        fm = sum(F.l1_loss(a, b) for a, b in zip(feats_fake[:-1], feats_real[:-1])) / (len(feats_fake) - 1)
        g_loss = (recon_loss(y, x) + adv * (0.1 * g_adv + fm)) * self.loss_factor()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        if clip:
            self.clip_gradients(opt_g, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_g.step()
        for sched in self.lr_schedulers():
            sched.step()
        return {"loss": g_loss.detach()}

    def configure_optimizers(self):
        opt_g = self.make_optimizer(self.gen.parameters(), self.lr)
        opt_d = self.make_optimizer(self.disc.parameters(), self.disc_lr)
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, self.lr_factor) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], scheds


FAMILIES: dict[str, type[ZooModule]] = {
    "conv_ae": ConvAE,
    "transformer": Transformer,
    "gan": GanCodec,
    "deep_attn": DeepAttn,
    "gru": GRUReg,
}
TUNED_FAMILIES = ("conv_ae", "transformer", "gan", "deep_attn")
HELD_OUT_FAMILIES = ("gru",)
OPTIMIZER_NAMES = {"gan": ("gen", "disc")}


def applies(family: str, kind: str) -> bool:
    if kind in ("disc_blowup", "disc_on"):
        return family == "gan"
    if kind == "nan_microbatch":
        return FAMILIES[family].steps_per_batch == 1  # automatic optimization only
    return True


# ---------------------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------------------
def event_step_for(family: str, kind: str, seed: int, steps: int, warmup: int) -> int | None:
    """The fault or change step: the warm-up's end for ``warmup_end``, none for ``clean``, else drawn (seeded by
    family, kind and seed) in the middle third of the run."""
    if kind == "clean":
        return None
    if kind == "warmup_end":
        return warmup
    rng = torch.Generator().manual_seed(zlib.crc32(f"{family}/{kind}/{seed}".encode()))
    lo, hi = steps // 3, (2 * steps) // 3
    return lo + int(torch.randint(hi - lo, (1,), generator=rng))


@dataclass
class ZooCase:
    family: str
    kind: str
    seed: int
    steps: int
    event_step: int | None
    held_out: bool
    warmup: int = WARMUP_STEPS
    accumulate: int = 1
    eval_batch: Any = field(default=None, repr=False)
    reference_only: bool = False  # a clean run kept only as the faults' reference

    @property
    def name(self) -> str:
        accum = f"_accum{self.accumulate}" if self.kind == "clean" and self.accumulate > 1 else ""
        return f"{self.family}.{self.kind}{accum}.s{self.seed}"

    @property
    def role(self) -> str:
        return "reference" if self.reference_only else kind_of(self.kind)

    @property
    def reference(self) -> str | None:
        """The clean run a fault is measured against (the same accumulation)."""
        if self.role not in ("failure", "divergence"):
            return None
        accum = f"_accum{self.accumulate}" if self.accumulate > 1 else ""
        return f"{self.family}.clean{accum}.s{self.seed}"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "kind": self.kind, "class": self.role, "seed": self.seed,
                "held_out": self.held_out, "steps": self.steps, "event_step": self.event_step,
                "accumulate_grad_batches": self.accumulate, "reference": self.reference}  # fmt: skip

    @property
    def steps_per_batch(self) -> int:
        return FAMILIES[self.family].steps_per_batch

    def build(self, way: str) -> ZooModule:
        cls = FAMILIES[self.family]
        return cls(kind=self.kind, event_step=self.event_step, steps=self.steps, seed=self.seed,
                   inject=way != "clean", accumulate=self.accumulate, warmup=self.warmup)  # fmt: skip

    def trainer_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if FAMILIES[self.family].precision:
            kw["precision"] = FAMILIES[self.family].precision
        if self.accumulate > 1:
            kw["accumulate_grad_batches"] = self.accumulate
        return kw

    def reference_key(self) -> tuple[str, int, int]:
        """Which clean run a fault is measured against: (family, seed, accumulation)."""
        return (self.family, self.seed, self.accumulate)


def make_case(family: str, kind: str, seed: int, steps: int, held_out_seeds: set[int], *, accumulate: int | None = None,
              reference_only: bool = False) -> ZooCase:  # fmt: skip
    warmup = min(WARMUP_STEPS, (3 * steps) // 5)
    accumulate = accumulate or (ACCUMULATE if kind == "nan_microbatch" else 1)
    case = ZooCase(family, kind, seed, steps, event_step_for(family, kind, seed, steps, warmup),
                   held_out=family in HELD_OUT_FAMILIES or seed in held_out_seeds, warmup=warmup,
                   accumulate=accumulate, reference_only=reference_only)  # fmt: skip
    case.eval_batch = FAMILIES[family](steps=steps, seed=seed).eval_batch()
    return case


# ---------------------------------------------------------------------------------------------------------------------
# callbacks: fault injection, per-step records, traces
# ---------------------------------------------------------------------------------------------------------------------
class InfGradInjector(Callback):
    """``inf_grad``: after the backward of the fault step (gan: the generator's), one gradient element is set to inf.
    First in the callback list, so every method sees the fault."""

    def on_after_backward(self, trainer, pl_module) -> None:
        if not pl_module.fault_now("inf_grad") or getattr(pl_module, "phase", "gen") != "gen":
            return
        for p in pl_module.parameters():
            if p.grad is not None:
                with torch.no_grad():
                    p.grad.view(-1)[0] = math.inf
                return


class ZooProbe(peers.MeasuringProbe):
    """``peers.MeasuringProbe`` once per optimizer step: under gradient accumulation, at the last micro-batch only (a
    NaN micro-batch poisons BatchNorm buffers mid-step; a guard restores them before the step ends)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.micro == pl_module.accumulate - 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class TrainLoss(Callback):
    """The training loss of every batch (its host read is not counted as the method's)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.micro != pl_module.accumulate - 1:
            return
        with peers.READS.pause():
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss.detach()) if loss is not None else math.nan)


class TraceRecorder(Callback):
    """Per optimizer step and optimizer: the total gradient norm (what the optimizer is about to apply, after every
    earlier callback), the loss as ``on_before_backward`` sees it summed over the step's micro-batches, the lr."""

    def __init__(self, names: tuple[str, ...] = ("opt",)) -> None:
        self.names = names
        self.traces = {n: {"step": [], "grad_norm": [], "loss": [], "lr": []} for n in names}
        self._loss = 0.0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._loss += float(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        index = next(i for i, o in enumerate(trainer.optimizers) if o is getattr(optimizer, "optimizer", optimizer))
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms = [g.detach().float().norm() for g in grads]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        t = self.traces[self.names[index]]
        t["step"].append(pl_module.zoo_step)
        t["grad_norm"].append(norm)
        t["loss"].append(self._loss)
        t["lr"].append(float(optimizer.param_groups[0]["lr"]))
        self._loss = 0.0


def peer_case(case: ZooCase, extra: Callable[[str], list[Callback]]) -> peers.PeerCase:
    steps = case.steps * case.steps_per_batch
    return peers.PeerCase(case.name, kind_of(case.kind), "", steps, case.build, extra, case.eval_batch,
                          fault_step=case.event_step, trainer_kwargs=case.trainer_kwargs())  # fmt: skip


def run_traces(cases: list[ZooCase]) -> list[dict[str, Any]]:
    out = []
    plain = peers.METHODS[0]
    for case in cases:
        names = OPTIMIZER_NAMES.get(case.family, ("opt",))
        recorder = TraceRecorder(names)
        pc = peer_case(case, lambda way, r=recorder: [InfGradInjector(), r])
        t0 = time.perf_counter()
        with peers.READS:
            run = peers.run_one(pc, plain, tail=10, eval_every=10, probe_cls=ZooProbe)
        out.append({**case.record(), "finished_finite": run["finished_finite"],
                    "final_eval_loss": run["final_eval_loss"], "traces": recorder.traces})  # fmt: skip
        print(f"[fault_zoo traces] {case.name}: event {case.event_step}, {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------------------
#: the guard configurations measured, name -> ``GradientGuard`` keyword arguments; ``--guard-kwargs`` adds
#: ``guard_custom``. ``guard`` is whatever the installed default is: that is what a user gets.
GUARD_CONFIGS: dict[str, dict[str, Any]] = {
    "guard": {},
    "guard_legacy": {"spike_ratio": None},  # the earlier default: non-finite steps only
    "guard_zr": {"zscore": 2.5, "zscore_min_ratio": 3.0},  # the peers benchmark's recommendation
}
#: the constant norm clipping each peer applies on top of its own rule (``clip``: ``gradient_clip_val``; ZClip: its
#: default ``max_grad_norm``): the steps where the norm exceeds it count as clipped
CONSTANT_CLIP = {"clip": 1.0, "zclip": 1.0, "zclip_skip": 1.0}


class NormWatch(Callback):
    """Steps whose total gradient norm (before the method clips) exceeds ``threshold``: the steps a constant clip acts
    on. Automatic optimization: at ``on_before_optimizer_step`` (before Lightning's clipping, and first among the
    method's callbacks); manual: at ``on_after_backward`` (before the module's own ``clip_gradients``)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.steps: list[int] = []

    def _check(self, pl_module, params) -> None:
        with peers.READS.pause():
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            if grads and float(torch.linalg.vector_norm(torch.stack(grads))) > self.threshold:
                self.steps.append(pl_module.zoo_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.automatic_optimization:
            self._check(pl_module, [p for g in optimizer.param_groups for p in g["params"]])

    def on_after_backward(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            part = pl_module.gen if pl_module.phase == "gen" else pl_module.disc
            self._check(pl_module, part.parameters())


def guard_method(name: str, kwargs: dict[str, Any]) -> peers.Method:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return peers.Method(name, f"GradientGuard({text})", None, lambda kw=dict(kwargs): peers._guard(**kw))


def make_methods(guard_kwargs: dict[str, Any] | None = None) -> dict[str, peers.Method]:
    """Every peer of ``peers.METHODS`` (its guard configurations replaced by ``GUARD_CONFIGS``) and the guards."""
    methods = {m.name: m for m in peers.METHODS if not m.name.startswith("guard")}
    configs = dict(GUARD_CONFIGS)
    if guard_kwargs is not None:
        configs["guard_custom"] = guard_kwargs
    methods.update({name: guard_method(name, kw) for name, kw in configs.items()})
    return methods


def guard_unavailable(method: peers.Method) -> str | None:
    """Why a guard configuration cannot be built with the installed package (the old meaning of an argument may be
    gone), or None."""
    if not method.name.startswith("guard"):
        return None
    try:
        method.make()
    except (TypeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@dataclass
class Captured:
    """The setup a method built for one run (its observer, guard and norm watch), kept for the record."""

    setup: Any = None
    watch: NormWatch | None = None


def capturing(method: peers.Method, captured: Captured) -> peers.Method:
    def make():
        setup = method.make()
        if method.name in CONSTANT_CLIP:
            captured.watch = NormWatch(CONSTANT_CLIP[method.name])
            setup.callbacks.insert(0, captured.watch)
        captured.setup = setup
        return setup

    return peers.Method(method.name, method.description, method.package, make)


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
PERSISTENT_KINDS = ("stop", "rollback", "raise")


def _downsample(losses: list[float], event: int | None, every: int = 5) -> list[list[float]]:
    """Every ``every``-th step, and every step within 5 of the event."""
    keep = [
        [i, round(v, 5) if math.isfinite(v) else v]
        for i, v in enumerate(losses)
        if i % every == 0 or (event is not None and abs(i - event) <= 5) or i == len(losses) - 1
    ]
    return keep


def run_case(case: ZooCase, method: peers.Method, *, tail: int, eval_every: int, way: str = "faulty") -> dict:
    """One run through ``peers.run_one``, its steps renumbered to the case's (gan: batches) and the method's actions
    read from its observer, guard event log or norm watch."""
    captured = Captured()
    losses = TrainLoss()
    pc = peer_case(case, lambda w: [InfGradInjector(), losses])
    run = peers.run_one(pc, capturing(method, captured), tail=tail * case.steps_per_batch,
                        eval_every=eval_every * case.steps_per_batch, way=way, probe_cls=ZooProbe)  # fmt: skip
    spb = case.steps_per_batch

    def renumber(step: int | None) -> int | None:
        return None if step is None else step // spb

    obs = captured.setup.observer
    skips: list[int] = []
    clips: list[int] = []
    events: dict[str, list[int]] = {}
    if isinstance(obs, peers.GuardObserver):
        with peers.READS.pause():
            for e in obs.guard.event_log.events:
                events.setdefault(e.kind, []).append(renumber(e.step))
        skips, clips = events.get("skip", []), events.get("clip", [])
    elif isinstance(obs, peers.OlmoGlue):
        skips = [renumber(s) for s in obs.skipped]
    elif isinstance(obs, peers.ZClipObserver):
        events["zscore"] = [renumber(s) for s in obs.interventions]
        clips = list(events["zscore"])
    if captured.watch is not None:
        clips = sorted(set(clips) | set(captured.watch.steps))
    stopped = renumber(run["stopped_at"]) if method.name == "spike_detection" else None
    actions = sorted(set(skips) | set(clips) | ({stopped} if stopped is not None else set()))
    warnings = sorted(set(actions) | {s for v in events.values() for s in v})
    run.update(
        failure_step=renumber(run["failure_step"]),
        stopped_at=renumber(run["stopped_at"]),
        steps_run=renumber(run["steps_run"]),
        eval_curve=[[renumber(s), v] for s, v in run["eval_curve"]],
        train_loss=_downsample(losses.losses, case.event_step),
        skip_steps=sorted(set(skips)),
        clip_steps=clips,
        events={k: sorted(set(v)) for k, v in events.items()},
        action_steps=actions,
        warning_steps=warnings,
        persistent_triggered=any(k in events for k in PERSISTENT_KINDS),
        exposes_actions=obs.exposes_interventions or captured.watch is not None,
    )
    for k in ("intervention_steps", "interventions", "first_warning"):
        run.pop(k, None)
    run["host_reads_per_step"] = None
    return run


def run_group(group: list[ZooCase], names: list[str], custom: dict[str, Any] | None, tail: int, eval_every: int,
              threads: int) -> dict:  # fmt: skip
    """Every method on every case of one (family, seed) group, methods interleaved (their order rotates from case to
    case), references included. Runs in a worker process (methods by name: lambdas do not pickle)."""
    every = make_methods(custom)
    methods = [every[n] for n in names]
    torch.set_num_threads(threads)
    _common.quiet()
    out: dict[str, dict[str, Any]] = {}
    with peers.READS:
        for i, case in enumerate(group):
            order = methods[i % len(methods) :] + methods[: i % len(methods)]
            runs = {}
            for m in order:
                t0 = time.perf_counter()
                runs[m.name] = run_case(case, m, tail=tail, eval_every=eval_every)
                runs[m.name]["wall_s"] = round(time.perf_counter() - t0, 2)
            out[case.name] = {m.name: runs[m.name] for m in methods}
            line = " ".join(
                f"{m}={'ok' if r['finished_finite'] else 'FAIL'}" + (f"[{len(a)}]" if (a := r["action_steps"]) else "")
                for m, r in out[case.name].items()
            )
            print(f"[fault_zoo] {case.name} (event {case.event_step}): {line}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------------------
NEAR = 10  # steps either side of a legitimate change where actions count as "around the change"
RECOVERY_TOLERANCE = 0.10


def _fin(x: Any) -> bool:
    return _common.finite(x)


def recovery_steps(run: dict, reference: dict | None, event: int) -> int | None:
    """Steps after the fault until the held-out loss is back within 10 % of the same method's clean run at the same
    evaluation step (None: never, or either run failed)."""
    if reference is None or not run["finished_finite"]:
        return None
    ref = {s: v for s, v in reference["eval_curve"] if _fin(v)}
    for s, v in run["eval_curve"]:
        if s >= event and _fin(v) and s in ref and v <= (1 + RECOVERY_TOLERANCE) * ref[s]:
            return s - event
    return None


def analyse(cases: list[dict[str, Any]]) -> None:
    """The fields that compare runs: damage against the same method's clean run, catch, recovery, lead time, actions
    around a change and elsewhere, host reads beyond plain."""
    by_name = {c["name"]: c for c in cases}
    for c in cases:
        ref_case = by_name.get(c["reference"]) if c.get("reference") else None
        plain = c["runs"].get("plain")
        e = c["event_step"]
        for m, r in c["runs"].items():
            if plain is not None:
                r["host_reads_per_step"] = r["host_reads_total_per_step"] - plain["host_reads_total_per_step"]
            if c["class"] in ("failure", "divergence"):
                ref = ref_case["runs"].get(m) if ref_case is not None else None
                ref_final = ref["final_eval_loss"] if ref is not None else None
                ok = r["finished_finite"] and _fin(ref_final) and ref_final > 0
                r["reference_final_eval_loss"] = ref_final
                r["damage"] = r["final_eval_loss"] / ref_final - 1 if ok else None
                r["caught"] = any(abs(s - e) <= 1 for s in r["action_steps"])
                r["recovery_steps"] = recovery_steps(r, ref, e)
            if c["class"] == "divergence" and plain is not None:
                reference, why = peers.divergence_step(plain, e)
                warn = next((s for s in r["warning_steps"] if s >= e), None)
                r["lead_reference_step"], r["lead_reference"] = reference, why
                r["first_warning_after_onset"] = warn
                r["lead_time"] = reference - warn if reference is not None and warn is not None else None
            if c["class"] == "healthy":
                pf = plain["final_eval_loss"] if plain is not None else None
                ok = r["finished_finite"] and _fin(pf) and pf > 0
                r["relative_to_plain"] = r["final_eval_loss"] / pf - 1 if ok else None
                near = [s for s in r["action_steps"] if e is not None and abs(s - e) <= NEAR]
                r["actions_near_change"] = len(near)
                r["false_actions"] = len(r["action_steps"]) - len(near)
                excluded = 0 if e is None else len(range(max(e - NEAR, 0), min(e + NEAR, c["steps"] - 1) + 1))
                r["steps_outside_change"] = c["steps"] - excluded


def _median(values: list[float]) -> float | None:
    values = [v for v in values if _fin(v)]
    return _common.median(values) if values else None


def method_summary(cases: list[dict[str, Any]], method: str) -> dict[str, Any]:
    runs = lambda cls: [c["runs"][method] for c in cases if c["class"] == cls and method in c["runs"]]  # noqa: E731
    fails, healthy, div = runs("failure"), runs("healthy"), runs("divergence")
    exposes = any(r["exposes_actions"] for r in fails + healthy + div)
    damages = [r["damage"] if r["damage"] is not None else math.inf for r in fails]
    changes = [r for c in cases if c["class"] == "healthy" and c["event_step"] is not None and method in c["runs"]
               for r in [c["runs"][method]]]  # fmt: skip
    outside = sum(r["steps_outside_change"] for r in healthy)
    return {
        "fault_runs": len(fails),
        "catch_rate": sum(r["caught"] for r in fails) / len(fails) if fails else None,
        "failed_runs": sum(not r["finished_finite"] for r in fails),
        "median_damage": _median(damages) if fails else None,
        "worst_damage": max(damages) if fails else None,
        "median_recovery_steps": _median([r["recovery_steps"] for r in fails]),
        "never_recovered": sum(r["recovery_steps"] is None for r in fails),
        "false_actions_per_1000": 1000 * sum(r["false_actions"] for r in healthy) / outside
        if exposes and outside
        else None,
        "mean_actions_near_change": sum(r["actions_near_change"] for r in changes) / len(changes)
        if exposes and changes
        else None,
        "max_actions_near_change": max((r["actions_near_change"] for r in changes), default=None) if exposes else None,
        "worst_healthy_relative_to_plain": max(
            (r["relative_to_plain"] if r["relative_to_plain"] is not None else math.inf for r in healthy), default=None
        ),
        "median_lead_time": _median([r["lead_time"] for r in div]),
        "persistent_triggered_runs": sum(r["persistent_triggered"] for r in fails + healthy + div),
        "host_reads_per_step": _median([r["host_reads_per_step"] for r in fails + healthy + div]),
        "median_step_ms": _median([r["median_step_ms"] for r in fails + healthy + div]),
    }


def guard_targets(cases: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """The issue's targets for one guard configuration on one set of cases: every failure run finite with damage
    <= 10 % and within 2 points of the least-damaged peer; every healthy run <= 3 actions around its change, <= 1
    action per 1000 steps elsewhere, final <= 2 % above plain, never on_persistent."""
    misses: list[str] = []
    for c in cases:
        r = c["runs"].get(method)
        if r is None:
            continue
        if c["class"] == "failure":
            peer = [x["damage"] for m, x in c["runs"].items() if not m.startswith("guard") and x["damage"] is not None]
            best = min(peer, default=math.inf)
            d = r["damage"]
            if not r["finished_finite"] or d is None:
                misses.append(f"{c['name']}: did not finish finite")
            elif d > 0.10 or d > best + 0.02:
                misses.append(f"{c['name']}: damage {d:+.1%} (least-damaged peer {best:+.1%})")
        elif c["class"] == "healthy":
            if r["actions_near_change"] > 3:
                misses.append(f"{c['name']}: {r['actions_near_change']} actions around the change")
            rel = r["relative_to_plain"]
            if rel is None or rel > 0.02:
                misses.append(f"{c['name']}: final {'not finite' if rel is None else f'{rel:+.1%}'} vs plain")
        if r["persistent_triggered"]:
            misses.append(f"{c['name']}: on_persistent triggered")
    healthy = [c["runs"][method] for c in cases if c["class"] == "healthy" and method in c["runs"]]
    outside = sum(r["steps_outside_change"] for r in healthy)
    rate = 1000 * sum(r["false_actions"] for r in healthy) / outside if outside else 0.0
    if rate > 1.0:
        misses.append(f"false actions {rate:.2f} per 1000 healthy steps (target <= 1)")
    return {"runs": sum(method in c["runs"] for c in cases if c["class"] in ("failure", "healthy")),
            "false_actions_per_1000": rate, "target_met": not misses, "misses": misses}  # fmt: skip


def summarise(cases: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    measured = [c for c in cases if c["class"] != "reference"]
    families = sorted({c["family"] for c in measured})
    splits = {"tuned": [c for c in measured if not c["held_out"]], "held_out": [c for c in measured if c["held_out"]]}
    guards = [m for m in methods if m.startswith("guard")]
    targets = {g: {k: guard_targets(v, g) for k, v in splits.items() if v} for g in guards}
    return {
        "target": "GradientGuard() (guard): on every failure case finite, damage <= 10 % and within 2 points of the "
        "least-damaged peer; on healthy runs <= 3 actions around each change, <= 1 per 1000 steps elsewhere, final "
        "<= 2 % above plain, never on_persistent; on the tuned and the held-out set",
        "target_met": bool(targets.get("guard")) and all(t["target_met"] for t in targets["guard"].values()),
        "guard_targets": targets,
        "methods": {m: method_summary(measured, m) for m in methods},
        "by_family": {f: {m: method_summary([c for c in measured if c["family"] == f], m) for m in methods}
                      for f in families},  # fmt: skip
        "by_split": {k: {m: method_summary(v, m) for m in methods} for k, v in splits.items() if v},
    }


# ---------------------------------------------------------------------------------------------------------------------
# picture
# ---------------------------------------------------------------------------------------------------------------------
def plot(cases: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """A grid of small panels, one per (kind, family) of the first seed: every method's held-out loss (log scale),
    the fault or change step as a dashed line, every action of the method as a dot on its curve, an x at the end of
    a run that failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [c for c in cases if c["class"] != "reference"]
    if not shown:
        raise ValueError("no case to plot")
    seed = min(c["seed"] for c in shown)
    shown = [c for c in shown if c["seed"] == seed]
    families = [f for f in FAMILIES if any(c["family"] == f for c in shown)]
    kinds = [k for k in KINDS if any(c["kind"] == k for c in shown)]
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(kinds), len(families), figsize=(3.2 * len(families), 1.9 * len(kinds) + 0.8),
                             squeeze=False, sharex="col")  # fmt: skip
    for i, kind in enumerate(kinds):
        for j, family in enumerate(families):
            ax = axes[i][j]
            case = next((c for c in shown if c["kind"] == kind and c["family"] == family), None)
            if case is None:
                ax.axis("off")
                continue
            for m in methods:
                r = case["runs"].get(m)
                if r is None:
                    continue
                pts = [(s, v) for s, v in r["eval_curve"] if _fin(v) and v > 0]
                if not pts:
                    continue
                xs, ys = np.array(pts, dtype=float).T
                ax.plot(xs, ys, color=colors[m], lw=1.0, label=m)
                acts = np.array(r["action_steps"], dtype=float)
                if acts.size:
                    ax.plot(acts, np.interp(acts, xs, ys), "o", ms=3, color=colors[m])
                if not r["finished_finite"]:
                    ax.plot(xs[-1:], ys[-1:], "x", ms=6, mew=1.5, color=colors[m])
            if case["event_step"] is not None:
                ax.axvline(case["event_step"], color="k", ls="--", lw=0.8)
            ax.set_yscale("log")
            ax.tick_params(labelsize=6)
            ax.set_title(f"{family} / {kind}", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            h, lab = ax.get_legend_handles_labels()
            if len(lab) > len(labels):
                handles, labels = h, lab
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.text(0.5, 0.003, f"x: optimizer step (gan: batch); y: held-out loss, log scale; seed {seed}\ndashed: fault or "
             "change step; dots: the method acted (skip, clip, detection); x: the run failed", ha="center",
             fontsize=7)  # fmt: skip
    fig.tight_layout(rect=(0, 0.3 / (1.9 * len(kinds) + 0.8), 1, 1 - 0.5 / (1.9 * len(kinds) + 0.8)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.parser("fault_zoo", __doc__.splitlines()[0])
    p.add_argument("--families", default=None, help=f"comma-separated subset of {', '.join(FAMILIES)}")
    p.add_argument("--cases", default=None, help=f"comma-separated kinds (faults and healthy): {', '.join(KINDS)}")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: tuned 0,1 and held-out 2)")
    p.add_argument("--held-out-seeds", default="2", help="seeds that count as held out (default 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200, --quick 90)")
    p.add_argument("--guard-kwargs", default=None, help="JSON object: adds guard_custom = GradientGuard(**it)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, a (family, seed) group each (default 2)")
    p.add_argument("--picture", type=Path, default=None, help=f"picture path (default {PICTURE_REL}; --quick: temp)")
    p.add_argument("--traces", type=Path, default=None, help="run only plain and write per-step traces to this JSON")
    args = p.parse_args(argv)
    families = _csv(args.families) or (["conv_ae", "transformer"] if args.quick else list(FAMILIES))
    if bad := [f for f in families if f not in FAMILIES]:
        p.error(f"`--families`: unknown {bad}; the families are {list(FAMILIES)}")
    kinds = _csv(args.cases) or (list(QUICK_KINDS) if args.quick else list(KINDS))
    if bad := [k for k in kinds if k not in KINDS]:
        p.error(f"`--cases`: unknown {bad}; the kinds are {list(KINDS)}")
    try:
        seeds = [int(s) for s in _csv(args.seeds) or (["0"] if args.quick else ["0", "1", "2"])]
        held = {int(s) for s in _csv(args.held_out_seeds) or []}
    except ValueError:
        p.error(f"`--seeds` / `--held-out-seeds` must be comma-separated integers, got {args.seeds!r}")
    steps = args.steps if args.steps is not None else (90 if args.quick else 200)
    if steps < 30:
        p.error(f"`--steps` must be >= 30, got {steps}")
    if args.workers < 1:
        p.error(f"`--workers` must be >= 1, got {args.workers}")
    args.families, args.kinds, args.seed_list, args.held_out_set, args.steps = families, kinds, seeds, held, steps
    return args


QUICK_KINDS = ("clean", "nan_batch", "loss_x100", "wrong_scale", "loss_switch")
QUICK_METHODS = ("plain", "clip", "zclip", "olmo_skip_step", "guard")
PICTURE_REL = "docs/images/fault_zoo.png"
PICTURE = _common.REPO_ROOT / PICTURE_REL


def make_cases(args: argparse.Namespace, *, references: bool = True) -> list[ZooCase]:
    """The selected cases, and (``references``) the clean runs their faults are measured against where not selected:
    references first in each (family, seed) group."""
    cases = []
    for f in args.families:
        for seed in args.seed_list:
            group = [make_case(f, k, seed, args.steps, args.held_out_set) for k in args.kinds if applies(f, k)]
            names = {c.name for c in group}
            refs = []
            for c in group:
                if references and c.reference is not None and c.reference not in names | {r.name for r in refs}:
                    refs.append(make_case(f, "clean", seed, args.steps, args.held_out_set, accumulate=c.accumulate,
                                          reference_only=True))  # fmt: skip
            cases += refs + group
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    if args.traces is not None:
        traced = run_traces(make_cases(args, references=False))
        config = {"mode": "traces", "steps": args.steps, "families": args.families, "kinds": args.kinds,
                  "seeds": args.seed_list, "held_out_seeds": sorted(args.held_out_set),
                  "trace_fields": "per optimizer (gan: gen, disc): step (the case's step numbering), grad_norm (total "
                  "L2 norm before the optimizer step), loss (as on_before_backward sees it, summed over micro-batches),"
                  " lr"}  # fmt: skip
        args.out = args.traces
        out = _common.write_result("fault_zoo", args, config=config, cases=traced,
                                   summary={"target": "traces only", "target_met": None}, started=started,
                                   machine=machine)  # fmt: skip
        print(f"fault_zoo: traces of {len(traced)} plain runs -> {out}")
        return 0
    return compare(args, started, machine)


#: rough idle-CPU cost per optimizer step (ms; gan: per batch of two steps) and per run (Trainer set-up, evaluations)
STEP_MS = {"conv_ae": 6.0, "transformer": 9.0, "gan": 14.0, "deep_attn": 18.0, "gru": 8.0}
RUN_OVERHEAD_S = 0.6


def estimate_s(cases: list[ZooCase], n_methods: int, workers: int) -> float:
    cost = sum(c.steps * STEP_MS[c.family] * (2 if c.accumulate > 1 else 1) / 1e3 + RUN_OVERHEAD_S for c in cases)
    return cost * n_methods / max(workers, 1)


def compare(args: argparse.Namespace, started: float, machine: dict[str, Any]) -> int:
    from concurrent.futures import ProcessPoolExecutor

    versions = peers.package_versions()
    try:
        custom = json.loads(args.guard_kwargs) if args.guard_kwargs else None
    except json.JSONDecodeError as err:
        raise SystemExit(f"`--guard-kwargs` must be a JSON object, got {args.guard_kwargs!r}: {err}") from None
    if custom is not None and not isinstance(custom, dict):
        raise SystemExit(f"`--guard-kwargs` must be a JSON object, got {args.guard_kwargs!r}")
    every = make_methods(custom)
    chosen = _csv(args.methods) or (list(QUICK_METHODS) if args.quick else list(every))
    if custom is not None and "guard_custom" not in chosen:
        chosen.append("guard_custom")
    if bad := [m for m in chosen if m not in every]:
        raise SystemExit(f"`--methods`: unknown {bad}; the methods are {list(every)}")
    if "plain" not in chosen:
        chosen.insert(0, "plain")
    unavailable = {m: versions[every[m].package] for m in chosen if not peers.usable(every[m].package, versions)}
    unavailable.update({m: why for m in chosen if (why := guard_unavailable(every[m]))})
    methods = [every[m] for m in chosen if m not in unavailable]
    cases = make_cases(args)
    tail, eval_every = (5, 5) if args.quick else (10, 10)
    workers = max(1, min(args.workers, len({(c.family, c.seed) for c in cases})))
    print(f"fault_zoo: {len(cases)} cases x {len(methods)} methods, {args.steps} steps, {workers} worker(s): about "
          f"{estimate_s(cases, len(methods), workers) / 60:.0f} min on an idle machine", flush=True)  # fmt: skip
    names = [m.name for m in methods]
    groups: dict[tuple[str, int], list[ZooCase]] = {}
    for c in cases:
        groups.setdefault((c.family, c.seed), []).append(c)
    runs: dict[str, dict[str, Any]] = {}
    if workers == 1:
        for g in groups.values():
            runs.update(run_group(g, names, custom, tail, eval_every, args.threads))
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            args_ = (names, custom, tail, eval_every, args.threads)
            futures = [pool.submit(run_group, g, *args_) for g in groups.values()]
            for f in futures:
                runs.update(f.result())
    docs = [{**c.record(), "runs": runs[c.name]} for c in cases]
    analyse(docs)
    summary = summarise(docs, names)
    config = {
        "steps": args.steps, "families": args.families, "kinds": args.kinds, "seeds": args.seed_list,
        "held_out_seeds": sorted(args.held_out_set), "held_out_families": list(HELD_OUT_FAMILIES),
        "eval_tail_steps": tail, "eval_every": eval_every, "near_change_steps": NEAR, "workers": workers,
        "methods": {m: every[m].description for m in every}, "methods_run": names,
        "methods_unavailable": unavailable, "guard_configs": {**GUARD_CONFIGS, **({"guard_custom": custom} if custom
        else {})}, "constant_clip": CONSTANT_CLIP, "packages": versions,
        "faults": {"loss_factors": LOSS_FACTORS, "wrong_scale": WRONG_SCALE, "overflow": OVERFLOW,
                   "divergence_growth_per_step": GROWTH, "nan_microbatch_accumulation": ACCUMULATE},
        "healthy": {"warmup_steps": WARMUP_STEPS, "warmup_peak_x_lr": WARMUP_PEAK, "switch_weight": SWITCH_WEIGHT},
    }  # fmt: skip
    out = _common.write_result("fault_zoo", args, config=config, cases=docs, summary=summary, started=started,
                               machine=machine)  # fmt: skip
    picture = args.picture or (Path(tempfile.mkdtemp(prefix="fault_zoo_")) / "fault_zoo.png" if args.quick or
                               args.out is not None else PICTURE)  # fmt: skip
    try:
        plot(docs, names, picture)
    except ImportError as err:
        print(f"fault_zoo: no picture ({err})")
    else:
        print(f"fault_zoo: picture -> {picture}")
    for m in names:
        s = summary["methods"][m]
        f = _common.fmt
        print(f"  {m:16s} catch {f(s['catch_rate'], '.0%'):>5}  median damage {f(s['median_damage'], '+.1%'):>7}  "
              f"failed {s['failed_runs']}  false/1000 {f(s['false_actions_per_1000'], '.1f'):>5}  "
              f"lead {f(s['median_lead_time'])}")  # fmt: skip
    for split, t in summary["guard_targets"].get("guard", {}).items():
        print(f"  guard targets ({split}): {'met' if t['target_met'] else 'missed: ' + '; '.join(t['misses'][:6])}")
    print(f"fault_zoo -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
