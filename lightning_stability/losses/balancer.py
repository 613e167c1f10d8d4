"""``LossBalancer``: EnCodec's gradient balancer, usable inside Lightning's automatic optimization."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_stability._checks import check_bool
from lightning_stability.losses._float32 import Float32Buffers
from lightning_stability.losses.weights import LossWeights

__all__ = ["BalancedLoss", "LossBalancer"]

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class BalancedLoss:
    """What :meth:`LossBalancer.forward` returns. Every tensor is on the device; nothing here synchronises.

    Attributes:
        loss: the surrogate to back-propagate (return it as ``"loss"`` from ``training_step``). Its gradient w.r.t.
            the model output is the balanced gradient ``G``; its value is ``effective_loss``.
        effective_loss: ``sum_i scale_i * loss_i`` (detached), the loss whose plain gradient would be ``G``.
        grad: ``G`` (detached), shaped like the output.
        scales: ``{name: scale_i}``, the factor each partial gradient was multiplied by.
        norms: ``{name: ||g_i||}`` of this step (averaged over ranks).
        ema_norms: ``{name: EMA(||g_i||)}`` after this step's update.
        ratios: ``{name: EMA(||g_i||) / sum_j EMA(||g_j||)}``: each loss's share of the raw gradient (audiocraft's
            ``ratio_<name>`` monitor).
        shares: ``{name: scale_i ||g_i|| / sum_j scale_j ||g_j||}``: each loss's share of the balanced gradient,
            which the weights set (``w_i / sum w`` once the EMA has settled).
    """

    loss: Tensor
    effective_loss: Tensor
    grad: Tensor
    scales: dict[str, Tensor]
    norms: dict[str, Tensor]
    ema_norms: dict[str, Tensor]
    ratios: dict[str, Tensor]
    shares: dict[str, Tensor]

    def log_dict(self, prefix: str = "balancer/") -> dict[str, Tensor]:
        """Flat ``{prefix + "ratio/<name>": ..., "share/<name>", "scale/<name>", "grad_norm/<name>"}`` for
        ``self.log_dict``."""
        out: dict[str, Tensor] = {}
        for key, values in (("ratio", self.ratios), ("share", self.shares), ("scale", self.scales)):
            out.update({f"{prefix}{key}/{name}": v for name, v in values.items()})
        out.update({f"{prefix}grad_norm/{name}": v for name, v in self.norms.items()})
        return out


def _positive(name: str, value: object) -> float:
    # the 0.2 wording ("finite and > 0"), pinned by tests; same contract as `lightning_stability._checks`
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be finite and > 0, got {value!r}")
    return value


class LossBalancer(Float32Buffers):
    r"""Set each loss's share of the gradient w.r.t. the model output (EnCodec's balancer).

    For losses :math:`\ell_i(y)` that depend on the model only through its output :math:`y`, with
    :math:`g_i = \partial \ell_i / \partial y`, the balanced gradient sent back into the model is

    .. math::

        G = \sum_i R \, \frac{w_i}{\sum_j w_j} \, \frac{g_i}{\operatorname{EMA}(\lVert g_i \rVert)}

    with :math:`R` = ``total_norm`` and the EMA (decay ``ema_decay``, bias-corrected as audiocraft's averager:
    :math:`\operatorname{EMA}_t = \sum_s \beta^{t-s} n_s / \sum_s \beta^{t-s}`) taken over steps. Each loss then
    contributes a share :math:`w_i / \sum w` of the gradient whatever its own scale, so the weights are readable as
    fractions ("mel 2 : adversarial 1" means two thirds of the gradient from mel). With ``per_batch_item`` the norm
    of :math:`g_i` is the mean over the batch of per-item norms. With ``balance_grads=False`` it is a plain weighted
    sum, :math:`G = \sum_i w_i g_i`.

    Reference: Défossez et al., "High Fidelity Neural Audio Compression" (EnCodec), 2022, §3.4, and audiocraft's
    ``audiocraft/losses/balancer.py``.

    Differences from audiocraft's ``Balancer``:

    - It works inside Lightning's automatic optimization: instead of calling ``y.backward(G)`` itself it returns a
      surrogate loss :math:`s = \langle y, G \rangle` (with :math:`G` detached, and its value replaced by the
      effective loss :math:`\sum_i \text{scale}_i \ell_i` for logging), whose gradient w.r.t. :math:`y` is exactly
      :math:`G`. Lightning's backward, AMP loss scaling (the surrogate is linear in :math:`y`), gradient
      accumulation and clipping then apply as to any loss.
    - The EMA lives in buffers (``ema_norms``, ``ema_weight``), so it is in the module's ``state_dict`` and in
      checkpoints, and a resumed run continues with the same scales (audiocraft's averager state is lost on resume).
    - Norms are averaged over ranks (weighted by batch size, as audiocraft) *before* the EMA update, so the EMA and
      the scales are identical on every rank. A non-finite norm (a NaN loss) leaves the EMA untouched (on the
      device, no host sync), so one bad step cannot poison every later step.
    - Everything stays on the device: no ``.item()`` per step.

    Usage (losses that do not go through ``y``, such as a VQ commitment loss, are added to the surrogate)::

        self.balancer = LossBalancer({"mel": 2.0, "adv": 1.0, "feat": 1.0})
        ...
        y = self.decoder(codes).float()  # compute the balanced losses from an fp32 view under fp16 AMP
        losses = {"mel": mel_loss(y, x), "adv": adv_loss(y), "feat": feat_loss(y, x)}
        out = self.balancer(losses, y)
        self.log_dict(out.log_dict())
        return {"loss": out.loss + commitment, "losses": {k: v.detach() for k, v in losses.items()}}

    Args:
        weights: name -> weight (>= 0; weight 0 terms are left out, "logged, not optimised"), or a
            :class:`LossWeights` whose current weights are read at every call.
        balance_grads: normalise the partial gradients (else a plain weighted sum).
        total_norm: :math:`R`, the norm of the balanced gradient when the partial gradients are aligned.
        ema_decay: decay :math:`\beta` of the norm EMA (1 would average over all steps).
        per_batch_item: norm per batch item, averaged over the batch (else the norm of the whole gradient).
        eps: added to the EMA norm in the denominator.

    Raises:
        TypeError / ValueError: bad arguments (named in the message).
    """

    ema_norms: Tensor
    ema_weight: Tensor

    def __init__(
        self,
        weights: Mapping[str, float] | LossWeights,
        *,
        balance_grads: bool = True,
        total_norm: float = 1.0,
        ema_decay: float = 0.999,
        per_batch_item: bool = True,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if isinstance(weights, LossWeights):
            self._live = weights
        else:
            if not isinstance(weights, Mapping):
                raise TypeError(f"`weights` must be a mapping of loss name to weight, got {type(weights).__name__}")
            self._live = LossWeights(weights)  # validates names and weights
        if not any(w > 0 for w in self._live.values()):
            raise ValueError(f"`weights` needs at least one weight > 0, got {self._live.as_dict()!r}")
        check_bool("balance_grads", balance_grads)
        check_bool("per_batch_item", per_batch_item)
        self.total_norm = _positive("total_norm", total_norm)
        ema_decay_value = _positive("ema_decay", ema_decay)
        if ema_decay_value > 1:
            raise ValueError(f"`ema_decay` must be in (0, 1], got {ema_decay!r}")
        self.ema_decay = ema_decay_value
        self.eps = _positive("eps", eps)
        self.balance_grads = balance_grads
        self.per_batch_item = per_batch_item
        self.names: tuple[str, ...] = self._live.names
        n = len(self.names)
        self.register_buffer("ema_norms", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("ema_weight", torch.zeros(n, dtype=torch.float32))
        self._warned_half = False

    @property
    def weights(self) -> dict[str, float]:
        """The current weights."""
        return self._live.as_dict()

    def extra_repr(self) -> str:
        return (
            f"weights={self.weights}, balance_grads={self.balance_grads}, total_norm={self.total_norm},"
            f" ema_decay={self.ema_decay}, per_batch_item={self.per_batch_item}"
        )

    def _norm(self, grad: Tensor) -> Tensor:
        g = grad.detach().float()
        if self.per_batch_item and g.dim() > 1:
            return torch.linalg.vector_norm(g.flatten(1), dim=1).mean()
        return torch.linalg.vector_norm(g)

    def _active(self, losses: Mapping[str, Tensor]) -> list[str]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"`losses` must be a mapping of loss name to scalar tensor, got {type(losses).__name__}")
        unknown = [k for k in losses if k not in self.names]
        if unknown:
            raise ValueError(f"`losses` has terms without a weight: {unknown}; known losses: {list(self.names)}")
        weights = self._live
        missing = [k for k in self.names if weights[k] > 0 and k not in losses]
        if missing:
            raise ValueError(f"`losses` lacks the weighted terms {missing} (it has {list(losses)})")
        for name, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss term `{name}` must be a scalar tensor, got {shape}")
        return [k for k in self.names if weights[k] > 0]

    def forward(self, losses: Mapping[str, Tensor], output: Tensor) -> BalancedLoss:
        """Balance ``losses`` (scalar tensors computed from ``output``) w.r.t. ``output``; see the class docstring.

        Under ``torch.no_grad()`` (validation) nothing is differentiated and the EMA is not updated: ``loss`` is the
        effective loss with the current scales (the plain weighted sum before the first training step).

        Raises:
            ValueError: unknown, missing or non-scalar terms; ``output`` is not a tensor; a weighted term does not
                depend on ``output``.
        """
        if not isinstance(output, Tensor):
            raise TypeError(f"`output` must be the model output tensor, got {type(output).__name__}")
        active = self._active(losses)
        index = [self.names.index(k) for k in active]
        weights = self._live
        total_weight = sum(weights[k] for k in active)
        training = torch.is_grad_enabled() and output.requires_grad
        if training and output.dtype == torch.float16 and not self._warned_half:
            self._warned_half = True
            warnings.warn(
                "LossBalancer: `output` is float16, so the partial gradients d loss_i / d output are computed in fp16"
                " without loss scaling and may underflow; compute the balanced losses from `output.float()`.",
                stacklevel=2,
            )

        grads: list[Tensor] = []
        if training:
            for name in active:
                try:
                    # Autocast off: called inside the user's autocast region (training_step), the backward would run
                    # under it too (the matmuls of a loss's fp32 island in bf16), unlike Lightning's own backward.
                    with torch.autocast(output.device.type, enabled=False):
                        (grad,) = torch.autograd.grad(losses[name], [output], retain_graph=True)
                except RuntimeError as err:
                    raise ValueError(
                        f"loss term `{name}` does not depend on `output` (or has no gradient): the balancer needs"
                        " every weighted term to be a function of the model output; add terms that are not to the"
                        " returned loss yourself"
                    ) from err
                grads.append(grad)
            norms = torch.stack([self._norm(g) for g in grads])
            count = float(output.shape[0]) if self.per_batch_item and output.dim() > 1 else 1.0
            norms = self._average_over_ranks(norms, count).to(self.ema_norms.device)
            self._update_ema(norms, index)
        else:
            norms = torch.full((len(active),), math.nan, device=self.ema_norms.device)
        # Per-term scalar ops with Python-number operands and basic indexing: no host-to-device copy, no sync.
        ema_terms, scale_terms = [], []
        for j, (i, name) in enumerate(zip(index, active)):
            weight = self.ema_weight[i]
            ema = torch.where(weight > 0, self.ema_norms[i] / weight.clamp_min(_TINY), norms[j])
            ema_terms.append(ema)
            plain = torch.full((), weights[name], dtype=torch.float32, device=ema.device)
            if self.balance_grads:
                scale = (weights[name] / total_weight * self.total_norm) / (self.eps + ema)
                # evaluated before any training step (no EMA yet): the plain weighted sum
                scale_terms.append(scale if training else torch.where(weight > 0, scale, plain))
            else:
                scale_terms.append(plain)
        ema = torch.stack(ema_terms)
        scales = torch.stack(scale_terms).to(output.device)

        values = torch.stack([losses[k].detach().reshape(()).float().to(output.device) for k in active])
        effective = (scales * values).sum()
        if training:
            balanced = torch.zeros_like(output, dtype=torch.float32)
            for scale, grad in zip(scales.unbind(), grads):
                balanced = balanced + scale * grad.float()
            surrogate = (output.float() * balanced).sum()
            loss = surrogate - surrogate.detach() + effective
            contrib = scales * norms.to(scales.device)
            shares = contrib / contrib.sum()
            grad_out = balanced.to(output.dtype)
        else:
            loss = effective
            shares = torch.full_like(scales, math.nan)
            grad_out = torch.zeros_like(output)
        ratios = ema / ema.sum()

        def by_name(t: Tensor) -> dict[str, Tensor]:
            return {k: t[j] for j, k in enumerate(active)}

        return BalancedLoss(
            loss=loss,
            effective_loss=effective.detach(),
            grad=grad_out.detach(),
            scales=by_name(scales),
            norms=by_name(norms),
            ema_norms=by_name(ema),
            ratios=by_name(ratios),
            shares=by_name(shares),
        )

    @staticmethod
    def _average_over_ranks(norms: Tensor, count: float) -> Tensor:
        """Batch-size-weighted mean of the norms over ranks (one all_reduce; identity when not distributed)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return norms
        buf = torch.cat([norms * count, norms.new_full((1,), count)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf[:-1] / buf[-1]

    @torch.no_grad()
    def _update_ema(self, norms: Tensor, index: list[int]) -> None:
        """EMA update of the active entries; an entry whose norm is not finite keeps its previous state."""
        for j, i in enumerate(index):
            norm = norms[j]
            ok = torch.isfinite(norm)
            total = self.ema_norms[i] * self.ema_decay + torch.where(ok, norm, torch.zeros_like(norm))
            weight = self.ema_weight[i] * self.ema_decay + 1.0
            self.ema_norms[i] = torch.where(ok, total, self.ema_norms[i])
            self.ema_weight[i] = torch.where(ok, weight, self.ema_weight[i])
