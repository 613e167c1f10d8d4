"""``CascadeTransformerModule``: the training recipe of the three-stage cascade on codec latents (``docs/design.md``,
post-mortem 3).

The network is :class:`~lightning_stability.reference.cascade.transformer.CascadeTransformer`; this module adds

- **deep supervision**: every stage's output is compared with the target latents,
  ``L_k = masked_mean(|y_k - target|)`` (``loss="l1"``) or ``masked_mean((y_k - target)^2)`` (``loss="mse"``), plus an
  optional cosine term on the last stage, ``L_cos = masked_mean_t(1 - cos(y_K[:, :, t], target[:, :, t]))`` (the
  direction of each frame's latent vector, independent of its norm);
- an **RMS-matching term** on every stage, ``L_rms = sum_k mean_b |rms(y_k) - rms(target)|`` (real frames, in the
  latents' units like the L1 terms, so its balance against them does not depend on the latents' scale): an
  L1-trained prediction of an uncertain target is quieter than the target (regression to the mean), and inside the
  clamp range the only thing that sets a stage's output level is its predicted gain
  (``CascadeConfig.predict_gain``), which this term trains towards the target's level;
- an optional **factor penalty** ``L_scale = mean_k mean_b |log s_k^raw|`` (the RMS factors before clamping; weight 0
  by default: logged only, a stage's distance from needing no correction);
- the **loss-dict protocol** (``docs/design.md``, "The loss dict"): the terms are named ``stage1 .. stageK``,
  ``cosine``, ``rms`` and
  ``scale``, combined by
  ``self.loss_weights.weighted_sum(losses)`` (a :class:`~lightning_stability.losses.LossWeights`), and
  ``training_step`` returns ``{"loss", "losses", "preds", "target", "mask"}`` so ``AdaptiveLossWeight`` can own a
  term's weight and ``SignalMonitor`` can read the latent pair;
- **AdamW** with decay / no-decay parameter groups (no decay for biases, LayerNorm gains and embeddings), a ``gain``
  group for the gain heads (learning rate ``gain_lr_scale * lr``, no decay) and a per-step learning rate with linear
  warm-up then cosine decay to ``min_lr_ratio * lr``;
- logging of every loss term (``train/<name>``, ``val/<name>``), the total, the learning rate, and each stage's RMS
  factor (``train/stage<k>_scale``, mean over the batch), clamped fraction and predicted gain
  (``train/stage<k>_gain``), plus a one-time warning when a stage's
  factor sits above ``config.warn_above`` after warm-up (the collapsing-residual symptom of the post-mortem).

Batches are dicts ``{"source": [B, D, T], "target": [B, D, T], "conditioning": [B, Dc, T], "mask": [B, T] bool}``
(``conditioning`` omitted when ``cond_dim=0``, ``mask`` optional; ``True`` = real frame), as produced by
:class:`~lightning_stability.reference.data.LatentPairDataModule`, or tuples ``(source, conditioning, target[, mask])``.
Padded frames count in no loss term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability._checks import (
    check_choice,
    check_int,
    check_interval,
    check_number,
    check_pair,
    check_positive,
    check_sequence,
)
from lightning_stability.reference.cascade.transformer import CascadeConfig, CascadeOutput, CascadeTransformer

__all__ = ["CascadeTransformerModule", "masked_cosine_distance", "masked_distance"]

_LOSSES = ("l1", "mse")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values [B, C, T]`` over real frames (``mask [B, T]``, True = real) and every channel; fp32."""
    values = values.float()
    if mask is None:
        return values.mean()
    frames = mask[:, None, :].to(values.dtype)  # [B, 1, T]
    count = frames.sum() * values.shape[1]
    return (values * frames).sum() / count.clamp_min(1.0)


def masked_distance(pred: Tensor, target: Tensor, mask: Tensor | None = None, kind: str = "l1") -> Tensor:
    """``mean |pred - target|`` (``kind="l1"``) or ``mean (pred - target)^2`` (``"mse"``) over real frames, fp32.

    Args:
        pred, target: ``[B, C, T]``.
        mask: ``[B, T]`` bool, True for real frames (``None``: all frames).
    """
    diff = pred.float() - target.float()
    return _masked_mean(diff.abs() if kind == "l1" else diff.square(), mask)


def masked_cosine_distance(pred: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``mean_t (1 - cos(pred[b, :, t], target[b, :, t]))`` over real frames, fp32 (0 when every frame is aligned)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=1, eps=eps)  # [B, T]
    return _masked_mean((1.0 - cos)[:, None, :], mask)


