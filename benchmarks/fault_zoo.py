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
import math
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

    @property
    def name(self) -> str:
        return f"{self.family}.{self.kind}.s{self.seed}"

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


def make_case(family: str, kind: str, seed: int, steps: int, held_out_seeds: set[int]) -> ZooCase:
    warmup = min(WARMUP_STEPS, (3 * steps) // 5)
    case = ZooCase(family, kind, seed, steps, event_step_for(family, kind, seed, steps, warmup),
                   held_out=family in HELD_OUT_FAMILIES or seed in held_out_seeds, warmup=warmup,
                   accumulate=ACCUMULATE if kind == "nan_microbatch" else 1)  # fmt: skip
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
        out.append({
            "name": case.name, "family": case.family, "kind": case.kind, "class": kind_of(case.kind),
            "seed": case.seed, "held_out": case.held_out, "steps": case.steps, "event_step": case.event_step,
            "accumulate_grad_batches": case.accumulate, "finished_finite": run["finished_finite"],
            "final_eval_loss": run["final_eval_loss"], "traces": recorder.traces,
        })  # fmt: skip
        print(f"[fault_zoo traces] {case.name}: event {case.event_step}, {time.perf_counter() - t0:.1f} s", flush=True)
    return out


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
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 240, --quick 90)")
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
    steps = args.steps if args.steps is not None else (90 if args.quick else 240)
    if steps < 30:
        p.error(f"`--steps` must be >= 30, got {steps}")
    args.families, args.kinds, args.seed_list, args.held_out_set, args.steps = families, kinds, seeds, held, steps
    return args


QUICK_KINDS = ("clean", "nan_batch", "loss_x100", "wrong_scale", "loss_switch")


def make_cases(args: argparse.Namespace) -> list[ZooCase]:
    return [
        make_case(f, k, s, args.steps, args.held_out_set)
        for f in args.families
        for s in args.seed_list
        for k in args.kinds
        if applies(f, k)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    cases = make_cases(args)
    if args.traces is not None:
        traced = run_traces(cases)
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
    raise SystemExit("the method comparison is not built yet: use --traces")


if __name__ == "__main__":
    raise SystemExit(main())
