"""``SpectralNormInjection``: spectral norm on chosen layers of any LightningModule, without editing the model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

import lightning_stability.nn.spectral as sn
from lightning_stability._checks import check_bool, check_int
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._logging import log_scalars
from lightning_stability.callbacks._sharding import sharded_strategy
from lightning_stability.callbacks._state_key import cached_state_key

__all__ = ["SpectralNormInjection"]


class SpectralNormInjection(Callback):
    r"""Apply ``torch.nn.utils.parametrizations.spectral_norm`` to selected layers, before the optimizer exists.

    Spectral norm divides a weight by its largest singular value ``sigma`` (estimated by power iteration, see
    :mod:`lightning_stability.nn.spectral`), so the layer cannot amplify the norm of its input. docs/design.md: the
    cascade transformer's last ``output_proj`` amplified gradients until they went NaN; spectral norm on it was the fix.

    **Selection.** Modules whose qualified name (relative to the LightningModule) matches any glob in ``modules``, or
    whose class is any of ``types`` (the union). ``"*.output_proj"`` also matches a top-level ``output_proj``. Every
    pattern and every type must match at least one module, and every selected module must have a ``weight`` of >= 2
    dims (ValueError otherwise, listing module names that exist / naming the module). Transposed convolutions are
    normalised over their output-channel dim (1).

    **When.** In :meth:`setup` (any stage), on the layers that exist; and right after the LightningModule's
    ``configure_model`` (this callback wraps that hook for the duration of the call, so layers a model builds in
    ``setup`` or ``configure_model`` are covered too). Both happen before the checkpoint is restored, before the DDP
    wrap and before ``configure_optimizers``, so

    - the optimizer holds ``<layer>.parametrizations.weight.original`` (the very ``Parameter`` the layer had before);
    - ``trainer.fit(..., ckpt_path=...)`` / ``validate(..., ckpt_path=...)`` with a checkpoint written under this
      callback load, because the model already has the checkpoint's keys;
    - under DDP the ``u``/``v`` buffers are broadcast from rank 0 by the DDP wrap (and before every forward, with
      ``broadcast_buffers=True``), and since every rank updates them from identical weights they stay identical.

    **Weight norm.** Layers built with weight norm (EnCodec's and DAC's convolutions, HiFi-GAN-style discriminators:
    the legacy ``torch.nn.utils.weight_norm`` hook) get spectral norm *instead* with ``replace_weight_norm=True``:
    the weight norm is folded into a plain weight (``W = g * v / ||v||``, exactly what the layer computed) and
    removed, then spectral norm is applied to it (:func:`lightning_stability.nn.spectral.remove_weight_norm`). The
    replaced layers are listed in the ``inject`` event. Checkpoints then hold ``parametrizations.weight.original``
    (no ``weight_g``/``weight_v``); they load in a Trainer with the same callback (``ckpt_path=``), and
    :func:`lightning_stability.nn.spectral.load_with_spectral_norm` replaces the weight norm of a freshly built model
    by itself (it sees that the checkpoint has none). Without the option, a legacy weight norm is a ValueError naming
    it, and a parametrized weight norm (``torch.nn.utils.parametrizations.weight_norm``) stays, with spectral norm
    applied to its output.

    It is idempotent: a layer that already has spectral norm (a second ``setup``, a second ``fit``, a model built
    with it, or the legacy ``torch.nn.utils.spectral_norm`` hook) is left alone. At ``on_fit_start`` it checks that
    every layer the selection matches has spectral norm (RuntimeError if one appeared later, e.g. in
    ``configure_optimizers``), and warns about a trainable normalised weight that no optimizer holds.

    **Logging.** The wrapped layers are reported once (rank zero) and recorded as an ``inject`` event in
    ``event_log``. Every ``log_every_n_steps`` optimizer steps ``specnorm/<name>/sigma`` is logged: the estimate
    ``u^T W v`` of the largest singular value of the ORIGINAL weight (one matrix-vector product from the
    power-iteration buffers, no SVD). A sigma that keeps growing means the raw weight is growing while its
    normalised version stays bounded. It reads the value on the host (for the trace in ``event_log``) only at those
    steps.

    **Inference.** A checkpoint written with injection only loads into a model that has the same parametrization.
    Without a Trainer, one call does both: :meth:`load_for_inference` (the same selection as this callback) or
    :func:`lightning_stability.nn.spectral.load_with_spectral_norm` (selection read from the checkpoint)::

        model = MyModule(**hparams)
        SpectralNormInjection(modules=("*.output_proj",)).load_for_inference(model, "last.ckpt")

    Args:
        modules: glob pattern(s) of qualified module names. ``None`` (default): ``"*.output_proj"`` when no
            ``types`` are given, else none (so ``SpectralNormInjection(types=nn.ConvTranspose1d)`` selects by type
            alone).
        types: module classes (or dotted class paths such as ``"torch.nn.Linear"``) to select.
        n_power_iterations: power iterations per training forward (>= 1; torch's default 1).
        eps: numerical floor of the power iteration (> 0).
        log_every_n_steps: log ``specnorm/<name>/sigma`` every N optimizer steps; ``None``: the Trainer's
            ``log_every_n_steps``; 0: never.
        replace_weight_norm: fold and remove the weight norm of selected layers, then apply spectral norm (see
            above).

    Raises:
        TypeError: an argument of the wrong type (in ``__init__``).
        ValueError: bad argument values (in ``__init__``); a selection matching nothing or a selected module without a
            usable ``weight`` (in ``setup`` / after ``configure_model``).
        RuntimeError: a matching layer without spectral norm at ``on_fit_start``.
    """

    def __init__(
        self,
        modules: str | Iterable[str] | None = None,
        types: type | str | Iterable[type | str] = (),
        *,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        log_every_n_steps: int | None = None,
        replace_weight_norm: bool = False,
    ) -> None:
        super().__init__()
        check_bool("replace_weight_norm", replace_weight_norm)
        self.replace_weight_norm = replace_weight_norm
        self.types = sn._as_types(types)
        if modules is None:
            modules = () if self.types else ("*.output_proj",)
        self.modules = sn._as_patterns(modules)
        if not self.modules and not self.types:
            raise ValueError(
                f"nothing to select: `modules`={modules!r} and `types`={types!r} are both empty; "
                "give glob patterns in `modules` and/or module classes in `types`"
            )
        self.n_power_iterations, self.eps = sn._check_power_args(n_power_iterations, eps)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 0, allow_none=True)
        self.event_log = EventLog(source=self.state_key)
        self.selected: list[str] = []
        self.wrapped: list[str] = []
        self._sharded: str | None = None
        self._last_logged_step = -1
        self._announced = False

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(
            self,
            modules=self.modules,
            types=tuple(f"{t.__module__}.{t.__qualname__}" for t in self.types),
            n_power_iterations=self.n_power_iterations,
        )

    # -- injection ---------------------------------------------------------------------------------------------------
    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, strict: bool) -> None:
        result = sn.inject_spectral_norm(
            pl_module,
            self.modules,
            self.types,
            n_power_iterations=self.n_power_iterations,
            eps=self.eps,
            strict=strict,
            replace_weight_norm=self.replace_weight_norm,
        )
        self.selected = list(result.selected)
        if result.wrapped and self._sharded is not None:
            # no DDP wrapper broadcasts buffers under FSDP/FSDP2: start every rank's power iteration from rank 0's u/v
            _broadcast_buffers([pl_module.get_submodule(n) for n in result.wrapped])
        if result.wrapped:
            self.wrapped.extend(n for n in result.wrapped if n not in self.wrapped)
            replaced = f" (weight norm replaced on {', '.join(result.replaced_weight_norm)})"
            self.event_log.add(
                trainer.global_step,
                "inject",
                f"spectral norm applied to {len(result.wrapped)} module(s): {', '.join(result.wrapped)}"
                + (replaced if result.replaced_weight_norm else ""),
                modules=list(result.wrapped),
                replaced_weight_norm=list(result.replaced_weight_norm),
                n_power_iterations=self.n_power_iterations,
            )

    def _install_configure_model_hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the module's next ``configure_model`` call inject right after it, then remove itself."""
        had = "configure_model" in pl_module.__dict__
        saved = pl_module.__dict__.get("configure_model")

        def configure_model() -> None:
            _restore(pl_module, *configure_model._ls_saved)  # type: ignore[attr-defined]
            pl_module.configure_model()
            self._inject(trainer, pl_module, strict=True)

        # no `functools.wraps`: lightning's `is_overridden` must see a different function, so the hook is called
        configure_model._ls_owner = self  # type: ignore[attr-defined]
        configure_model._ls_saved = (had, saved)  # type: ignore[attr-defined]
        object.__setattr__(pl_module, "configure_model", configure_model)

    def _uninstall_configure_model_hook(self, pl_module: pl.LightningModule) -> None:
        """Remove this callback's pending wrapper (after an exception before ``configure_model`` ran)."""
        above = None
        current = pl_module.__dict__.get("configure_model")
        while current is not None and hasattr(current, "_ls_owner"):
            if current._ls_owner is self:
                if above is None:
                    _restore(pl_module, *current._ls_saved)
                else:
                    above._ls_saved = current._ls_saved
                return
            above = current
            had, saved = current._ls_saved
            current = saved if had else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy:
            rank_zero_warn(
                f"`SpectralNormInjection` is tested with single-device, DDP, ModelParallelStrategy (FSDP2) and FSDP "
                f"strategies; under {strategy} the power-iteration buffers and the partitioned weights are not checked."
            )
        self._sharded = sharded_strategy(trainer)
        self._inject(trainer, pl_module, strict=False)
        self._install_configure_model_hook(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        selected = sn.select_modules(pl_module, self.modules, self.types, strict=True)
        late = [name for name, m in selected.items() if not sn.has_spectral_norm(m)]
        if late:
            raise RuntimeError(
                f"`SpectralNormInjection`: module(s) {late} match the selection but have no spectral norm at fit "
                "start: they were created after `setup`/`configure_model` (e.g. in `configure_optimizers`), so the "
                "optimizer and the DDP wrapper were built without it. Create them in `__init__`, `setup` or "
                "`configure_model`."
            )
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        orphans = [
            name
            for name, m in selected.items()
            if sn._spectral_parametrization(m) is not None
            # `original`, or `original0`, `original1`... when e.g. weight norm comes first
            and any(p.requires_grad and id(p) not in held for p in m.parametrizations.weight.parameters(recurse=False))
        ]
        if trainer.optimizers and orphans:
            rank_zero_warn(
                f"`SpectralNormInjection`: no optimizer holds the trainable weight of {orphans} "
                "(`parametrizations.weight.original`); those layers will not be trained."
            )
        if not self._announced:
            self._announced = True
            rank_zero_info(
                f"SpectralNormInjection: spectral norm on {len(selected)} module(s) "
                f"(n_power_iterations={self.n_power_iterations}): {', '.join(n or '<root>' for n in selected)}"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall_configure_model_hook(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall_configure_model_hook(pl_module)

    # -- logging -----------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        step = trainer.global_step
        if not every or step % every or step == self._last_logged_step:
            return
        self._last_logged_step = step
        logged = {}
        with _whole_parameters(trainer, self._sharded):
            for name in self.selected:
                module = pl_module.get_submodule(name)
                if sn._spectral_parametrization(module) is None:  # legacy hook: no parametrization to read
                    continue
                sigma = sn.spectral_sigma(module)  # FSDP2 / DTensor: all-gathers the weight (every rank calls it)
                logged[f"specnorm/{name or 'root'}/sigma"] = sigma
                self.event_log.trace(f"{name or 'root'}/sigma", step, float(sigma))
        log_scalars(trainer, logged)

    # -- state -------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": list(self.selected),
            "wrapped": list(self.wrapped),
            "last_logged_step": self._last_logged_step,
            "event_log": self.event_log.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.selected = list(state_dict["selected"])
        self.wrapped = list(state_dict["wrapped"])
        self._last_logged_step = int(state_dict["last_logged_step"])
        self.event_log.load_state_dict(state_dict["event_log"])

    # -- inference ---------------------------------------------------------------------------------------------------
    def load_for_inference(
        self,
        model: nn.Module,
        checkpoint: str | os.PathLike | Mapping[str, Any],
        *,
        prefix: str = "",
        strict: bool = True,
        map_location: Any = "cpu",
        weights_only: bool = True,
        eval_mode: bool = True,
    ) -> nn.Module:
        """Apply this callback's selection to ``model`` and load ``checkpoint`` into it, without a Trainer.

        See :func:`lightning_stability.nn.spectral.load_with_spectral_norm` for the arguments. Returns ``model``.
        """
        return sn.load_with_spectral_norm(
            model,
            checkpoint,
            self.modules,
            self.types,
            prefix=prefix,
            n_power_iterations=self.n_power_iterations,
            eps=self.eps,
            strict=strict,
            map_location=map_location,
            weights_only=weights_only,
            eval_mode=eval_mode,
            # None: read from the checkpoint whether training replaced the weight norm (exact either way)
            replace_weight_norm=True if self.replace_weight_norm else None,
        )


def _restore(module: torch.nn.Module, had: bool, saved: Any) -> None:
    if had:
        object.__setattr__(module, "configure_model", saved)
    else:
        module.__dict__.pop("configure_model", None)


def _broadcast_buffers(modules: list[nn.Module]) -> None:
    """Copy rank 0's spectral-norm ``u``/``v`` into every rank's (the same order on every rank; meta tensors, from an
    empty-init ``configure_model``, are skipped: they get their values when the strategy materialises the module)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    nccl = dist.get_backend() == "nccl"
    for module in modules:
        param = sn._spectral_parametrization(module)
        for buf in (param._u, param._v) if param is not None else ():
            if buf.is_meta:
                continue
            if nccl and buf.device.type != "cuda":  # NCCL only moves CUDA tensors; before the move to the device
                staged = buf.to(torch.device("cuda", torch.cuda.current_device()))
                dist.broadcast(staged, src=0)
                buf.copy_(staged)
            else:
                dist.broadcast(buf, src=0)


def _whole_parameters(trainer: pl.Trainer, sharded: str | None):
    """FSDP1 keeps only a shard of each parameter outside the forward pass: gather them (read-only) for the sigma
    estimates. FSDP2 / DTensor weights are gathered by ``spectral_sigma`` itself; otherwise nothing to do."""
    if sharded != "fsdp":
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=True)
