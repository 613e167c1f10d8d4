"""``CodebookMonitor``: code usage of the vector quantizers in a user's model, and the two ways it goes wrong.

A quantizer's codes are read by a forward hook on the quantizer module (no change to the model), counted on the
device into a preallocated ``[levels, codebook_size]`` histogram (one ``bincount`` per forward, no host sync), summed
across ranks and read every ``every_n_steps`` training batches. Known quantizers are found by their class:

=============================================  ========================  ==============================================
quantizer                                      codes in its output       codebooks / dead-code expiry
=============================================  ========================  ==============================================
``lightning_stability.nn.ResidualVectorQuantizer``  ``QuantizedResult.codes`` ``layers[i].embed``; expiry when
                                               ``[B, n_q, T]``            ``dead_code_usage_ratio`` (or the absolute
                                                                          threshold) is > 0
``encodec.quantization.ResidualVectorQuantizer``  ``QuantizedResult.codes``  ``vq.layers[i]._codebook.embed``; expiry
(EnCodec; audiocraft's has the same layout)    ``[n_q, B, T]``            when ``threshold_ema_dead_code`` > 0
``vector_quantize_pytorch.VectorQuantize``     ``output[1]`` ``[B, N]``   ``_codebook.embed``; expiry when
                                               (``[B, N, heads]``)        ``threshold_ema_dead_code`` > 0
``vector_quantize_pytorch.ResidualVQ``         ``output[1]``              ``layers[i]._codebook.embed``
                                               ``[B, N, n_q]``, -1 for
                                               dropped levels
=============================================  ========================  ==============================================

Any other module is read through a :class:`QuantizerTap` (a function from the module's forward output to its codes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability._checks import check_bool, check_int, check_number
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._logging import log_scalars, logger_step
from lightning_stability.callbacks._state_key import cached_state_key

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["CodebookMonitor", "QuantizerTap"]

_COLLAPSE_ADVICE = (
    "the quantizer uses a handful of codes: check that the encoder output is not collapsed (its variance), initialise "
    "the codebook with k-means on real latents, replace dead codes with a rule relative to uniform use (Moshi: 0.1 "
    "of uniform), lower the commitment weight or the codebook learning rate"
)
_EXPIRY_ADVICE = (
    "the quantizer's dead-code expiry does not revive codes: with EMA codebooks write the replaced vector into the "
    "EMA sum too (embed_avg = vector * cluster_size; encodec issue #61), use a threshold relative to uniform use "
    "instead of an absolute count, or use lightning_stability.nn.ResidualVectorQuantizer"
)


@dataclass(frozen=True)
class QuantizerTap:
    """How :class:`CodebookMonitor` reads a quantizer it does not know (the user's protocol).

    Attributes:
        codes: ``codes(output) -> Tensor``: from the module's forward output, its integer code indices with the
            **level first**: ``[levels, ...]`` (any trailing shape; a negative index, e.g. a dropped level, is not
            counted). A one-level quantizer may return ``[...]`` with ``levels=1`` (then the whole tensor is level 0).
        codebook_size: codes per level.
        levels: number of levels (stages); a forward may return fewer (quantizer dropout): the leading ones.
        codebooks: optional ``codebooks(module) -> sequence of [codebook_size, dim] tensors``, one per level, to
            detect that the quantizer's dead-code expiry has no effect (rows that change between checks).
        expires_dead_codes: whether the quantizer claims to replace its dead codes (the expiry check runs only then,
            and only with ``codebooks``).
        kind: a label for the messages (e.g. ``"my_vq"``).
    """

    codes: Callable[[Any], Tensor]
    codebook_size: int
    levels: int = 1
    codebooks: Callable[[nn.Module], Sequence[Tensor]] | None = None
    expires_dead_codes: bool = False
    kind: str = "custom"

    def __post_init__(self) -> None:
        if not callable(self.codes):
            raise TypeError(f"QuantizerTap: `codes` must be callable, got {self.codes!r}")
        for name in ("codebook_size", "levels"):
            check_int(name, getattr(self, name), 2 if name == "codebook_size" else 1)
        if self.codebooks is not None and not callable(self.codebooks):
            raise TypeError(f"QuantizerTap: `codebooks` must be callable or None, got {self.codebooks!r}")


# ------------------------------------------------------------------------------------------- known quantizers
def _ours(module: nn.Module) -> QuantizerTap:
    layers = list(module.layers)
    return QuantizerTap(
        codes=lambda out: out.codes.transpose(0, 1),  # [B, n_q, T] -> [n_q, B, T]
        codebook_size=int(module.codebook_size),
        levels=int(module.n_q),
        codebooks=lambda m: [layer.embed for layer in m.layers],
        expires_dead_codes=any(layer._replaces_dead_codes() for layer in layers),
        kind="lightning_stability",
    )


def _encodec(module: nn.Module) -> QuantizerTap:
    layers = list(module.vq.layers)
    return QuantizerTap(
        codes=lambda out: out.codes,  # already [n_q, B, T]
        codebook_size=int(module.bins),
        levels=len(layers),
        codebooks=lambda m: [layer._codebook.embed for layer in m.vq.layers],
        expires_dead_codes=any(layer._codebook.threshold_ema_dead_code > 0 for layer in layers),
        kind="encodec",
    )


def _vqp_codebook(layer: nn.Module) -> Tensor:
    embed = layer._codebook.embed  # [heads or 1, K, D]
    return embed.reshape(-1, embed.shape[-1]) if embed.ndim == 3 and embed.shape[0] == 1 else embed.flatten(0, -2)


def _vqp_single(module: nn.Module) -> QuantizerTap:
    def codes(out: Any) -> Tensor:
        indices = out[1]  # [B, N] or [B, N, heads]
        return indices.reshape(1, -1)

    return QuantizerTap(
        codes=codes,
        codebook_size=int(module.codebook_size) * (int(getattr(module, "heads", 1)) if _separate_heads(module) else 1),
        levels=1,
        codebooks=lambda m: [_vqp_codebook(m)],
        expires_dead_codes=float(getattr(module._codebook, "threshold_ema_dead_code", 0)) > 0,
        kind="vector_quantize_pytorch",
    )


def _separate_heads(module: nn.Module) -> bool:
    return int(getattr(module, "heads", 1)) > 1 and bool(getattr(module, "separate_codebook_per_head", False))


def _vqp_residual(module: nn.Module) -> QuantizerTap:
    layers = list(module.layers)

    def codes(out: Any) -> Tensor:
        indices = out[1]  # [B, N, n_q] (levels last)
        return indices.movedim(-1, 0)

    return QuantizerTap(
        codes=codes,
        codebook_size=int(module.codebook_size),
        levels=len(layers),
        codebooks=lambda m: [_vqp_codebook(layer) for layer in m.layers],
        expires_dead_codes=any(float(getattr(la._codebook, "threshold_ema_dead_code", 0)) > 0 for la in layers),
        kind="vector_quantize_pytorch",
    )


# (module of the class, class name) -> adapter; matched on the class's MRO so subclasses are found too
_KNOWN: dict[tuple[str, str], Callable[[nn.Module], QuantizerTap]] = {
    ("lightning_stability.reference.codec.quantize", "ResidualVectorQuantizer"): _ours,
    ("lightning_stability.nn.quantize", "ResidualVectorQuantizer"): _ours,  # the path before the layout change
    ("encodec.quantization.vq", "ResidualVectorQuantizer"): _encodec,
    ("vector_quantize_pytorch.vector_quantize_pytorch", "VectorQuantize"): _vqp_single,
    ("vector_quantize_pytorch.residual_vq", "ResidualVQ"): _vqp_residual,
}


def _known_adapter(module: nn.Module) -> Callable[[nn.Module], QuantizerTap] | None:
    for cls in type(module).__mro__:
        adapter = _KNOWN.get((cls.__module__, cls.__name__))
        if adapter is not None:
            return adapter
    return None


def find_quantizers(model: nn.Module) -> dict[str, QuantizerTap]:
    """The known quantizers in ``model`` by module path (a quantizer inside another one is not listed again)."""
    found: dict[str, QuantizerTap] = {}
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in found if p):
            continue
        adapter = _known_adapter(module)
        if adapter is not None:
            found[name] = adapter(module)
    return found


# ------------------------------------------------------------------------------------------------ the callback
class _Tracked:
    """One quantizer: its tap, the device histogram and the host-side history of its checks."""

    def __init__(self, name: str, module: nn.Module, tap: QuantizerTap) -> None:
        self.name = name
        self.module = module
        self.tap = tap
        self.counts: Tensor | None = None  # [levels, K] int64 on the module's device
        self.offsets: Tensor | None = None
        self.handle: Any = None
        self.snapshot: list[Tensor] | None = None  # codebooks at the previous check
        levels = tap.levels
        self.low_streak = [0] * levels  # consecutive checks below the collapse threshold
        self.collapsed = [False] * levels
        self.dead_streak: list[Tensor | None] = [None] * levels  # per code: consecutive dead checks without a jump
        self.prev_dead: list[Tensor | None] = [None] * levels
        self.pending: list[Tensor | None] = [None] * levels  # codes replaced in the last window
        self.expiry_flagged = [False] * levels

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return  # validation, test, `encode` calls in eval mode: only training forwards are counted
        codes = self.tap.codes(output)
        if not isinstance(codes, Tensor) or codes.is_floating_point():
            raise TypeError(
                f"CodebookMonitor: the codes read from quantizer {self.name!r} ({self.tap.kind}) must be an integer "
                f"tensor, got {type(codes).__name__ if not isinstance(codes, Tensor) else codes.dtype}"
            )
        k, levels = self.tap.codebook_size, self.tap.levels
        codes = codes.detach()
        codes = codes.reshape(1, -1) if levels == 1 or codes.ndim < 2 else codes.reshape(codes.shape[0], -1)
        codes = codes.long()
        used = codes.shape[0]
        if used > levels:
            raise ValueError(
                f"CodebookMonitor: quantizer {self.name!r} returned codes for {used} levels, but its tap says "
                f"`levels`={levels}"
            )
        if self.counts is None:
            self.counts = torch.zeros(levels * k, dtype=torch.long, device=codes.device)
        elif self.counts.device != codes.device:  # a window restored from a checkpoint (on the CPU)
            self.counts = self.counts.to(codes.device)
        if self.offsets is None or self.offsets.device != codes.device:
            self.offsets = torch.arange(levels, device=codes.device)[:, None] * k
        valid = (codes >= 0) & (codes < k)
        flat = torch.where(valid, codes + self.offsets[:used], levels * k)  # invalid codes go to an extra bin
        self.counts += torch.bincount(flat.reshape(-1), minlength=levels * k + 1)[: levels * k]


class CodebookMonitor(Callback):
    r"""Code usage per quantizer level; warns when a level collapses or a quantizer's dead-code expiry does nothing.

    With no arguments it finds every known vector quantizer in the LightningModule (this package's
    ``ResidualVectorQuantizer``, EnCodec's ``ResidualVectorQuantizer``, vector-quantize-pytorch's ``VectorQuantize``
    and ``ResidualVQ``; see the module docstring for how each one's codes are read) and hooks its forward. Modules of
    other libraries are named in ``quantizers`` with a :class:`QuantizerTap`.

    Codes are counted in training forwards only (the module in ``train()`` mode), on the device. Every
    ``every_n_steps`` training batches the histograms are summed over ranks (one ``all_reduce``), read to the host
    (one sync) and reset. Per level :math:`l` with counts :math:`n_k` over that window, :math:`N = \sum_k n_k`,
    :math:`p_k = n_k / N`:

    - ``perplexity`` :math:`= \exp(-\sum_k p_k \log p_k)`, the effective number of codes in use (1 to ``K``);
    - ``entropy`` :math:`= -\sum_k p_k \log p_k / \log K` (1 for uniform use);
    - ``dead_fraction``: the fraction of codes with :math:`n_k < \text{dead\_usage\_ratio} \cdot N / K`, a fraction
      of uniform use as in Moshi's dead-code rule, so it does not depend on the batch size or the window.

    They are logged as ``codebook/<quantizer>/level_<i>/perplexity`` (``.../entropy``, ``.../dead_fraction``), where
    ``<quantizer>`` is the module's path in the LightningModule, traced into ``self.event_log`` under the same names
    (without ``codebook/``), and, every ``image_every_n_checks`` checks, a picture of the code usage (levels x codes,
    log scale) goes to a ``WandbLogger`` (``codebook/<quantizer>/usage``) or ``TensorBoardLogger``.

    Findings (a ``rank_zero_warn``, an event in ``self.event_log`` with ``data["advice"]``, which
    :class:`~lightning_stability.callbacks.StabilityReport` turns into a recommendation):

    - ``"codebook_collapse"``: a level's perplexity stays below ``collapse_ratio * K`` for ``window`` consecutive
      checks (once per episode: a level that recovers above the threshold is armed again);
    - ``"expiry_ineffective"``: the quantizer expires dead codes (its own setting) but at least
      ``expiry_dead_fraction`` of a level's codes are dead at a check and either were replaced since the previous
      check and are dead again (a replaced row is one that moved by more than ``jump_tolerance`` times the mean row
      norm while dead) or have been dead for ``expiry_window`` checks without ever being replaced: the EnCodec bug
      (encodec issue #61), where the EMA update overwrites the replacement in the same forward. Needs the codebook
      tensors (known quantizers, or a tap with ``codebooks``); ``expiry_window`` must exceed the quantizer's own
      expiry horizon (an EMA code unused for ``ln(threshold) / (1 - decay)`` steps, about 230 at Moshi's defaults).

    Args:
        quantizers: extra (or overriding) quantizers by module path (``""`` is the LightningModule itself):
            ``{"model.vq": QuantizerTap(codes=lambda out: out[1].movedim(-1, 0), codebook_size=1024, levels=8)}``.
        auto_detect: also find the known quantizers.
        every_n_steps: training batches per check (and per logged point).
        collapse_ratio: a level whose perplexity is below this fraction of its codebook size is collapsing.
        dead_usage_ratio: a code used less than this fraction of uniform use in a window is dead.
        window: consecutive collapsing checks before ``"codebook_collapse"``.
        expiry_window: consecutive dead checks without a replacement before ``"expiry_ineffective"``.
        expiry_dead_fraction: the fraction of a level's codes that must be affected for ``"expiry_ineffective"``.
        jump_tolerance: a dead code's row that moves by more than this times the mean row norm was replaced.
        image_every_n_checks: checks between usage pictures (0: none).
        prefix: key prefix of the logged scalars.

    Raises:
        TypeError, ValueError: bad arguments; at setup, a ``quantizers`` path that is not a module of the model.
    """

    def __init__(
        self,
        *,
        quantizers: Mapping[str, QuantizerTap] | None = None,
        auto_detect: bool = True,
        every_n_steps: int = 50,
        collapse_ratio: float = 0.1,
        dead_usage_ratio: float = 0.1,
        window: int = 3,
        expiry_window: int = 6,
        expiry_dead_fraction: float = 0.25,
        jump_tolerance: float = 0.25,
        image_every_n_checks: int = 10,
        prefix: str = "codebook/",
    ) -> None:
        if quantizers is not None:
            if not isinstance(quantizers, Mapping):
                raise TypeError(f"`quantizers` must be a mapping of module path to QuantizerTap, got {quantizers!r}")
            for path, tap in quantizers.items():
                if not isinstance(path, str):
                    raise TypeError(f"`quantizers` keys must be module paths (str), got {path!r}")
                if not isinstance(tap, QuantizerTap):
                    raise TypeError(f"`quantizers[{path!r}]` must be a QuantizerTap, got {tap!r}")
        check_bool("auto_detect", auto_detect)
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1),
            ("window", window, 1),
            ("expiry_window", expiry_window, 1),
            ("image_every_n_checks", image_every_n_checks, 0),
        ):
            check_int(name, value, low)
        for name, value in (
            ("collapse_ratio", collapse_ratio),
            ("dead_usage_ratio", dead_usage_ratio),
            ("expiry_dead_fraction", expiry_dead_fraction),
            ("jump_tolerance", jump_tolerance),
        ):
            check_number(name, value, minimum=0, exclusive=True, maximum=None if name == "jump_tolerance" else 1)
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {prefix!r}")
        self.quantizers = dict(quantizers or {})
        self.auto_detect = auto_detect
        self.every_n_steps = every_n_steps
        self.collapse_ratio = float(collapse_ratio)
        self.dead_usage_ratio = float(dead_usage_ratio)
        self.window = window
        self.expiry_window = expiry_window
        self.expiry_dead_fraction = float(expiry_dead_fraction)
        self.jump_tolerance = float(jump_tolerance)
        self.image_every_n_checks = image_every_n_checks
        self.prefix = prefix
        self.event_log = EventLog(source=self.state_key)
        self.tracked: dict[str, _Tracked] = {}
        self.last_values: dict[str, float] = {}
        self._batches = 0
        self._checks = 0
        self._restored: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self, prefix=self.prefix)

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        taps = find_quantizers(pl_module) if self.auto_detect else {}
        modules = dict(pl_module.named_modules())
        for path, tap in self.quantizers.items():
            if path not in modules:
                raise ValueError(
                    f"CodebookMonitor: `quantizers` names {path!r}, which is not a module of "
                    f"{type(pl_module).__name__} (e.g. {sorted(p for p in modules if p)[:5]})"
                )
            taps[path] = tap
        self.tracked = {}
        for path, tap in taps.items():
            tracked = _Tracked(path or type(pl_module).__name__, modules[path], tap)
            tracked.handle = modules[path].register_forward_hook(tracked.hook)
            self.tracked[tracked.name] = tracked
        self._apply_restored()
        if not self.tracked:
            rank_zero_info(
                f"CodebookMonitor: no known vector quantizer in {type(pl_module).__name__}; name yours with "
                "`CodebookMonitor(quantizers={'path.to.module': QuantizerTap(...)})`"
            )
        self._image_loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for tracked in self.tracked.values():
            if tracked.handle is not None:
                tracked.handle.remove()
                tracked.handle = None

    # ---------------------------------------------------------------------------------------------- training
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking or not self.tracked:
            return
        self._batches += 1
        if self._batches % self.every_n_steps == 0:
            self.check(trainer)

    def check(self, trainer: pl.Trainer | None = None) -> dict[str, float]:
        """Read the histograms (summed over ranks), log, decide, reset; returns the logged values.

        Called every ``every_n_steps`` training batches; collective under DDP (every rank calls it at the same
        batch).
        """
        tracked = list(self.tracked.values())
        ready = [t for t in tracked if t.counts is not None]
        values: dict[str, float] = {}
        if not ready:
            return values
        step = logger_step(trainer) if trainer is not None else self._batches
        packed = torch.cat([t.counts.to(ready[0].counts.device) for t in ready])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        host = packed.cpu()  # the one host read of the window
        offset = 0
        self._checks += 1
        for t in ready:
            k, levels = t.tap.codebook_size, t.tap.levels
            counts = host[offset : offset + levels * k].view(levels, k).double()
            offset += levels * k
            t.counts.zero_()
            codebooks = self._codebooks(t)
            usage = []
            for level in range(levels):
                row = counts[level]
                total = float(row.sum())
                if total <= 0:
                    usage.append(None)
                    continue  # a level no forward used in this window (quantizer dropout)
                p = row / total
                entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
                perplexity = math.exp(entropy)
                dead = row < self.dead_usage_ratio * total / k
                base = f"{t.name}/level_{level}"
                level_values = {
                    "perplexity": perplexity,
                    "entropy": entropy / math.log(k),
                    "dead_fraction": float(dead.double().mean()),
                }
                for key, value in level_values.items():
                    values[f"{self.prefix}{base}/{key}"] = value
                    self.event_log.trace(f"{base}/{key}", step, value)
                self._collapse(t, level, perplexity, step)
                if codebooks is not None and t.tap.expires_dead_codes and level < len(codebooks):
                    self._expiry(t, level, dead, codebooks, step)
                usage.append(row)
            if codebooks is not None:
                t.snapshot = [c.detach().float().clone() for c in codebooks]
            if (
                self.image_every_n_checks
                and self._image_loggers
                and trainer is not None
                and trainer.is_global_zero
                and (self._checks - 1) % self.image_every_n_checks == 0
            ):
                self._log_image(t, counts, step)
        self.last_values = values
        if trainer is not None:
            log_scalars(trainer, values, step=step)
        return values

    def _codebooks(self, t: _Tracked) -> list[Tensor] | None:
        if t.tap.codebooks is None:
            return None
        return [c.detach() for c in t.tap.codebooks(t.module)]

    def _collapse(self, t: _Tracked, level: int, perplexity: float, step: int) -> None:
        k = t.tap.codebook_size
        if perplexity >= self.collapse_ratio * k:
            t.low_streak[level] = 0
            t.collapsed[level] = False
            return
        t.low_streak[level] += 1
        if t.low_streak[level] >= self.window and not t.collapsed[level]:
            t.collapsed[level] = True
            reason = (
                f"quantizer {t.name!r} ({t.tap.kind}) level {level} collapsed: perplexity {perplexity:.3g} of "
                f"{k} codes (below {self.collapse_ratio:g} x {k}) for {t.low_streak[level]} checks"
            )
            self.event_log.add(
                step,
                "codebook_collapse",
                reason,
                quantizer=t.name,
                level=level,
                perplexity=perplexity,
                codebook_size=k,
                advice=_COLLAPSE_ADVICE,
            )
            rank_zero_warn(f"CodebookMonitor: {reason}; {_COLLAPSE_ADVICE}.")

    def _expiry(self, t: _Tracked, level: int, dead: Tensor, codebooks: list[Tensor], step: int) -> None:
        k = t.tap.codebook_size
        now = codebooks[level].detach().float().cpu()
        prev_dead = t.prev_dead[level]
        if t.snapshot is None or prev_dead is None or t.snapshot[level].shape != now.shape:
            jumped = torch.zeros(k, dtype=torch.bool)
        else:
            before = t.snapshot[level].cpu()
            scale = before.norm(dim=1).mean().clamp(min=1e-12)
            jumped = ((now - before).norm(dim=1) > self.jump_tolerance * scale) & prev_dead
        pending = t.pending[level]
        redead = (pending & dead) if pending is not None else torch.zeros(k, dtype=torch.bool)
        streak = t.dead_streak[level]
        streak = torch.zeros(k, dtype=torch.long) if streak is None else streak
        streak = torch.where(dead & ~jumped, streak + 1, torch.zeros_like(streak))
        stuck = streak >= self.expiry_window
        t.dead_streak[level] = streak
        t.pending[level] = jumped
        t.prev_dead[level] = dead
        affected = redead | stuck
        fraction = float(affected.double().mean())
        if fraction < self.expiry_dead_fraction:
            t.expiry_flagged[level] = False
            return
        if t.expiry_flagged[level]:
            return
        t.expiry_flagged[level] = True
        n_redead, n_stuck = int(redead.sum()), int((stuck & ~redead).sum())
        reason = (
            f"quantizer {t.name!r} ({t.tap.kind}) level {level}: its dead-code expiry has no effect: "
            f"{n_redead} codes replaced since the last check are dead again and {n_stuck} have stayed dead for "
            f"{self.expiry_window} checks since their last replacement, if any ({fraction:.0%} of {k})"
        )
        self.event_log.add(
            step,
            "expiry_ineffective",
            reason,
            quantizer=t.name,
            level=level,
            replaced_dead_again=n_redead,
            never_replaced=n_stuck,
            codebook_size=k,
            advice=_EXPIRY_ADVICE,
        )
        rank_zero_warn(f"CodebookMonitor: {reason}; {_EXPIRY_ADVICE}.")

    def _log_image(self, t: _Tracked, counts: Tensor, step: int) -> None:
        image = render_usage(counts, title=f"{t.name}: code usage at step {step}")
        key = f"{self.prefix}{t.name}/usage"
        for logger in self._image_loggers:
            try:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key, [image], step=step)
                else:
                    logger.experiment.add_image(key, image, step, dataformats="HWC")
            except Exception as err:  # a picture is a convenience: never stop training for it
                rank_zero_warn(f"CodebookMonitor: logging the usage picture failed ({err!r})")

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        per = {}
        for name, t in self.tracked.items():
            per[name] = {
                "low_streak": list(t.low_streak),
                "collapsed": list(t.collapsed),
                "expiry_flagged": list(t.expiry_flagged),
                "dead_streak": [None if s is None else s.tolist() for s in t.dead_streak],
                "prev_dead": [None if s is None else s.tolist() for s in t.prev_dead],
                "pending": [None if s is None else s.tolist() for s in t.pending],
                "snapshot": None if t.snapshot is None else [s.cpu() for s in t.snapshot],
                # the window in progress (this process's counts): a checkpoint between two checks resumes it
                "counts": None if t.counts is None else t.counts.cpu(),
            }
        return {
            "event_log": self.event_log.state_dict(),
            "batches": self._batches,
            "checks": self._checks,
            "quantizers": per or dict(self._restored),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.event_log.load_state_dict(state_dict["event_log"])
        self._batches = int(state_dict["batches"])
        self._checks = int(state_dict["checks"])
        self._restored = dict(state_dict.get("quantizers", {}))
        self._apply_restored()

    def _apply_restored(self) -> None:
        """Give the hooked quantizers the history a checkpoint carried (at setup or at load, whichever is later)."""
        for name, saved in list(self._restored.items()):
            t = self.tracked.get(name)
            if t is None:
                continue
            t.low_streak = [int(x) for x in saved["low_streak"]]
            t.collapsed = [bool(x) for x in saved["collapsed"]]
            t.expiry_flagged = [bool(x) for x in saved["expiry_flagged"]]
            t.dead_streak = [None if s is None else torch.tensor(s, dtype=torch.long) for s in saved["dead_streak"]]
            t.prev_dead = [None if s is None else torch.tensor(s, dtype=torch.bool) for s in saved["prev_dead"]]
            t.pending = [None if s is None else torch.tensor(s, dtype=torch.bool) for s in saved["pending"]]
            t.snapshot = None if saved["snapshot"] is None else [s.clone() for s in saved["snapshot"]]
            counts = saved.get("counts")
            # a checkpoint holds rank 0's part of the window: every rank restoring it would count it world-size times
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            t.counts = counts.clone() if counts is not None and rank == 0 else None
            del self._restored[name]


def render_usage(counts: Tensor, *, title: str = ""):
    """Code usage ``[levels, K]`` as an image (``uint8 [H, W, 3]``): log10 of counts + 1, one row per level."""
    from lightning_stability.callbacks._report_plot import _figure, _to_rgb

    data = torch.log10(counts.double().cpu() + 1.0).numpy()
    fig = _figure(6.0, 1.2 + 0.35 * data.shape[0])
    ax = fig.subplots()
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
    ax.set_xlabel("code")
    ax.set_ylabel("level")
    fig.colorbar(image, ax=ax, label="log10(uses + 1)")
    if title:
        ax.set_title(title)
    return _to_rgb(fig)
