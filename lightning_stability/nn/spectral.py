"""Spectral normalisation of selected sub-modules of any model, and loading checkpoints written with it.

Spectral norm (Miyato et al. 2018, "Spectral Normalization for Generative Adversarial Networks") replaces a weight
``W`` by ``W / sigma(W)``, where ``sigma(W)`` is the largest singular value of ``W`` reshaped to a matrix
``[out, -1]`` (``[in, -1]`` for transposed convolutions, whose output channels are dim 1). ``sigma`` is estimated by
power iteration on two buffers ``u`` and ``v`` (one iteration per training forward):

.. math::

    u \\leftarrow \\frac{W v}{\\lVert W v \\rVert}, \\qquad v \\leftarrow \\frac{W^\\top u}{\\lVert W^\\top u \\rVert},
    \\qquad \\sigma(W) \\approx u^\\top W v

A layer whose weight has ``sigma <= 1`` cannot amplify its input's norm, which is what stopped the cascade
transformer's last ``output_proj`` from amplifying gradients to NaN (``docs/design.md``, post-mortem 3).

Everything here uses torch's own parametrization (``torch.nn.utils.parametrizations.spectral_norm``), so a wrapped
module's ``state_dict`` has the keys ``<name>.parametrizations.weight.original`` (the trainable parameter, the same
``Parameter`` object the module had before, so an optimizer built earlier still holds it) and
``<name>.parametrizations.weight.0._u`` / ``._v``. A checkpoint written that way only loads into a model that has the
same parametrization: :func:`load_with_spectral_norm` is the one call that does both.

Layers built with weight norm (EnCodec's and DAC's convolutions, HiFi-GAN-style discriminators use the legacy
``torch.nn.utils.weight_norm`` hook) get spectral norm *instead* with ``replace_weight_norm=True``: the weight norm
is folded into a plain weight (``W = g * v / ||v||``, the very weight the layer computed) and removed, then spectral
norm is applied to that weight (:func:`remove_weight_norm`). A parametrized weight norm
(``torch.nn.utils.parametrizations.weight_norm``) composes with spectral norm when it is not replaced.

Plain torch; nothing here imports lightning.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, spectral_norm

from lightning_stability._checks import check_bool, check_int, check_patterns, check_positive

__all__ = [
    "InjectionResult",
    "has_spectral_norm",
    "has_weight_norm",
    "inject_spectral_norm",
    "load_with_spectral_norm",
    "remove_weight_norm",
    "select_modules",
    "spectral_norm_dim",
    "spectral_norm_modules_in",
    "spectral_sigma",
]

_MAX_LISTED = 20
_SN_KEY = re.compile(r"^(?:(?P<name>.*)\.)?parametrizations\.weight\.(?P<index>\d+)\._u$")


@dataclass(frozen=True)
class InjectionResult:
    """What :func:`inject_spectral_norm` did.

    Attributes:
        selected: qualified names of every module the selection matched (all of them have spectral norm now).
        wrapped: the subset that got spectral norm in this call (the others already had it).
        replaced_weight_norm: the subset of ``wrapped`` whose weight norm was folded and removed first.
    """

    selected: tuple[str, ...]
    wrapped: tuple[str, ...]
    replaced_weight_norm: tuple[str, ...] = ()


# -- argument normalisation --------------------------------------------------------------------------------------------


def _as_patterns(modules: str | Iterable[str] | None) -> tuple[str, ...]:
    return () if modules is None else check_patterns("modules", modules, noun="glob pattern")


def _resolve_type(t: Any) -> type[nn.Module]:
    if isinstance(t, str):  # "torch.nn.Linear", as a config file would spell it
        module_name, _, attr = t.rpartition(".")
        try:
            t = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"`types` entry {t!r} is not an importable class path such as 'torch.nn.Linear'") from None
    if not (isinstance(t, type) and issubclass(t, nn.Module)):
        raise TypeError(f"`types` must contain subclasses of `torch.nn.Module`, got {t!r}")
    return t


def _as_types(types: type | str | Iterable[type | str] | None) -> tuple[type[nn.Module], ...]:
    if types is None:
        return ()
    if isinstance(types, (type, str)):
        types = (types,)
    try:
        items = tuple(types)
    except TypeError:
        raise TypeError(f"`types` must be a module class or a sequence of them, got {types!r}") from None
    return tuple(_resolve_type(t) for t in items)


def _check_power_args(n_power_iterations: Any, eps: Any) -> tuple[int, float]:
    return check_int("n_power_iterations", n_power_iterations, 1), check_positive("eps", eps)


def _describe(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


# -- selection ---------------------------------------------------------------------------------------------------------


def _is_parametrization_internal(name: str, module: nn.Module) -> bool:
    return "parametrizations" in name.split(".") or isinstance(module, (parametrize.ParametrizationList, _SpectralNorm))


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if not _is_parametrization_internal(n, m)}


def _matches(pattern: str, name: str) -> bool:
    # "*.output_proj" also matches a top-level "output_proj"
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase("." + name, pattern)


def select_modules(
    model: nn.Module,
    modules: str | Iterable[str] | None = (),
    types: type | str | Iterable[type | str] | None = (),
    *,
    strict: bool = True,
) -> dict[str, nn.Module]:
    """Sub-modules of ``model`` whose qualified name matches any glob pattern in ``modules`` or whose class is any of
    ``types`` (the union of both selections), in ``named_modules()`` order.

    Patterns use :mod:`fnmatch` (``*`` also matches dots); a leading ``*.`` also matches a top-level module
    (``"*.output_proj"`` selects ``output_proj`` and ``stages.2.output_proj``). The root module is named ``""``.
    torch's own parametrization containers are never selected.

    Args:
        strict: raise if a pattern or a type selects nothing (a typo would otherwise silently select nothing).

    Raises:
        ValueError: (``strict``) a pattern or type that matches no module; the message lists module names that exist.
    """
    patterns, classes = _as_patterns(modules), _as_types(types)
    if not patterns and not classes:
        raise ValueError("nothing to select: give glob patterns in `modules` and/or module classes in `types`")
    candidates = _candidate_modules(model)
    selected: dict[str, nn.Module] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if _matches(pattern, n)]
        if not hits:
            unmatched.append(f"pattern {pattern!r}")
        selected.update((n, candidates[n]) for n in hits)
    for cls in classes:
        hits = [n for n, m in candidates.items() if isinstance(m, cls)]
        if not hits:
            unmatched.append(f"type {cls.__module__}.{cls.__qualname__}")
        selected.update((n, candidates[n]) for n in hits)
    if strict and unmatched:
        names = [n for n in candidates if n]
        raise ValueError(
            f"spectral norm selection: {', '.join(unmatched)} matched no module of {type(model).__name__}. "
            f"Some module names that exist: {_describe(names)}"
        )
    order = {n: i for i, n in enumerate(candidates)}
    return dict(sorted(selected.items(), key=lambda kv: order[kv[0]]))


# -- the parametrization -----------------------------------------------------------------------------------------------


def _spectral_parametrization(module: nn.Module, name: str = "weight") -> _SpectralNorm | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, _SpectralNorm):
            return p
    return None


def _has_legacy_spectral_norm(module: nn.Module) -> bool:
    from torch.nn.utils.spectral_norm import SpectralNorm

    return any(isinstance(h, SpectralNorm) for h in module._forward_pre_hooks.values())


def has_spectral_norm(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` already has spectral norm (the parametrization, or the legacy
    ``torch.nn.utils.spectral_norm`` hook)."""
    return _spectral_parametrization(module, name) is not None or _has_legacy_spectral_norm(module)


