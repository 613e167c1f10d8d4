"""Users' codecs for the monitor tests: a small LightningModule around a quantizer of another library (EnCodec's
``ResidualVectorQuantizer``, vector-quantize-pytorch's ``ResidualVQ``), and a small GAN with manual optimization.

Faults are injected the way they happen in users' code: an encoder whose output collapses to one point, a latent
distribution that moves away from the k-means-initialised codebook (dead codes that the quantizer's own expiry must
revive), a discriminator with a far too high learning rate, and a misplaced ``zero_grad`` that leaks the generator's
loss into the discriminator's step (NeMo #7266).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from tests._helpers_codec import loader  # noqa: F401  (re-exported for the tests)

DIM = 2  # 16 codes in 2-D: a standardised latent reaches every uniformly initialised code
HOP = 4


class UserVQCodec(pl.LightningModule):
    """Conv encoder -> a user's RVQ (``kind``: ``"encodec"`` or ``"vqp"``) -> transposed-conv decoder.

    ``collapse``: the encoder output is replaced by one constant point (every frame the same latent).
    ``kmeans_init`` (EnCodec only): EnCodec's k-means initialisation keeps ``embed_avg = embed`` instead of
    ``embed * cluster_size``, so its first EMA update shrinks the codebook and level 0 collapses (the monitor reports
    it); the healthy runs use its uniform initialisation.
    ``shift_after``: from this training batch on, the latents are scaled by 0.05 (they move into a small region of
    the k-means-initialised codebook, so most codes die and only the quantizer's dead-code expiry can revive them).
    """

    def __init__(
        self,
        kind: str,
        *,
        codebook_size: int = 16,
        n_q: int = 2,
        expiry: bool = True,
        decay: float = 0.8,
        collapse: bool = False,
        shift_after: int | None = None,
        kmeans_init: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the initialisation (and the codebook draws) of a test are reproducible
        self.kind, self.collapse, self.shift_after = kind, collapse, shift_after
        self.encoder = nn.Conv1d(1, DIM, HOP, stride=HOP)
        self.decoder = nn.ConvTranspose1d(DIM, 1, HOP, stride=HOP)
        threshold = 2 if expiry else 0
        if kind == "encodec":
            from encodec.quantization import ResidualVectorQuantizer

            self.quantizer = ResidualVectorQuantizer(
                dimension=DIM, n_q=n_q, bins=codebook_size, decay=decay, kmeans_init=kmeans_init, kmeans_iters=5,
                threshold_ema_dead_code=threshold,
            )  # fmt: skip
        elif kind == "vqp":
            from vector_quantize_pytorch import ResidualVQ

            self.quantizer = ResidualVQ(
                dim=DIM, num_quantizers=n_q, codebook_size=codebook_size, decay=decay, kmeans_init=True,
                kmeans_iters=5, threshold_ema_dead_code=threshold,
            )  # fmt: skip
        else:
            raise ValueError(kind)
        self.batches = 0

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [B, D, T]`` -> (quantized ``[B, D, T]``, commitment penalty)."""
        if self.kind == "encodec":
            out = self.quantizer(z, sample_rate=8000)
            return out.quantized, out.penalty
        quantized, _, losses = self.quantizer(z.transpose(1, 2))
        return quantized.transpose(1, 2), losses.sum()

    def training_step(self, batch, batch_idx):
        audio = batch
        z = self.encoder(audio)
        # standardised latents (per channel over the batch): spread over a uniformly initialised codebook, so the
        # first batch uses every code (EnCodec's EMA turns a code unused in its first update into a far-away row)
        z = (z - z.mean(dim=(0, 2), keepdim=True)) / z.std(dim=(0, 2), keepdim=True).clamp(min=1e-5)
        if self.collapse:
            z = 0.0 * z + 0.5
        if self.shift_after is not None and self.batches >= self.shift_after:
            z = 0.05 * z
        self.batches += 1
        q, penalty = self.quantize(z)
        recon = self.decoder(q)
        rec = F.l1_loss(recon, audio)
        return {"loss": rec + penalty, "losses": {"l1": rec.detach(), "vq": penalty.detach()}}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class UserGAN(pl.LightningModule):
    """A tiny waveform generator and discriminator trained with manual optimization (hinge losses, EnCodec-style
    relative feature matching), returning the names ``AdversarialBalanceMonitor`` reads by default.

    ``disc_lr``: the discriminator's learning rate (a blow-up: far above the generator's).
    ``leak``: the misplaced-``zero_grad`` bug: the generator's loss is back-propagated into the discriminator too,
    and the discriminator steps on it (without a ``zero_grad`` in between), so it learns to call the generated
    audio real and to make its features of real and generated audio alike.
    """

    def __init__(self, *, gen_lr: float = 1e-3, disc_lr: float = 1e-3, leak: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.automatic_optimization = False
        self.gen_lr, self.disc_lr, self.leak = gen_lr, disc_lr, leak
        self.generator = nn.Sequential(nn.Conv1d(1, 8, 9, padding=4), nn.Tanh(), nn.Conv1d(8, 1, 9, padding=4))
        self.disc = nn.ModuleList(
            [nn.Conv1d(1, 8, 15, stride=4, padding=7), nn.Conv1d(8, 8, 15, stride=4, padding=7), nn.Conv1d(8, 1, 3)]
        )

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fmaps = []
        for layer in self.disc[:-1]:
            x = F.leaky_relu(layer(x), 0.2)
            fmaps.append(x)
        return self.disc[-1](x), fmaps

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        audio = batch
        noisy = audio + 0.3 * torch.randn_like(audio)
        fake = self.generator(noisy)

        real_logits, _ = self.discriminate(audio)
        fake_logits_d, _ = self.discriminate(fake.detach())
        d_loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits_d).mean()
        if not self.leak:
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()

        def generator_loss():
            fake_logits, fake_fmaps = self.discriminate(fake)
            _, real_fmaps = self.discriminate(audio)
            adv = F.relu(1 - fake_logits).mean()
            pairs = list(zip(real_fmaps, fake_fmaps))
            feat = sum(F.l1_loss(ff, fr.detach()) / fr.detach().abs().mean().clamp(min=1e-8) for fr, ff in pairs)
            rec = F.l1_loss(fake, audio)
            return rec, adv, feat / len(pairs)

        if self.leak:
            # the bug: one zero_grad for both, the generator's backward also writes into the discriminator, and the
            # discriminator steps on the sum of its own and the generator's gradients
            rec, adv, feat = generator_loss()
            g_loss = rec + adv + 2.0 * feat
            opt_g.zero_grad()
            opt_d.zero_grad()
            self.manual_backward(g_loss + d_loss)
            opt_g.step()
            opt_d.step()
        else:
            self.toggle_optimizer(opt_g)
            rec, adv, feat = generator_loss()
            g_loss = rec + adv + 2.0 * feat
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
        return {
            "loss": g_loss.detach(),
            "losses": {"l1": rec.detach(), "adv": adv.detach(), "feat": feat.detach()},
            "disc_loss": d_loss.detach(),
            "disc_real": real_logits.detach(),
            "disc_fake": fake_logits_d.detach(),
        }

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=self.gen_lr, betas=(0.5, 0.9)),
            torch.optim.Adam(self.disc.parameters(), lr=self.disc_lr, betas=(0.5, 0.9)),
        )