def masked_rms(x: Tensor, mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Per-item RMS of ``x [B, C, T]`` over real frames (``mask [B, T]``) and channels, ``[B]`` fp32 (+ ``eps``)."""
    values = x.float()
    if mask is None:
        count = torch.full((x.shape[0],), float(x.shape[1] * x.shape[2]), device=x.device)
    else:
        frames = mask[:, None, :].to(values.dtype)
        values = values * frames
        count = (frames.sum(dim=(1, 2)) * x.shape[1]).clamp_min(1.0)
    return torch.linalg.vector_norm(values, ord=2, dim=(1, 2)) / count.sqrt() + eps


def _rms_error(stages: Sequence[Tensor], target: Tensor, mask: Tensor | None) -> Tensor:
    """Sum over stages of the mean over items of ``|rms(y_k) - rms(target)|`` (real frames, the latents' units)."""
    target_rms = masked_rms(target, mask)
    return torch.stack([(masked_rms(y, mask) - target_rms).abs().mean() for y in stages]).sum()


def _log_scale_penalty(raw_scales: Sequence[Tensor]) -> Tensor:
    """Mean over stages and items of ``|log s_raw|``: how far each stage's raw output RMS is from its reference's."""
    return torch.stack([s.float().log().abs().mean() for s in raw_scales]).mean()


class _WarmupCosine:
    """Multiplier of the base learning rate: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``.

    ``f(s) = (s + 1) / warmup`` for ``s < warmup``; then with ``p = min(1, (s - warmup) / (total - warmup))``,
    ``f(s) = min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2``; constant 1 after warm-up if ``total`` is unknown.
    """

    def __init__(self, warmup: int, total: float | None, min_ratio: float) -> None:
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total is None or not math.isfinite(self.total):
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1.0, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CascadeTransformerModule(pl.LightningModule):
    """Three-stage cascade transformer on codec latents, with deep supervision and the loss-dict protocol.

    Args:
        config: the network (:class:`~lightning_stability.reference.cascade.transformer.CascadeConfig`, or a dict of
            its fields as in a LightningCLI YAML; ``None`` = the post-mortem's fixed defaults).
        loss: per-stage distance to the target latents, ``"l1"`` or ``"mse"``.
        stage_weights: weight of each stage's loss (``stage1 .. stageK``); ``None`` = 1.0 for every stage.
        cosine_weight: weight of the cosine term on the last stage (0: computed and logged, not optimised).
        rms_weight: weight of the RMS-matching term ``rms`` on every stage (0: logged only).
        scale_weight: weight of the factor penalty ``scale`` (0: logged only).
        lr: peak learning rate of AdamW.
        gain_lr_scale: the gain heads' learning rate as a multiple of ``lr`` (10: a head is one small linear layer
            whose log-gain has to move by 0.1-0.5 within a short run; measured on random-encoder latents at 200
            steps, stage 1's output/target RMS ratio 0.90 at 1x, 0.93 at 10x).
        weight_decay: decoupled weight decay of the decay group (Linear weights).
        betas: AdamW betas.
        warmup_steps: linear warm-up length in optimizer steps (0: none).
        total_steps: step at which the cosine decay ends (``None``: ``trainer.estimated_stepping_batches``).
        min_lr_ratio: the learning rate at the end of the decay, as a fraction of ``lr``.

    Attributes:
        model: the :class:`~lightning_stability.reference.cascade.transformer.CascadeTransformer`.
        loss_weights: :class:`~lightning_stability.losses.LossWeights` over ``stage1 .. stageK, cosine, rms, scale``.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument and shows the value).
    """

    signal_type = "latent"  # SignalMonitor: preds/target are latents [B, D, T], not audio

    def __init__(
        self,
        config: CascadeConfig | dict[str, Any] | None = None,
        *,
        loss: str = "l1",
        stage_weights: Sequence[float] | None = None,
        cosine_weight: float = 0.1,
        rms_weight: float = 1.0,
        scale_weight: float = 0.0,
        lr: float = 3e-4,
        gain_lr_scale: float = 10.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.config = CascadeConfig.from_any(config)
        n_stages = self.config.n_stages
        check_choice("loss", loss, _LOSSES)
        if stage_weights is None:
            stage_weights = (1.0,) * n_stages
        stage_weights = check_sequence(
            "stage_weights", stage_weights, partial(check_number, minimum=0), min_length=0, noun="a sequence of numbers"
        )
        if len(stage_weights) != n_stages:
            raise ValueError(f"`stage_weights` must have n_stages={n_stages} entries, got {list(stage_weights)!r}")
        check_number("cosine_weight", cosine_weight, minimum=0)
        check_number("rms_weight", rms_weight, minimum=0)
        check_number("scale_weight", scale_weight, minimum=0)
        check_positive("lr", lr)
        check_positive("gain_lr_scale", gain_lr_scale)
        check_number("weight_decay", weight_decay, minimum=0)
        check_pair("betas", betas, partial(check_interval, low=0, high=1, high_open=True))
        check_int("warmup_steps", warmup_steps, 0)
        check_int("total_steps", total_steps, 1, allow_none=True)
        check_interval("min_lr_ratio", min_lr_ratio, 0, 1)

        self.loss = loss
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.cosine_weight = float(cosine_weight)
        self.rms_weight = float(rms_weight)
        self.scale_weight = float(scale_weight)
        self.lr = float(lr)
        self.gain_lr_scale = float(gain_lr_scale)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.save_hyperparameters(
            {
                "config": self.config.to_dict(),
                "loss": loss,
                "stage_weights": list(self.stage_weights),
                "cosine_weight": self.cosine_weight,
                "rms_weight": self.rms_weight,
                "scale_weight": self.scale_weight,
                "lr": self.lr,
                "gain_lr_scale": self.gain_lr_scale,
                "weight_decay": self.weight_decay,
                "betas": list(self.betas),
                "warmup_steps": warmup_steps,
                "total_steps": total_steps,
                "min_lr_ratio": self.min_lr_ratio,
            }
        )

        from lightning_stability.losses.weights import LossWeights

        self.model = CascadeTransformer(self.config)
        weights = dict(zip(self.stage_names, self.stage_weights))
        weights["cosine"] = self.cosine_weight
        weights["rms"] = self.rms_weight
        weights["scale"] = self.scale_weight
        self.loss_weights = LossWeights(weights)
        self._scale_warned: set[int] = set()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard with FSDP2, every transformer block a unit, then every stage (its
        norms and projections), then the rest (see :func:`~lightning_stability.sharding.shard_module`). A
        no-op under every other strategy."""
        from lightning_stability.sharding import shard_module

        stages = list(self.model.stages)
        shard_module(self, [*(block for stage in stages for block in stage.blocks), *stages])

    # -- naming ------------------------------------------------------------------------------------------------------
    @property
    def stage_names(self) -> list[str]:
        """Loss-term names of the stages: ``["stage1", ..., "stageK"]``."""
        return [f"stage{k + 1}" for k in range(self.config.n_stages)]

    # -- inference ---------------------------------------------------------------------------------------------------
    @override
    def forward(self, source: Tensor, conditioning: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """The last stage's output ``[B, D, T]`` (``rms_reference="target"`` models need :meth:`compute`)."""
        return self.model(source, conditioning, mask=mask).output

    # -- batches -----------------------------------------------------------------------------------------------------
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(source, conditioning, target, mask)`` from a dict batch or a ``(source, conditioning, target[, mask])``
        tuple. Override this to feed the module another batch layout."""
        if isinstance(batch, Mapping):
            missing = [k for k in ("source", "target") if k not in batch]
            if missing:
                raise KeyError(
                    f"a cascade batch needs the keys 'source' and 'target' (and 'conditioning', 'mask'); missing "
                    f"{missing}, got keys {sorted(batch)}"
                )
            return batch["source"], batch.get("conditioning"), batch["target"], batch.get("mask")
        if isinstance(batch, (tuple, list)) and len(batch) in (3, 4):
            source, conditioning, target = batch[:3]
            return source, conditioning, target, (batch[3] if len(batch) == 4 else None)
        raise TypeError(
            "a cascade batch must be a dict with 'source', 'target' (optional 'conditioning', 'mask') or a tuple "
            f"(source, conditioning, target[, mask]), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )

    # -- the step ----------------------------------------------------------------------------------------------------
    def compute(self, batch: Any) -> dict[str, Any]:
        """Forward + losses of one batch: ``{"loss", "losses", "preds", "target", "mask", "output"}``.

        ``losses`` holds the unweighted terms (with their graphs; the step methods return them detached) and
        ``output`` the :class:`~lightning_stability.reference.cascade.transformer.CascadeOutput`.
        """
        source, conditioning, target, mask = self.unpack_batch(batch)
        if not torch.is_tensor(target) or tuple(target.shape) != tuple(source.shape):
            raise ValueError(
                f"`target` latents must have the shape of `source` {tuple(source.shape)}, got "
                f"{tuple(target.shape) if torch.is_tensor(target) else type(target).__name__}"
            )
        teacher = target if self.config.rms_reference == "target" else None
        output: CascadeOutput = self.model(source, conditioning, mask=mask, target=teacher)
        weights = self.loss_weights  # a term of weight 0 is computed under no_grad: logged, not optimised
        losses: dict[str, Tensor] = {
            name: weights.compute(name, masked_distance, y, target, mask, self.loss)
            for name, y in zip(self.stage_names, output.stages)
        }
        losses["cosine"] = weights.compute("cosine", masked_cosine_distance, output.output, target, mask)
        losses["rms"] = weights.compute("rms", _rms_error, output.stages, target, mask)
        losses["scale"] = weights.compute("scale", _log_scale_penalty, output.raw_scales)
        total = self.loss_weights.weighted_sum(losses)
        return {
            "loss": total,
            "losses": losses,
            "preds": output.output.detach(),
            "target": target,
            "mask": mask,
            "output": output,
        }

    def _log_step(self, stage: str, result: dict[str, Any], batch_size: int) -> None:
        on_step = stage == "train"
        sync = not on_step
        self.log(
            f"{stage}/loss",
            result["loss"].detach(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=batch_size,
            sync_dist=sync,
        )
        for name, value in result["losses"].items():
            self.log(
                f"{stage}/{name}",
                value.detach(),
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                sync_dist=sync,
            )
        output: CascadeOutput = result["output"]
        for k, (scale, clamped) in enumerate(zip(output.scales, output.clamped_fractions), start=1):
            self.log(
                f"{stage}/stage{k}_scale",
                scale.mean(),
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                sync_dist=sync,
            )
            self.log(
                f"{stage}/stage{k}_clamped",
                clamped,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                sync_dist=sync,
            )
        if self.config.predict_gain:
            for k, gain in enumerate(output.gains, start=1):
                self.log(
                    f"{stage}/stage{k}_gain",
                    gain.detach().mean(),
                    on_step=on_step,
                    on_epoch=not on_step,
                    batch_size=batch_size,
                    sync_dist=sync,
                )

    def _maybe_warn_scale(self, output: CascadeOutput) -> None:
        """Warn once per stage when its mean RMS factor is above ``warn_above`` after warm-up (log steps only)."""
        trainer = self._trainer
        if trainer is None or self.global_step < self.warmup_steps or len(self._scale_warned) == self.config.n_stages:
            return
        if self.global_step % max(1, trainer.log_every_n_steps):
            return
        for k, scale in enumerate(output.scales):
            if k in self._scale_warned:
                continue
            value = float(scale.mean())  # host sync, at log steps only
            if value > self.config.warn_above:
                self._scale_warned.add(k)
                rank_zero_warn(
                    f"cascade stage {k + 1}: mean RMS factor {value:.3f} > warn_above={self.config.warn_above} at "
                    f"step {self.global_step} (clamp [{self.config.min_scale}, {self.config.max_scale}]): the stage's "
                    f"output is too quiet and the factor is compensating (residual weight "
                    f"r={self.model.stages[k].residual_weight}; in the post-mortem a weak r=0.1 let the output RMS "
                    f"collapse). If it persists, try a larger residual weight or an RMS-matching term."
                )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        result = self.compute(batch)
        self._log_step("train", result, batch_size=result["preds"].shape[0])
        self._maybe_warn_scale(result["output"])
        return {
            "loss": result["loss"],
            "losses": {k: v.detach() for k, v in result["losses"].items()},
            "preds": result["preds"],
            "target": result["target"],
            "mask": result["mask"],
        }

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        result = self.compute(batch)
        self._log_step("val", result, batch_size=result["preds"].shape[0])
        return {
            "loss": result["loss"].detach(),
            "losses": {k: v.detach() for k, v in result["losses"].items()},
            "preds": result["preds"],
            "target": result["target"],
            "mask": result["mask"],
        }

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        source, conditioning, _, mask = self.unpack_batch(batch)
        return self(source, conditioning, mask)

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the weights are plain floats outside the state_dict (see LossWeights); a resumed run continues with the
        # weights it had, even ones changed by hand or by a callback
        checkpoint["loss_weights"] = self.loss_weights.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "loss_weights" in checkpoint:
            self.loss_weights.load_state_dict(checkpoint["loss_weights"])

    # -- optimisation ------------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: ``decay`` (weights of Linear/conv layers, incl. spectral norm's ``original``), ``no_decay``
        (biases, normalisation gains, embeddings, any parameter with fewer than 2 dims) and, when the config has gain
        heads, ``gain`` (their weights and biases: learning rate ``gain_lr_scale * lr``, no decay)."""
        no_decay_types = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
        decay, no_decay, gain = [], [], []
        seen: set[int] = set()
        for stage in self.model.stages:
            for head in (stage.gain_proj, stage.frame_gain_proj):
                if head is not None:
                    for param in head.parameters():
                        seen.add(id(param))
                        gain.append(param)
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (no_decay if isinstance(module, no_decay_types) or param.ndim < 2 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        if gain:
            groups.append({"params": gain, "weight_decay": 0.0, "lr": self.lr * self.gain_lr_scale, "name": "gain"})
        return groups

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        total = self.total_steps
        if total is None and self._trainer is not None:
            total = self.trainer.estimated_stepping_batches
        schedule = _WarmupCosine(self.warmup_steps, total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