def _legacy_weight_norm_key(module: nn.Module, name: str = "weight") -> int | None:
    from torch.nn.utils.weight_norm import WeightNorm

    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return key
    return None


def _has_parametrized_weight_norm(module: nn.Module, name: str = "weight") -> bool:
    from torch.nn.utils.parametrizations import _WeightNorm

    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, _WeightNorm) for p in module.parametrizations[name]
    )


def has_weight_norm(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` has weight norm: the legacy ``torch.nn.utils.weight_norm`` hook or the
    ``torch.nn.utils.parametrizations.weight_norm`` parametrization."""
    return _legacy_weight_norm_key(module, name) is not None or _has_parametrized_weight_norm(module, name)


@torch.no_grad()
def remove_weight_norm(module: nn.Module, name: str = "weight") -> bool:
    """Fold the weight norm of ``module.<name>`` into a plain ``Parameter`` and remove it; True if there was one.

    The new weight is the one the layer computed, ``g * v / ||v||`` (same values, dtype and device), trainable if
    ``g`` or ``v`` was. Works for the legacy hook (``weight_g``/``weight_v`` parameters) and for the parametrization
    (``parametrizations.weight.original0``/``original1``). The ``Parameter`` objects change, so call it before the
    optimizer is built (``SpectralNormInjection`` does).

    Raises:
        ValueError: the weight norm parametrization is composed with other parametrizations of ``name`` (they
            cannot be separated; remove them yourself).
    """
    key = _legacy_weight_norm_key(module, name)
    if key is not None:
        hook = module._forward_pre_hooks.pop(key)
        trainable = module._parameters[name + "_g"].requires_grad or module._parameters[name + "_v"].requires_grad
        weight = hook.compute_weight(module)
        delattr(module, name)
        del module._parameters[name + "_g"]
        del module._parameters[name + "_v"]
        module.register_parameter(name, nn.Parameter(weight.detach().clone(), requires_grad=trainable))
        return True
    if not _has_parametrized_weight_norm(module, name):
        return False
    plist = module.parametrizations[name]
    if len(plist) != 1:
        kinds = [type(p).__name__ for p in plist]
        raise ValueError(
            f"{type(module).__name__}.{name} has weight norm composed with other parametrizations {kinds}; "
            "remove them with `torch.nn.utils.parametrize.remove_parametrizations` first"
        )
    trainable = any(p.requires_grad for p in plist.parameters(recurse=False))
    weight = getattr(module, name).detach().clone()
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(weight, requires_grad=trainable))
    return True


def spectral_norm_dim(module: nn.Module) -> int:
    """The weight dim holding the output channels: 1 for transposed convolutions (weight ``[in, out/groups, *k]``),
    0 otherwise (``Linear`` ``[out, in]``, ``Conv`` ``[out, in/groups, *k]``)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def _is_sharded_tensor(t: Tensor) -> bool:
    """An FSDP2 / tensor-parallel ``DTensor`` shard, or an FSDP1 flat-parameter view."""
    return (hasattr(t, "device_mesh") and hasattr(t, "placements")) or bool(getattr(t, "_fsdp_flattened", False))


def _is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s own parameters (or its weight's parametrization's) are shards."""
    if any(_is_sharded_tensor(p) for p in module.parameters(recurse=False)):
        return True
    if parametrize.is_parametrized(module, "weight"):
        return any(_is_sharded_tensor(p) for p in module.parametrizations["weight"].parameters())
    return False


def _check_weight(name: str, module: nn.Module, *, replacing_weight_norm: bool = False) -> None:
    label = repr(name) if name else "the root module"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"spectral norm selection: module {label} ({type(module).__name__}) has no `weight` tensor; "
            "select the layer inside it (e.g. a pattern ending in its name) instead"
        )
    if replacing_weight_norm:
        if _has_parametrized_weight_norm(module) and len(module.parametrizations["weight"]) != 1:
            kinds = [type(p).__name__ for p in module.parametrizations["weight"]]
            raise ValueError(
                f"spectral norm selection: module {label} ({type(module).__name__}) has weight norm composed with "
                f"other parametrizations {kinds}; `replace_weight_norm` can only remove a weight norm on its own"
            )
    elif _legacy_weight_norm_key(module) is not None:
        raise ValueError(
            f"spectral norm selection: module {label} ({type(module).__name__}) has the legacy "
            "`torch.nn.utils.weight_norm` (its `weight` is recomputed from `weight_g`/`weight_v` every forward). "
            "Pass `replace_weight_norm=True` (to `SpectralNormInjection`, `inject_spectral_norm` or "
            "`load_with_spectral_norm`) to fold the weight norm into the weight and apply spectral norm instead"
        )
    elif not (isinstance(weight, nn.Parameter) or parametrize.is_parametrized(module, "weight")):
        raise ValueError(
            f"spectral norm selection: `weight` of module {label} ({type(module).__name__}) is a plain tensor "
            "attribute, not a Parameter; spectral norm needs a trainable `weight`"
        )
    if _is_sharded(module):
        raise RuntimeError(
            f"spectral norm on module {label} ({type(module).__name__}): the module is already sharded (its weight is a"
            " DTensor shard or an FSDP flat-parameter view), and spectral norm must be applied before sharding (its"
            " power iteration needs the whole weight and replicated `u`/`v` buffers). Apply it first: with"
            " `SpectralNormInjection`, create the layer in `__init__` (the callback wraps it in `setup`, before"
            " `configure_model` shards the model), or call `inject_spectral_norm(self, ...)` in `configure_model`"
            " before `fully_shard`."
        )
    if weight.ndim < 2:
        raise ValueError(
            f"spectral norm selection: `weight` of module {label} ({type(module).__name__}) has shape "
            f"{tuple(weight.shape)}; spectral norm needs a matrix or a conv kernel (>= 2 dims)"
        )


def inject_spectral_norm(
    model: nn.Module,
    modules: str | Iterable[str] | None = ("*.output_proj",),
    types: type | str | Iterable[type | str] | None = (),
    *,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    strict: bool = True,
    replace_weight_norm: bool = False,
) -> InjectionResult:
    """Apply ``torch.nn.utils.parametrizations.spectral_norm`` to the selected modules' ``weight``, idempotently.

    A module that already has spectral norm (the parametrization or the legacy hook) is left as it is, so calling
    this twice, or on a model that was built with spectral norm, never doubles it. Transposed convolutions are
    normalised over their output-channel dim (:func:`spectral_norm_dim`), including user subclasses.

    Weight norm: with ``replace_weight_norm=True`` a selected layer's weight norm (legacy hook or parametrization) is
    folded into its weight and removed first (:func:`remove_weight_norm`), so the layer ends with spectral norm
    alone. Without it, the legacy hook is an error (naming the option) and a parametrized weight norm stays, with
    spectral norm applied to its output.

    Call it before building the optimizer; if an optimizer already exists it keeps working, because torch keeps the
    weight's ``Parameter`` object as ``parametrizations.weight.original``. The random start of the power iteration
    is drawn from a fork of the global RNG, so the rest of the run's random stream is the same with or without it.

    Args:
        model: any ``nn.Module`` (a ``LightningModule`` included).
        modules, types: the selection, see :func:`select_modules`.
        n_power_iterations: power iterations per training forward (>= 1).
        eps: numerical floor of the power iteration's normalisations.
        strict: raise when a pattern/type selects nothing.
        replace_weight_norm: fold and remove the weight norm of selected layers before applying spectral norm.

    Raises:
        ValueError: a selector that matches nothing (listing existing module names), or a selected module without a
            suitable ``weight`` (naming it; the legacy weight norm without ``replace_weight_norm``).
    """
    n_power_iterations, eps = _check_power_args(n_power_iterations, eps)
    check_bool("replace_weight_norm", replace_weight_norm)
    selected = select_modules(model, modules, types, strict=strict)
    to_wrap = {name: module for name, module in selected.items() if not has_spectral_norm(module)}
    replaced = [name for name, module in to_wrap.items() if replace_weight_norm and has_weight_norm(module)]
    for name, module in to_wrap.items():  # every check before the model is changed
        _check_weight(name, module, replacing_weight_norm=name in replaced)
    for name in replaced:
        remove_weight_norm(to_wrap[name])
    with _rng_untouched(m.weight for m in to_wrap.values()):
        for module in to_wrap.values():
            spectral_norm(
                module, "weight", n_power_iterations=n_power_iterations, eps=eps, dim=spectral_norm_dim(module)
            )
    return InjectionResult(selected=tuple(selected), wrapped=tuple(to_wrap), replaced_weight_norm=tuple(replaced))


def _rng_untouched(weights: Iterable[Tensor]):
    """torch draws the random start of ``u``/``v`` from the global generator of the weight's device; fork it, so
    injecting spectral norm leaves every later random draw of the run (init, dropout, shuffling) as it was."""
    cuda = sorted({w.device.index or 0 for w in weights if w.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda)


def _whole(t: Tensor) -> Tensor:
    """The whole tensor behind a sharded ``DTensor`` (all-gathered), or ``t`` itself."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


@torch.no_grad()
def spectral_sigma(module: nn.Module, name: str = "weight") -> Tensor:
    """The current estimate ``u^T W v`` of the largest singular value of the ORIGINAL (un-normalised) weight.

    Reads the parametrization's ``u``/``v`` buffers (no extra power iteration, no SVD): one matrix-vector product,
    computed in fp32 on the weight's device, returned as a 0-dim fp32 tensor without a host sync. A sharded weight
    (an FSDP2 / tensor-parallel ``DTensor`` outside the forward pass) is all-gathered first: a collective, so every
    rank must call this at the same time (the ``u``/``v`` buffers are the local, replicated ones). The effective
    weight ``module.weight`` has ``sigma ~ 1`` by construction. For a 1-D weight (normalised exactly) it is the
    weight's L2 norm. If other parametrizations come before spectral norm (e.g. weight norm), ``W`` is their output.

    Raises:
        ValueError: ``module`` has no spectral norm parametrization on ``name``.
    """
    sn = _spectral_parametrization(module, name)
    if sn is None:
        raise ValueError(f"{type(module).__name__} has no spectral norm parametrization on `{name}`")
    plist = module.parametrizations[name]
    index = next(i for i, p in enumerate(plist) if p is sn)
    if index == 0:
        weight = _whole(plist.original)
    else:  # evaluate the parametrizations that feed spectral norm, as ParametrizationList.forward does
        if hasattr(plist, "original"):
            originals = [plist.original]
        else:  # a first parametrization whose right_inverse returned several tensors (e.g. weight norm's g, v)
            originals = []
            while hasattr(plist, f"original{len(originals)}"):
                originals.append(getattr(plist, f"original{len(originals)}"))
        weight = plist[0](*(_whole(o) for o in originals))
        for p in list(plist)[1:index]:
            weight = p(weight)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        weight = weight.float()
        if weight.ndim == 1:
            return torch.linalg.vector_norm(weight)
        mat = sn._reshape_weight_to_matrix(weight)
        return torch.dot(sn._u.float(), torch.mv(mat, sn._v.float()))


# -- checkpoints -------------------------------------------------------------------------------------------------------


def _read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any], map_location: Any, weights_only: bool):
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"`checkpoint` file {os.fspath(checkpoint)!r} does not exist")
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=weights_only)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"`checkpoint` must be a path, a Lightning checkpoint dict or a state dict, got {checkpoint!r}")
    state = checkpoint.get("state_dict", checkpoint)  # a Lightning checkpoint, or a plain state dict
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise TypeError("`checkpoint` does not hold a state dict (a mapping from parameter names to tensors)")
    return state


def spectral_norm_modules_in(state_dict: Mapping[str, Any]) -> list[str]:
    """Qualified names of the modules that have a spectral norm parametrization in ``state_dict`` (found from their
    ``<name>.parametrizations.weight.<i>._u`` keys; ``""`` is the root module)."""
    names = []
    for key in state_dict:
        m = _SN_KEY.match(key)
        if m is not None:
            names.append(m.group("name") or "")
    return names


def load_with_spectral_norm(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    modules: str | Iterable[str] | None = None,
    types: type | str | Iterable[type | str] | None = None,
    *,
    prefix: str = "",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    strict: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
    eval_mode: bool = True,
    replace_weight_norm: bool | None = None,
) -> nn.Module:
    """Load a checkpoint written by a model trained with spectral norm (e.g. with the ``SpectralNormInjection``
    callback) into a freshly built ``model``, without a Trainer: one call.

    Example::

        model = MyLightningModule(**hparams)
        load_with_spectral_norm(model, "last.ckpt")  # selection read from the checkpoint's keys
        # or the same selection the callback used:
        load_with_spectral_norm(model, "last.ckpt", modules=("*.output_proj",))
        # or only the inner network of a LightningModule that keeps it as `self.model`:
        load_with_spectral_norm(net, "last.ckpt", prefix="model.")

    Steps: call ``model.configure_model()`` when the model has one (a LightningModule that builds layers there;
    the hook is meant to be idempotent); read the state dict (a Lightning checkpoint's ``"state_dict"`` or a plain
    state dict; keys starting with ``prefix`` are kept, with the prefix removed); apply spectral norm to the selected
    modules (:func:`inject_spectral_norm`; with no ``modules``/``types``, to exactly the modules that have it in the
    checkpoint); check that the model and the checkpoint agree on which modules have it; then
    ``model.load_state_dict``. The estimate buffers ``u``/``v`` come from the checkpoint, so the effective weights
    are exactly the trained ones.

    Args:
        model: the freshly built module to load into (modified in place and returned).
        checkpoint: a path, a loaded Lightning checkpoint dict, or a state dict.
        modules, types: the selection, as given to ``SpectralNormInjection``; ``None`` for both: from the checkpoint.
        prefix: only load keys under this prefix (e.g. ``"model."``), with it stripped.
        n_power_iterations, eps: of the parametrization (they only matter if the model is trained further).
        strict: passed to ``load_state_dict``.
        map_location, weights_only: passed to ``torch.load``.
        eval_mode: call ``model.eval()`` (in training mode every forward would update ``u``/``v``).
        replace_weight_norm: fold and remove the weight norm of the layers that get spectral norm (as
            ``SpectralNormInjection(replace_weight_norm=True)`` did in training); ``None`` (default): for each such
            layer, exactly when the checkpoint has no weight-norm tensors for it (``weight_g``/``original0``).

    Raises:
        ValueError: the checkpoint has spectral norm on modules the selection does not cover, or the other way round.
        FileNotFoundError: ``checkpoint`` is a path that does not exist.
    """
    n_power_iterations, eps = _check_power_args(n_power_iterations, eps)
    check_bool("replace_weight_norm", replace_weight_norm, allow_none=True)
    state = _read_state_dict(checkpoint, map_location, weights_only)
    configure_model = getattr(model, "configure_model", None)
    if callable(configure_model):
        configure_model()
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"`prefix` {prefix!r} matches no key of the checkpoint")
    in_ckpt = spectral_norm_modules_in(state)
    candidates = _candidate_modules(model)
    if modules is None and types is None:
        missing = [n for n in in_ckpt if n not in candidates]
        if missing:
            raise ValueError(
                f"the checkpoint has spectral norm on modules that {type(model).__name__} does not have: "
                f"{_describe(missing)}; some module names that exist: {_describe([n for n in candidates if n])}"
            )
        targets = {n: candidates[n] for n in in_ckpt}
    else:
        targets = select_modules(model, modules, types)
    replace = []
    for name, m in targets.items():
        if has_spectral_norm(m) or not has_weight_norm(m):
            continue
        dot = f"{name}." if name else ""
        in_state = f"{dot}weight_g" in state or f"{dot}parametrizations.weight.original0" in state
        if replace_weight_norm or (replace_weight_norm is None and not in_state):
            _check_weight(name, m, replacing_weight_norm=True)
            replace.append(m)
    for m in replace:
        remove_weight_norm(m)
    if modules is None and types is None:
        for name in in_ckpt:
            if not has_spectral_norm(candidates[name]):
                _check_weight(name, candidates[name])
                m = candidates[name]
                with _rng_untouched([m.weight]):
                    spectral_norm(m, "weight", n_power_iterations=n_power_iterations, eps=eps, dim=spectral_norm_dim(m))
    else:
        inject_spectral_norm(model, modules, types, n_power_iterations=n_power_iterations, eps=eps)
    in_model = [n for n, m in _candidate_modules(model).items() if _spectral_parametrization(m) is not None]
    if strict and sorted(in_model) != sorted(in_ckpt):
        raise ValueError(
            "spectral norm differs between the model and the checkpoint: only in the model "
            f"{_describe(sorted(set(in_model) - set(in_ckpt)))}, only in the checkpoint "
            f"{_describe(sorted(set(in_ckpt) - set(in_model)))}"
        )
    model.load_state_dict(state, strict=strict)
    if eval_mode:
        model.eval()
    return model