# ----------------------------------------------------------------------------------------- checkpoint round trip
class _Reseed(pl.Callback):
    """Seeds the global RNG from the step before every batch (the GAN's input noise, the quantizers' k-means and
    dead-code draws), so an interrupted-and-resumed run draws what the uninterrupted run draws at the same step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)


def resume_round_trip(tmp_path, make_module, make_monitor, *, steps: int, total: int, prefix: str, batches: int):
    """Fit ``total`` steps in one go, and ``steps`` steps with a ``ModelCheckpoint`` then ``total`` from that
    checkpoint (fresh module and monitor); returns ``(uninterrupted, resumed)``, each ``(monitor, {step: {key: value}}``
    of the values logged under ``prefix``)``. ``batches`` training batches make an epoch (a plain loader without
    shuffling: resuming at an epoch boundary is exact with it, see tests/reliability/test_resume.py)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests._helpers_signal import RecordingLogger

    def fit(max_steps, ckpt_path=None, checkpoint=None):
        monitor, logger = make_monitor(), RecordingLogger()
        callbacks = [monitor, _Reseed(), *([checkpoint] if checkpoint else [])]
        trainer = pl.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=logger, enable_checkpointing=checkpoint is not None,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, log_every_n_steps=1,
            num_sanity_val_steps=0, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(make_module(), loader(n=8 * batches, batch_size=8), ckpt_path=ckpt_path)
        logged = {}
        for step, row in logger.rows:
            values = {k: v for k, v in row.items() if k.startswith(prefix)}
            if values:
                logged.setdefault(step, {}).update(values)
        return monitor, logged

    uninterrupted = fit(total)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps, save_top_k=-1)
    fit(steps, checkpoint=checkpoint)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    return uninterrupted, fit(total, ckpt_path=str(path))


def assert_same_state(a, b, path: str = "state") -> None:
    """Nested dicts/lists of numbers, strings and tensors are equal (tensors exactly), naming the first difference."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), path
        assert isinstance(b, torch.Tensor), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert a.keys() == b.keys(), (path, sorted(a), sorted(b))
        for key in a:
            assert_same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), path
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)
