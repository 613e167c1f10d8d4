"""The loss-weight protocol: one mapping from loss name to weight, shared by a module and the callbacks that tune it.

A LightningModule keeps a :class:`LossWeights` as ``self.loss_weights`` and combines its unweighted loss terms with
it (``docs/design.md``, "The loss dict")::

    class MyCodec(pl.LightningModule):
        def __init__(self, loss_weights: dict[str, float] = {"mel": 2.5, "l1": 1.0, "sisnr": 0.0}):
            super().__init__()
            self.save_hyperparameters()
            self.loss_weights = LossWeights(loss_weights)

        def training_step(self, batch, batch_idx):
            y_hat = self(batch)
            losses = {
                "mel": self.mel_loss(y_hat, batch),
                "l1": (y_hat - batch).abs().mean(),
                # weight 0: evaluated under no_grad, logged, not optimised
                "sisnr": self.loss_weights.compute("sisnr", self.sisnr_loss, y_hat, batch),
            }
            total = self.loss_weights.weighted_sum(losses)
            return {"loss": total, "losses": {k: v.detach() for k, v in losses.items()}}

A callback such as ``AdaptiveLossWeight`` changes ``loss_weights[name]`` between steps and may register a per-step
spike damping for a term (:meth:`LossWeights.register_damping`), which :meth:`LossWeights.weighted_sum` applies on
the device to the same step's term, before backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_stability._checks import check_number_mapping, check_positive

__all__ = ["LossWeights", "SpikeDamping"]


@dataclass
class SpikeDamping:
    """Per-step damping of one loss term, computed on the device from the term's own value.

    With ``ref`` the reference level of the term (a running average kept by the owner of this object as a 0-dim
    tensor on the module's device, updated in place; ``>= 0``) and ``r = max_ratio``::

        ratio  = loss / ref
        factor = r / ratio   if loss > r * ref    (the term is capped at r * ref)
                 1           otherwise, and when there is no reference yet (ref is NaN or +inf) or the loss is NaN
                             (a non-finite loss is left for a gradient guard to handle)

    The factor is computed from the detached loss, so the damped term's gradient is the original gradient times
    ``factor``. ``enabled`` lets the owner switch the damping off (e.g. during validation) without unregistering it.
    ``last_factor`` holds the factor of the last :meth:`LossWeights.weighted_sum` call (a device tensor; reading it as
    a Python number synchronises with the device).
    """

    reference: Tensor
    max_ratio: float
    enabled: bool = True
    last_factor: Tensor | None = None

    def factor(self, loss: Tensor) -> Tensor:
        """Damping factor (fp32, on ``loss``'s device) for this step's value of the term. No host synchronisation."""
        value = loss.detach().float()
        limit = self.reference.detach().float() * self.max_ratio
        # value > limit is False for a NaN/inf reference (no reference yet) and for a NaN loss; when it is True,
        # value > limit >= 0, so the division is well defined.
        return torch.where(value > limit, limit / value, 1.0)


def _no_tensors(weights: Any) -> Any:
    """``weights`` unchanged; a ``TypeError`` (with the reason) for a tensor weight: a tensor would need a host
    synchronisation to validate, so the weights are Python floats."""
    if isinstance(weights, Mapping):
        for name, value in weights.items():
            if isinstance(value, Tensor):
                raise TypeError(
                    f"`{name}` must be a number (a Python float: a tensor would need a host synchronisation to"
                    f" validate), got {value!r}"
                )
    return weights


def _check_weights(weights: Any, *, allow_empty: bool = False) -> dict[str, float]:
    """``weights`` as a ``dict`` of names (non-empty strings) to finite floats ``>= 0``; an entry is named by its loss
    name in the messages (``"`mel` must be a finite number >= 0, got -1.0"``), which is also what a module that
    passes its own argument (``loss_weights``) on to ``LossWeights`` shows its user."""
    return check_number_mapping("weights", _no_tensors(weights), minimum=0, allow_empty=allow_empty, entry="{key}")


class LossWeights(Mapping[str, float]):
    """Name -> weight of a module's loss terms, plus the per-step damping that callbacks register.

    ``weighted_sum(losses) = sum_i w_i * d_i * losses[i]`` over the terms with ``w_i > 0``, where ``d_i`` is the
    damping factor of term ``i`` (:class:`SpikeDamping`, 1 when none is registered). Terms of weight 0 are
    "computed and logged, not optimised" (audiocraft's convention): they are left out of the sum (so a NaN in a purely
    diagnostic term cannot poison the total) and :meth:`compute` / :meth:`maybe_no_grad` evaluate them under
    ``torch.no_grad()``.

    Design choice -- a plain object, not an ``nn.Module``:

    - Weights are Python floats. ``tensor * float`` needs no device memory and no host synchronisation, and a weight
      change is a plain assignment, never a host-to-device copy inside the step.
    - The weights are not in the model's ``state_dict``. They are training configuration (the module's
      hyperparameters) or controller state, and the controller that changes them (``AdaptiveLossWeight``) saves them
      in its own callback state and writes them back on resume. A checkpoint made with or without an adaptive
      weight therefore loads into the same model under ``strict=True``, and DDP's buffer broadcast (rank 0's buffers
      copied into every rank at each forward) never overwrites them. Use :meth:`state_dict` /
      :meth:`load_state_dict` (e.g. from ``on_save_checkpoint``/``on_load_checkpoint``) to persist weights changed by
      hand.
    - The damping reference tensors belong to the callback that registers them; it creates them on the module's
      device once the model is placed (``on_train_start``), so nothing here needs ``.to(device)``.
    - It pickles (``ddp_spawn``) and deep-copies as plain data, and it is a ``Mapping``, so ``dict(loss_weights)`` and
      ``save_hyperparameters`` of the plain dict it was built from both work; with LightningCLI, give the module a
      ``dict[str, float]`` argument and build the ``LossWeights`` inside.

    Args:
        weights: loss name -> weight (finite, >= 0). The set of names is fixed: every later lookup, assignment or
            ``weighted_sum`` term must use one of them.

    Raises:
        TypeError: ``weights`` is not a mapping, a name is not a string or a weight is not a real number (a tensor
            included).
        ValueError: ``weights`` is empty, a name is the empty string, or a weight is negative or not finite.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        if isinstance(weights, LossWeights):
            weights = weights.as_dict()
        self._weights: dict[str, float] = _check_weights(weights)
        self._damping: dict[str, SpikeDamping] = {}

    # --- mapping protocol ------------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The loss names, in construction order."""
        return tuple(self._weights)

    def _check_known(self, name: Any) -> str:
        if name not in self._weights:
            raise ValueError(f"unknown loss name {name!r}; known losses: {list(self._weights)}")
        return name

    def __getitem__(self, name: str) -> float:
        return self._weights[self._check_known(name)]

    def get(self, name: str, default: float | None = None) -> float | None:  # type: ignore[override]
        return self._weights.get(name, default)

    def __setitem__(self, name: str, value: float) -> None:
        self._weights[self._check_known(name)] = _check_weights({name: value})[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, name: object) -> bool:
        return name in self._weights

    def __repr__(self) -> str:
        damped = f", damping={sorted(self._damping)}" if self._damping else ""
        return f"{type(self).__name__}({self._weights!r}{damped})"

    def as_dict(self) -> dict[str, float]:
        """A copy of name -> weight."""
        return dict(self._weights)

    def update(self, weights: Mapping[str, float]) -> None:
        """Set several weights at once; all are validated before any is changed."""
        checked = _check_weights(weights, allow_empty=True)
        for name in checked:
            self._check_known(name)
        self._weights.update(checked)

    # --- weight 0: computed and logged, not optimised ---------------------------------------------------------------
    def is_optimised(self, name: str) -> bool:
        """Whether term ``name`` contributes to the gradient (its weight is > 0)."""
        return self[name] > 0

    def maybe_no_grad(self, name: str) -> contextlib.AbstractContextManager:
        """Context in which to compute term ``name``: ``torch.no_grad()`` when its weight is 0, else a no-op."""
        return contextlib.nullcontext() if self.is_optimised(name) else torch.no_grad()

    def compute(self, name: str, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """``fn(*args, **kwargs)``, evaluated under ``torch.no_grad()`` when the weight of ``name`` is 0.

        A term of weight 0 then costs no autograd memory and cannot leak a gradient, but its value is still there
        to log.
        """
        with self.maybe_no_grad(name):
            return fn(*args, **kwargs)

    # --- damping ----------------------------------------------------------------------------------------------------
    def register_damping(self, name: str, reference: Tensor, max_ratio: float) -> SpikeDamping:
        """Damp term ``name`` whenever it exceeds ``max_ratio * reference`` (see :class:`SpikeDamping`).

        ``reference`` is a 0-dim tensor the caller keeps on the module's device and updates in place (``fill_``),
        so :meth:`weighted_sum` reads the current level without any host synchronisation. Registering again for the
        same name replaces the previous damping. Returns the :class:`SpikeDamping`, whose ``enabled`` flag and
        ``last_factor`` the caller may use.
        """
        self._check_known(name)
        if not isinstance(reference, Tensor) or reference.numel() != 1:
            error = ValueError if isinstance(reference, Tensor) else TypeError
            raise error(f"`reference` of the damping for `{name}` must be a one-element tensor, got {reference!r}")
        max_ratio = check_positive("max_ratio", max_ratio)
        damping = SpikeDamping(reference=reference, max_ratio=max_ratio)
        self._damping[name] = damping
        return damping

    def remove_damping(self, name: str, damping: SpikeDamping | None = None) -> None:
        """Remove the damping of ``name`` (only if it is ``damping``, when given); a no-op if there is none."""
        current = self._damping.get(name)
        if current is not None and (damping is None or current is damping):
            del self._damping[name]

    def damping(self, name: str) -> SpikeDamping | None:
        """The damping registered for ``name``, if any."""
        self._check_known(name)
        return self._damping.get(name)

    # --- combination -------------------------------------------------------------------------------------------------
    def weighted_terms(self, losses: Mapping[str, Tensor], *, allow_missing: bool = False) -> dict[str, Tensor]:
        """``{name: w * d * loss}`` for every term of ``losses`` with weight > 0 (damping ``d`` applied).

        Terms are promoted to at least fp32 so a half-precision loss is not weighted in half precision.

        Raises:
            ValueError: ``losses`` names a loss without a weight (the message lists the known names), a term is not a
                one-element tensor, or (unless ``allow_missing``) a term with a weight > 0 is absent.
            TypeError: a term is not a tensor.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(f"`losses` must be a mapping of loss name to tensor, got {type(losses).__name__}")
        unknown = [name for name in losses if name not in self._weights]
        if unknown:
            raise ValueError(f"`losses` has terms without a weight: {unknown}; known losses: {list(self._weights)}")
        if not allow_missing:
            missing = [n for n, w in self._weights.items() if w > 0 and n not in losses]
            if missing:
                raise ValueError(
                    f"`losses` lacks the weighted terms {missing} (it has {list(losses)});"
                    " pass `allow_missing=True` if they are computed only on some steps"
                )
        terms: dict[str, Tensor] = {}
        for name, loss in losses.items():
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss term `{name}` must be a tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"loss term `{name}` must be a scalar tensor, got shape {tuple(loss.shape)}")
            weight = self._weights[name]
            if weight == 0:
                continue
            term = loss.reshape(())
            if term.dtype in (torch.float16, torch.bfloat16):
                term = term.float()
            damping = self._damping.get(name)
            if damping is not None and damping.enabled:
                factor = damping.factor(term)
                damping.last_factor = factor
                term = term * factor
            terms[name] = term * weight
        return terms

    def weighted_sum(self, losses: Mapping[str, Tensor], *, allow_missing: bool = False) -> Tensor:
        """``sum_i w_i * d_i * losses[i]`` over the terms with weight > 0 (see :meth:`weighted_terms`).

        No host synchronisation: weights are Python floats and the damping factors are device tensors.
        Returns a 0-dim tensor on the device of the first term (zero when every given term has weight 0).
        """
        terms = self.weighted_terms(losses, allow_missing=allow_missing)
        if not terms:
            first = next(iter(losses.values()), None)
            device = first.device if isinstance(first, Tensor) else None
            return torch.zeros((), device=device)
        first, *rest = terms.values()
        total = first
        for term in rest:
            total = total + term
        return total

    # --- persistence --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, float]:
        """The weights (damping is runtime state of the callbacks that registered it and is not included)."""
        return self.as_dict()

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore weights saved by :meth:`state_dict`; names must be known."""
        self.update(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"_weights": dict(self._weights), "_damping": dict(self._damping)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._weights = dict(state["_weights"])
        self._damping = dict(state.get("_damping", {}))
