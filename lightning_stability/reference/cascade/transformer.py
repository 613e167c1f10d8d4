"""The three-stage cascade transformer on codec latents (``docs/design.md``, post-mortem 3), in plain torch.

The model refines EnCodec-style latents ``[B, D=128, T]`` (24 kHz audio, hop 320: 75 frames/s, T = 1200 for 16 s) in
``n_stages`` transformer stages. Stage ``k`` computes, with ``prev_0 = source`` and ``a_0 = rms(reference)``::

    h      = LayerNorm(concat([prev_{k-1}, conditioning], dim=channels))      # [B, T, D + Dc]
    x      = PreLNTransformer_k(Linear(h))                                     # [B, T, W_k], rotary positions
    p      = OutputProj_k(LayerNorm(x))                                        # [B, D, T], spectral norm on OutputProj
    p      = envelope(prev_{k-1}) * exp(e_k) * p                               # frame_envelope, per frame
    p      = lam * p,  ||lam * p + r_k * prev|| = ||prev||  (r_k < 1 only)     # calibrate_output, per item
    out    = p + r_k * prev_{k-1}                                              # residual, r = (1.0, 1.0, 0.3)
    s_k    = clamp(a_{k-1} / rms(out), s_min, s_max)                           # ClampedRMSScale, [0.7, 1.5]
    g_k    = exp(log(G) * tanh(Linear([mean_t(LayerNorm(x)), log rms(source), log rms(cond)]) / log(G)))
    prev_k = g_k * s_k * out,   a_k = g_k * a_{k-1}                            # predict_gain, G = gain_range = 4

The post-mortem's cascade had ``r_3 = 0.1``: the last stage's output RMS collapsed to 1.09 against a target of 5.69,
the RMS factor sat at its 1.5 ceiling and could not hide it, gradient norms grew 2.45 -> 6.66 -> 16.71 per epoch and
the run went NaN at batch 205. The defaults here are the fixed configuration; every number is a :class:`CascadeConfig`
field so the failure can be reproduced (``residual_weights=(1.0, 1.0, 0.1), spectral_norm_output=False,
qk_layernorm=False, normalize_input=False, predict_gain=False, frame_envelope=False, calibrate_output=False``).

Amplitude: with ``normalize_input=True`` (default) the stages work on latents divided by the per-item RMS of the
source (EnCodec's ``preprocess``, over real frames) and every stage output is multiplied back by it. The spectral norm
bounds each output projection's gain by 1, so without this a stage fed latents of RMS 5.7 must first grow its
LayerNorm gains by ~5x before the RMS factor leaves its 1.5 ceiling; normalised, the outputs start within the clamp
range and the factor measures the stage's relative error only. ``normalize_input=False`` is the post-mortem's raw
setting. More amplitude fixes (measured in ``docs/guides/cascade.md``):

- ``predict_gain``: inside the clamp range a stage's output has exactly the RMS its factor aims at, so with the
  source as the only reference every stage would output the *source's* level; in an enhancement task the target's
  level differs (gain changes, noise: the random-encoder latents' source/target RMS ratios span 0.39-1.63). Each stage
  predicts a bounded gain from its features and the raw levels that the input normalisation divides out; gains
  compose (stage ``k``'s factor aims at the level stage ``k - 1`` ended at), so a stage that keeps its input's
  amplitude has a factor near 1 whatever the gains before it. The gain head starts at zero (gain 1).
- ``frame_envelope``: the LayerNorms divide each frame's loudness out, so a projection of LayerNorm'd features is
  equally loud on every frame; it is multiplied by the previous output's per-frame RMS (relative to its RMS over real
  frames) and a learned, bounded per-frame gain ``e_k`` (zero-initialised), so a correction is loud where speech is.
- ``calibrate_output``: inside the clamp range nothing trains the amplitude of ``out`` (the factor undoes it), and a
  learned projection aligns with low-variance directions of its LayerNorm input (measured: feature variance 0.02
  along its top singular vectors against 0.99 on average, an output 5x quieter than at init): the ``r = 0.3`` stage's
  output then collapses onto ``0.3 * prev`` and its factor sits at the ceiling. For ``r < 1`` the projection is
  scaled, per item, so that ``p + r * prev`` has exactly the RMS of ``prev`` (``calibrate_exact``; ``False``: at
  least that RMS, a floor, under which a loud projection drifts the factor to its 0.7 bound instead); ``p``'s
  direction, including its alignment with ``prev``, stays learned, so the stage can still do nothing (``p`` parallel
  to ``prev``). Stages with ``r >= 1`` are left alone (their residual carries the amplitude). Off, the LayerNorm gain
  is calibrated once at init (for isotropic inputs), which does not survive training.
- ``identity_init``: every stage starts close to doing nothing (see ``CascadeTransformer._init_identity_paths``).
  By default a stage's random projection adds noise as loud as its input at init, which training first has to undo:
  on latents that are already close to their target (the demo codec's: doing nothing is 16 % off) that costs the
  whole short run.

Numerics:

- LayerNorms (including the optional qk-LayerNorm) and the softmax of the manual attention path run in fp32 with
  autocast disabled; their outputs go back to the input dtype. The residual stream of each stage is kept in the
  parameters' dtype (fp32 under ``bf16-mixed``), so bf16 rounding does not accumulate over the layers.
- Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` unless logit soft-capping is on, which
  needs the logits: then ``cap * tanh(logits / cap)`` (Gemma 2; Wortsman et al. 2023 study the logit growth it
  bounds) and the softmax are computed in fp32.
- Positions are rotary (RoFormer, Su et al. 2021): relative, no length limit, computed in fp32 for any ``T``.
- Padding: a boolean ``mask [B, T]`` (``True`` = a real frame) removes padded keys from attention, zeroes padded
  frames of every stage output, and makes the RMS factor use real frames only (both ``out`` and the reference are
  zero-padded, so the ratio of their full-length RMS equals the ratio over real frames).

Einstein notation used in shape comments: ``B`` batch, ``T`` frames, ``D`` latent channels, ``Dc`` conditioning
channels, ``W`` stage width, ``H`` heads, ``Dh`` head dim (``W = H * Dh``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from lightning_stability._checks import (
    check_bool,
    check_choice,
    check_int,
    check_interval,
    check_number,
    check_positive,
    check_sequence,
)
from lightning_stability.nn.scale import ClampedRMSScale, _rms

__all__ = [
    "CascadeConfig",
    "CascadeOutput",
    "CascadeStage",
    "CascadeTransformer",
    "FP32LayerNorm",
    "StageOutput",
    "apply_rotary",
    "rotary_angles",
    "small_init_",
]

_RMS_REFERENCES = ("source", "target")
_INITS = ("default", "scaled_residual", "small")


# ---------------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CascadeConfig:
    """Every number of the cascade. Defaults are the post-mortem's fixed configuration (``docs/design.md``, post-mortem
    3).

    Sequences given as lists (YAML, JSON) are turned into tuples; ``n_layers`` may be one int for every stage.
    """

    latent_dim: int = 128  # EnCodec/SEANet latent channels (24 kHz, hop 320)
    cond_dim: int | None = None  # conditioning latent channels: None = latent_dim (same codec), 0 = no conditioning
    n_stages: int = 3  # the post-mortem's cascade
    widths: tuple[int, ...] = (256, 384, 384)  # transformer width of each stage
    n_layers: int | tuple[int, ...] = 6  # pre-LN blocks per stage (one int: the same for every stage)
    n_heads: int = 8  # head dim 32 / 48 at the default widths; must divide every width, head dim even (rotary)
    mlp_ratio: float = 4.0  # GPT-2 feed-forward expansion
    residual_weights: tuple[float, ...] = (1.0, 1.0, 0.3)  # r_k in out + r_k * prev; the old 0.1 collapsed the RMS
    min_scale: float = 0.7  # RMS factor clamp: never shrink an output by more than 30 %...
    max_scale: float = 1.5  # ...nor amplify it by more than 50 % (a collapse stays visible to the loss)
    warn_above: float = 1.3  # the module warns when a stage's mean factor sits above this (collapsing residual)
    spectral_norm_output: bool = True  # sigma_max(output projection) = 1: a stage cannot amplify without bound
    qk_layernorm: bool = True  # Wortsman et al. 2023: bounds attention-logit growth; without it this cascade
    # diverges at high learning rates even with r_3 = 0.3 and spectral norm (tests/reference/cascade/test_module.py)
    attn_logit_softcap: float | None = None  # cap * tanh(logits / cap); None = plain logits (fast SDPA path)
    dropout: float = 0.0  # attention-probability and residual dropout; latents are small data, keep 0 by default
    bias: bool = True  # biases in the Linear layers
    rope_base: float = 10000.0  # rotary base; wavelengths up to 2*pi*base frames >> T = 1200
    normalize_input: bool = True  # stages see latents / rms(source) (EnCodec-style); outputs are scaled back
    rms_reference: str = "source"  # "source": available at inference; "target": teacher-forced, uses the answer
    predict_gain: bool = True  # each stage multiplies its RMS-matched output by a gain it predicts (target level !=
    # source level: gain changes, noise); off, every stage's output has the reference's RMS (the clamp aside)
    gain_range: float = 4.0  # the predicted gain is tanh-bounded to [1 / gain_range, gain_range]
    frame_envelope: bool = True  # multiply the projection by the previous output's per-frame RMS envelope (the
    # frame loudness the LayerNorms divide out: it spans 0.2-1.7x the item's RMS in speech latents), times a learned
    # per-frame gain (zero-initialised, bounded like the item gain)
    calibrate_output: bool = True  # r < 1 stages, per item: the projection p is scaled so that p + r * prev is at
    # least as loud as prev: a learned projection aligns with low-variance feature directions and gets 5x quieter
    # than at init, and the r = 0.3 stage's factor then sits at its ceiling (the post-mortem's collapse)
    calibrate_exact: bool = True  # calibrate_output rescales the projection so that out = p + r * prev has exactly
    # prev's RMS (False: only raises it to that, a floor); p's amplitude is otherwise a direction nothing trains (the
    # factor undoes it), and it drifts: measured, a floor-only stage 3 drifts to its 0.7 factor bound instead
    init: str = "scaled_residual"  # "default" (torch), "scaled_residual" (nanoGPT), "small" (post-mortem, std 1e-3)
    init_std: float = 0.02  # std of the "scaled_residual" init (GPT-2)
    identity_init: bool = True  # every stage starts close to the identity ("doing nothing"): r >= 1 stages with
    # their output LayerNorm gain at 0.1 (a small correction), r < 1 stages with identity blocks in their input and
    # output projections (width >= latent_dim), so the projection starts proportional to `prev`
    norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        # sequences as tuples (YAML and JSON give lists); their lengths and items are checked in _validate
        self.widths = check_sequence("widths", self.widths, min_length=0, noun="a sequence of ints")
        self.residual_weights = check_sequence(
            "residual_weights", self.residual_weights, min_length=0, noun="a sequence of numbers"
        )
        if isinstance(self.n_layers, Sequence) and not isinstance(self.n_layers, (str, bytes)):
            self.n_layers = tuple(self.n_layers)
        self._validate()

    def _validate(self) -> None:
        check_int("latent_dim", self.latent_dim, 1)
        check_int("cond_dim", self.cond_dim, 0, allow_none=True)
        check_int("n_stages", self.n_stages, 1)
        check_int("n_heads", self.n_heads, 1)
        if len(self.widths) != self.n_stages:
            raise ValueError(f"`widths` must have n_stages={self.n_stages} entries, got {self.widths!r}")
        for k, width in enumerate(self.widths):
            check_int(f"widths[{k}]", width, 1)
            if width % self.n_heads or (width // self.n_heads) % 2:
                raise ValueError(
                    f"`widths[{k}]`={width} must be a multiple of `n_heads`={self.n_heads} with an even head dim "
                    f"(rotary embeddings rotate pairs of channels), got head dim {width / self.n_heads:g}"
                )
        if isinstance(self.n_layers, tuple):
            if len(self.n_layers) != self.n_stages:
                raise ValueError(
                    f"`n_layers` must be an int or have n_stages={self.n_stages} entries, got {self.n_layers!r}"
                )
            for k, n in enumerate(self.n_layers):
                check_int(f"n_layers[{k}]", n, 1)
        else:
            check_int("n_layers", self.n_layers, 1)
        if len(self.residual_weights) != self.n_stages:
            raise ValueError(
                f"`residual_weights` must have n_stages={self.n_stages} entries, got {self.residual_weights!r}"
            )
        for k, r in enumerate(self.residual_weights):
            check_number(f"residual_weights[{k}]", r, minimum=0)
        check_positive("mlp_ratio", self.mlp_ratio)
        check_positive("min_scale", self.min_scale)
        check_positive("max_scale", self.max_scale)
        if self.min_scale > self.max_scale:
            raise ValueError(
                f"`min_scale` must be <= `max_scale`, got min_scale={self.min_scale!r} > max_scale={self.max_scale!r}"
            )
        check_positive("warn_above", self.warn_above)
        check_positive("attn_logit_softcap", self.attn_logit_softcap, allow_none=True)
        check_interval("dropout", self.dropout, 0, 1, high_open=True)
        check_positive("rope_base", self.rope_base)
        check_positive("init_std", self.init_std)
        check_positive("norm_eps", self.norm_eps)
        check_number("gain_range", self.gain_range, minimum=1, exclusive=True)
        for name in (
            "spectral_norm_output",
            "qk_layernorm",
            "bias",
            "normalize_input",
            "predict_gain",
            "frame_envelope",
            "identity_init",
            "calibrate_output",
            "calibrate_exact",
        ):
            check_bool(name, getattr(self, name))
        check_choice("rms_reference", self.rms_reference, _RMS_REFERENCES)
        check_choice("init", self.init, _INITS)

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        """``n_layers`` as one int per stage."""
        if isinstance(self.n_layers, tuple):
            return self.n_layers
        return (self.n_layers,) * self.n_stages

    @property
    def conditioning_dim(self) -> int:
        """Channels of the conditioning latents (``cond_dim``, defaulting to ``latent_dim``)."""
        return self.latent_dim if self.cond_dim is None else self.cond_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists for tuples) for hyper-parameters and checkpoints."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_any(cls, config: CascadeConfig | dict[str, Any] | None) -> CascadeConfig:
        """A config from a :class:`CascadeConfig` (returned as is), a mapping of its fields, or ``None`` (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"unknown `config` field(s) {unknown}; the fields are {sorted(known)}")
            return cls(**config)
        raise TypeError(f"`config` must be a CascadeConfig, a dict of its fields or None, got {type(config).__name__}")


# ---------------------------------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------------------------------
class FP32LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in fp32 with autocast disabled; the output has the input's dtype.

    Under bf16 the mean/variance of a wide row lose precision (8 mantissa bits); this island keeps the statistics
    exact whatever the autocast policy of the device.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


def rotary_angles(length: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    r"""``(cos, sin)`` of the rotary angles, each ``[T, Dh / 2]`` fp32.

    Channel pair ``i`` of position ``t`` is rotated by ``theta_{t,i} = t * base^{-2i / Dh}`` (RoFormer, Su et al.
    2021), so the dot product of a rotated query at ``t`` and key at ``s`` depends on ``t - s`` only.
    Computed in float64 then cast, so positions up to ~10^5 frames keep their precision.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)  # [Dh/2]
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv_freq)  # [T, Dh/2]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(x[..., i], x[..., i + Dh/2])`` of ``x [B, H, T, Dh]`` by the angles (fp32 maths)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each [B, H, T, Dh/2]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [B, H, T, Dh]
    return rotated.to(x.dtype)


def small_init_(module: nn.Module, *, std: float = 1e-3, conv_factor: float = 0.5) -> nn.Module:
    """The post-mortem's emergency initialisation (``docs/design.md``, post-mortem 4), for comparison runs: returns
    ``module``.

    - ``nn.Linear`` / ``nn.Embedding`` weights ~ ``N(0, std^2)`` (default ``std = 0.001``), Linear biases 0;
    - convolution weights (``Conv1d/2d/3d`` and transposed) multiplied by ``conv_factor`` (default 0.5);
    - normalisation layers untouched.

    Parametrized weights (weight norm, spectral norm) are assigned through their parametrization's
    ``right_inverse``, so the effective weight is what is set. Note that spectral norm re-normalises the largest
    singular value to 1 whatever the scale of the stored weight, so "small" has no effect on such a layer.
    """
    check_positive("std", std)
    check_positive("conv_factor", conv_factor)

    def set_weight(m: nn.Module, value: Tensor) -> None:
        if parametrize.is_parametrized(m, "weight"):
            m.weight = value  # goes through right_inverse
        else:
            m.weight.copy_(value)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                set_weight(m, torch.randn_like(m.weight) * std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.conv._ConvNd):
                set_weight(m, m.weight * conv_factor)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# transformer blocks
# ---------------------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions, optional qk-LayerNorm and logit soft-capping."""

    def __init__(self, config: CascadeConfig, width: int) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = width // config.n_heads
        self.qkv = nn.Linear(width, 3 * width, bias=config.bias)
        self.proj = nn.Linear(width, width, bias=config.bias)
        self.proj.is_residual_projection = True  # scaled init (nanoGPT's c_proj)
        self.q_norm = FP32LayerNorm(self.head_dim, eps=config.norm_eps) if config.qk_layernorm else None
        self.k_norm = FP32LayerNorm(self.head_dim, eps=config.norm_eps) if config.qk_layernorm else None
        self.softcap = config.attn_logit_softcap
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).split(W, dim=2)  # each [B, T, W]
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, T]: True = key takes part
        dropout_p = self.dropout if self.training else 0.0
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # [B, H, T, Dh]
        else:
            y = self._softcapped_attention(q, k, v, attn_mask, dropout_p)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, W)  # [B, T, W]
        return self.resid_dropout(self.proj(y))

    def _softcapped_attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: float) -> Tensor:
        """``softmax(cap * tanh(q k^T / (sqrt(Dh) cap))) v`` with the cap, mask and softmax in fp32."""
        logits = torch.matmul(q, k.transpose(-2, -1))  # [B, H, T, T], autocast dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = logits.float() * (self.head_dim**-0.5)
            logits = self.softcap * torch.tanh(logits / self.softcap)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # [B, H, T, T] fp32
        probs = F.dropout(probs, p=p, training=p > 0).to(v.dtype)
        return torch.matmul(probs, v)  # [B, H, T, Dh]


class MLP(nn.Module):
    """GELU feed-forward ``W -> mlp_ratio * W -> W``."""

    def __init__(self, config: CascadeConfig, width: int) -> None:
        super().__init__()
        hidden = int(round(config.mlp_ratio * width))
        self.fc = nn.Linear(width, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, width, bias=config.bias)
        self.proj.is_residual_projection = True  # scaled init (nanoGPT's c_proj)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, config: CascadeConfig, width: int) -> None:
        super().__init__()
        self.ln_attn = FP32LayerNorm(width, eps=config.norm_eps)
        self.attn = SelfAttention(config, width)
        self.ln_mlp = FP32LayerNorm(width, eps=config.norm_eps)
        self.mlp = MLP(config, width)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_attn(x), rope, mask)
        return x + self.mlp(self.ln_mlp(x))


# ---------------------------------------------------------------------------------------------------------------------
# the cascade
# ---------------------------------------------------------------------------------------------------------------------
class CascadeStage(nn.Module):
    """One stage: ``[prev, cond] -> LN -> Linear -> pre-LN blocks -> LN -> OutputProj (-> floor) -> + r * prev -> RMS
    scale (-> predicted gain)``.

    ``output_proj`` is the layer that gets spectral norm (``config.spectral_norm_output``); ``scale`` is the
    :class:`~lightning_stability.nn.scale.ClampedRMSScale` whose ``last_scale`` ``[B, 1, 1]`` records the factor.
    """

    def __init__(self, config: CascadeConfig, index: int) -> None:
        super().__init__()
        if not isinstance(config, CascadeConfig):
            raise TypeError(f"`config` must be a CascadeConfig, got {type(config).__name__}")
        self.index = check_int("index", index, 0, maximum=config.n_stages - 1)
        width = config.widths[index]
        in_dim = config.latent_dim + config.conditioning_dim
        self.n_heads = config.n_heads
        self.head_dim = width // config.n_heads
        self.rope_base = config.rope_base
        self.residual_weight = float(config.residual_weights[index])
        self.in_norm = FP32LayerNorm(in_dim, eps=config.norm_eps)
        self.in_proj = nn.Linear(in_dim, width, bias=config.bias)
        self.blocks = nn.ModuleList(Block(config, width) for _ in range(config.layers_per_stage[index]))
        self.out_norm = FP32LayerNorm(width, eps=config.norm_eps)
        self.output_proj = nn.Linear(width, config.latent_dim, bias=config.bias)
        # predict_gain: the log-gain from the mean of the stage's features over real frames and the log-RMS of the
        # raw source and conditioning (the levels normalize_input divides out); zero-initialised (gain 1), bounded
        # by tanh to +-log(gain_range)
        n_levels = 1 + (config.conditioning_dim > 0)
        self.gain_proj = nn.Linear(width + n_levels, 1) if config.predict_gain else None
        self.log_gain_range = math.log(config.gain_range)
        # frame_envelope: per-frame log-gain of the projection from the stage's features, zero-initialised
        self.frame_envelope = config.frame_envelope
        self.frame_gain_proj = nn.Linear(width, 1) if config.frame_envelope else None
        # calibrate_output: floor of the projection's RMS relative to the previous output's (0 for r >= 1)
        self.calibrate_output = config.calibrate_output
        self.wanted_rms = math.sqrt(max(0.0, 1.0 - self.residual_weight**2))
        self.calibrate_exact = config.calibrate_exact
        self.scale = ClampedRMSScale(config.min_scale, config.max_scale)

    def extra_repr(self) -> str:
        return f"index={self.index}, residual_weight={self.residual_weight}"

    def forward(
        self,
        previous: Tensor,
        conditioning: Tensor | None,
        level: Tensor,
        mask: Tensor | None,
        log_levels: Tensor | None = None,
    ) -> StageOutput:
        """``previous [B, D, T]``, ``conditioning [B, Dc, T]`` or None, ``level [B, 1, 1]`` (the RMS the factor aims
        the output at, over the full zero-padded length), ``mask [B, T]`` bool or None, ``log_levels [B, 1 or 2]``
        (log-RMS of the raw source and conditioning; needed with ``predict_gain``) -> :class:`StageOutput`
        (``output`` in ``previous``'s dtype)."""
        h = previous if conditioning is None else torch.cat((previous, conditioning.to(previous.dtype)), dim=1)
        h = h.transpose(1, 2)  # [B, T, D + Dc]
        x = self.in_proj(self.in_norm(h))  # [B, T, W]
        x = x.to(self.in_proj.weight.dtype)  # residual stream in the parameters' dtype (fp32 under autocast)
        rope = rotary_angles(x.shape[1], self.head_dim, self.rope_base, x.device)  # each [T, Dh/2]
        for block in self.blocks:
            x = block(x, rope, mask)  # [B, T, W]
        features = self.out_norm(x)  # [B, T, W]
        out = self.output_proj(features)  # [B, T, D]
        out = out.transpose(1, 2).to(previous.dtype)  # [B, D, T]
        if self.frame_gain_proj is not None:
            with torch.autocast(device_type=out.device.type, enabled=False):
                prev = previous.detach().float()
                envelope = prev.square().mean(dim=1, keepdim=True).sqrt() / _masked_rms(prev, mask)  # over real frames
                log_gain = self.frame_gain_proj(features.float()).transpose(1, 2)  # [B, 1, T]
                log_gain = self.log_gain_range * torch.tanh(log_gain / self.log_gain_range)
            out = out * (envelope * log_gain.exp()).to(out.dtype)  # [B, D, T]
        if mask is not None:
            out = out * mask[:, None, :].to(out.dtype)  # padded frames are exactly 0 (and do not count in the RMS)
        if self.calibrate_output and self.wanted_rms > 0:
            with torch.autocast(device_type=out.device.type, enabled=False):  # sums over the same (padded) length
                lift = _calibration(out.float(), previous.detach().float(), self.residual_weight, self.scale.eps)
                if not self.calibrate_exact:
                    lift = lift.clamp_min(1.0)
            out = out * lift.to(out.dtype)
        out = out + self.residual_weight * previous
        y = self.scale(out, level)
        with torch.autocast(device_type=out.device.type, enabled=False):  # the factor before clamping, with a graph
            raw = level.detach().float() / (_rms(out, (1, 2)) + self.scale.eps)  # into out's amplitude only
        if self.gain_proj is None:
            ones = torch.ones_like(raw)
            return StageOutput(output=y, gain=ones, raw_scale=raw, level=level)
        if log_levels is None:
            raise ValueError("predict_gain needs `log_levels` (the log-RMS of the raw source and conditioning)")
        with torch.autocast(device_type=x.device.type, enabled=False):
            pooled = torch.cat((_masked_time_mean(features.float(), mask), log_levels.float()), dim=1)  # [B, W + n]
            log_gain = F.linear(pooled, self.gain_proj.weight.float(), self.gain_proj.bias.float())  # [B, 1]
            gain = (self.log_gain_range * torch.tanh(log_gain / self.log_gain_range)).exp()[:, :, None]  # [B, 1, 1]
        return StageOutput(output=(y * gain).to(y.dtype), gain=gain, raw_scale=raw, level=level * gain)


class StageOutput(NamedTuple):
    """What :class:`CascadeStage` returns: its ``output [B, D, T]``, its predicted ``gain [B, 1, 1]`` fp32 (ones
    without ``predict_gain``), its RMS factor before clamping, ``raw_scale [B, 1, 1]`` fp32, differentiable with
    respect to the amplitude of the stage's output only, and ``level = level_in * gain``: the RMS the next stage's
    factor aims at."""

    output: Tensor
    gain: Tensor
    raw_scale: Tensor
    level: Tensor


@dataclass
class CascadeOutput:
    """What :class:`CascadeTransformer` returns.

    Attributes:
        stages: the output of every stage, each ``[B, D, T]`` (deep supervision uses all of them).
        scales: the RMS factor of every stage, each ``[B, 1, 1]`` fp32, detached.
        clamped_fractions: per stage, the 0-dim fraction of the batch whose factor hit a clamp bound.
        gains: per stage, the predicted gain applied after the RMS factor, ``[B, 1, 1]`` fp32 with its graph (ones
            without ``predict_gain``; empty when not computed).
        raw_scales: per stage, the RMS factor before clamping, ``[B, 1, 1]`` fp32, differentiable with respect to
            the amplitude of the stage's output only (empty when not computed).
    """

    stages: list[Tensor]
    scales: list[Tensor]
    clamped_fractions: list[Tensor]
    gains: list[Tensor] = field(default_factory=list)
    raw_scales: list[Tensor] = field(default_factory=list)

    @property
    def output(self) -> Tensor:
        """The last stage's output ``[B, D, T]``."""
        return self.stages[-1]


class CascadeTransformer(nn.Module):
    """The cascade of :class:`CascadeStage` (see the module docstring for the maths).

    Args:
        config: a :class:`CascadeConfig` (or a dict of its fields; ``None`` = the defaults).

    Initialisation (``config.init``), all in :meth:`_init_weights`, before spectral norm is applied:

    - ``"default"``: torch's own (Kaiming-uniform Linear layers);
    - ``"scaled_residual"`` (nanoGPT / GPT-2): Linear weights ~ ``N(0, init_std^2)``, biases 0, and the projections
      that write into the residual stream (attention and MLP output) ~ ``N(0, (init_std / sqrt(2 L))^2)`` with
      ``L`` the stage's layer count, so the residual stream's variance does not grow with depth;
    - ``"small"``: :func:`small_init_` (the post-mortem's std 0.001 and conv weights x0.5).
    """

    def __init__(self, config: CascadeConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = CascadeConfig.from_any(config)
        self.stages = nn.ModuleList(CascadeStage(self.config, k) for k in range(self.config.n_stages))
        self._init_weights()
        if self.config.spectral_norm_output:
            for stage in self.stages:
                spectral_norm(stage.output_proj)
            if self.config.normalize_input and self.config.init != "default" and not self.config.calibrate_output:
                self._calibrate_output_gains()  # once, at init (calibrate_output does it at every forward)

    def __reduce_ex__(self, protocol: int):
        # torch refuses to pickle parametrized modules (spectral norm) "except through state_dict()": pickle (and
        # deepcopy) as config + state_dict, so the model can be sent to ddp_spawn workers. No copies here: the
        # state-dict tensors share the live parameters' storage (torch.multiprocessing passes storages by handle).
        return _rebuild_cascade, (self.config.to_dict(), self.state_dict(), self.training)

    @torch.no_grad()
    def _calibrate_output_gains(self) -> None:
        r"""Start every stage at the right amplitude (normalised latents, unit RMS).

        For an isotropic input ``h`` with unit variance per channel (a LayerNorm output), the output projection gives
        ``rms(W h) = ||W||_F / sqrt(D)``; with spectral norm (``sigma_max = 1``) that is well below 1 (~0.5 for a
        random matrix), and Adam can raise the LayerNorm gain only by about ``lr`` per step, so a stage with a weak
        residual would start with its RMS factor pinned at the clamp for thousands of steps (the post-mortem's
        symptom). The gain of ``out_norm`` is set so that ``rms(W h) = sqrt(1 - r^2)``, i.e. ``out + r * prev`` has
        unit RMS when its terms are uncorrelated, and never below 1 (stages with ``r = 1`` keep gain 1).
        """
        d = self.config.latent_dim
        for stage in self.stages:
            weight = stage.output_proj.weight  # effective (spectral-normed) weight
            expected = float(torch.linalg.matrix_norm(weight.float(), ord="fro")) / math.sqrt(d)
            wanted = math.sqrt(max(0.0, 1.0 - stage.residual_weight**2))
            stage.out_norm.weight.fill_(max(1.0, wanted / max(expected, 1e-6)))

    def _init_weights(self) -> None:
        self._init_transformer_weights()
        if self.config.identity_init:
            self._init_identity_paths()
        with torch.no_grad():  # every init: the predicted gain starts at exactly 1
            for stage in self.stages:
                for head in (stage.gain_proj, stage.frame_gain_proj):
                    if head is not None:
                        nn.init.zeros_(head.weight)
                        nn.init.zeros_(head.bias)

    @torch.no_grad()
    def _init_identity_paths(self) -> None:
        """Stages with ``r >= 1``: the output LayerNorm gain starts at 0.1, so the projection adds a small correction
        to ``prev``. Stages with ``r < 1``: ``in_proj`` copies the ``prev`` channels of its (LayerNorm'd) input into
        the first ``D`` channels of the residual stream and ``output_proj`` reads them back (identity blocks over
        their random init scaled by 0.1), so with near-identity blocks (``scaled_residual``) the projection starts
        proportional to ``prev`` frame by frame: with ``frame_envelope`` and ``calibrate_output`` the stage then starts
        close to the identity instead of ``0.95 * noise + r * prev``. Measured at init (d 128, widths 192): relative
        L1 to the input 0.06 / 0.08 / 0.12 per stage against 0.50 / 0.70 / 1.29. Stages narrower than
        ``latent_dim`` are left as they are."""
        d = self.config.latent_dim
        for stage in self.stages:
            width = stage.in_proj.weight.shape[0]
            if stage.residual_weight >= 1:
                stage.out_norm.weight.mul_(0.1)
                continue
            if width < d:
                continue
            eye = torch.eye(d, dtype=stage.in_proj.weight.dtype)
            stage.in_proj.weight[:d].mul_(0.1)
            stage.in_proj.weight[:d, :d] += eye
            stage.output_proj.weight.mul_(0.1)  # the identity block dominates: p starts proportional to prev
            stage.output_proj.weight[:, :d] += eye

    def _init_transformer_weights(self) -> None:
        cfg = self.config
        if cfg.init == "default":
            return
        if cfg.init == "small":
            small_init_(self)
            return
        with torch.no_grad():
            for stage, n_layers in zip(self.stages, cfg.layers_per_stage):
                for m in stage.modules():
                    if isinstance(m, nn.Linear):
                        std = cfg.init_std
                        if getattr(m, "is_residual_projection", False):
                            std = cfg.init_std / math.sqrt(2 * n_layers)
                        nn.init.normal_(m.weight, mean=0.0, std=std)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
                    elif isinstance(m, nn.LayerNorm):
                        nn.init.ones_(m.weight)
                        nn.init.zeros_(m.bias)

    @property
    def output_projections(self) -> list[nn.Linear]:
        """The output projection of every stage (the layers that carry spectral norm)."""
        return [stage.output_proj for stage in self.stages]

    @property
    def scale_layers(self) -> list[ClampedRMSScale]:
        return [stage.scale for stage in self.stages]

    def _check_inputs(
        self, source: Tensor, conditioning: Tensor | None, mask: Tensor | None, target: Tensor | None
    ) -> None:
        cfg = self.config
        if not torch.is_tensor(source) or not source.is_floating_point():
            raise TypeError(f"`source` must be a floating-point tensor [B, {cfg.latent_dim}, T], got {source!r:.80}")
        if source.ndim != 3 or source.shape[1] != cfg.latent_dim or source.shape[2] == 0:
            raise ValueError(
                f"`source` must be latents of shape [B, latent_dim={cfg.latent_dim}, T>0], got shape "
                f"{tuple(source.shape)}"
            )
        B, _, T = source.shape
        if cfg.conditioning_dim:
            if conditioning is None:
                raise ValueError(
                    f"`conditioning` latents [B, {cfg.conditioning_dim}, T] are required (config cond_dim="
                    f"{cfg.conditioning_dim}); set cond_dim=0 for a model without conditioning"
                )
            if conditioning.ndim != 3 or tuple(conditioning.shape) != (B, cfg.conditioning_dim, T):
                raise ValueError(
                    f"`conditioning` must have shape [B={B}, cond_dim={cfg.conditioning_dim}, T={T}] to be "
                    f"concatenated with `source` {tuple(source.shape)} on channels, got shape "
                    f"{tuple(conditioning.shape)} (crop/pad it to the source length)"
                )
        elif conditioning is not None:
            raise ValueError(f"this model has cond_dim=0 but got `conditioning` of shape {tuple(conditioning.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B, T)):
            raise ValueError(
                f"`mask` must be a bool tensor of shape [B={B}, T={T}] (True = real frame), got "
                f"{mask.dtype} of shape {tuple(mask.shape)}"
            )
        if target is not None and tuple(target.shape) != tuple(source.shape):
            raise ValueError(
                f"`target` must have the shape of `source` {tuple(source.shape)}, got {tuple(target.shape)}"
            )

    def forward(
        self,
        source: Tensor,
        conditioning: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        target: Tensor | None = None,
    ) -> CascadeOutput:
        """Run every stage.

        Args:
            source: latents to refine ``[B, D, T]``.
            conditioning: conditioning latents ``[B, Dc, T]`` (same length as ``source``), or ``None`` when
                ``cond_dim == 0``.
            mask: ``[B, T]`` bool, ``True`` for real frames, ``False`` for padding (``None``: all real). Every item
                needs at least one real frame.
            target: the target latents ``[B, D, T]``. Used only with ``rms_reference="target"`` (the post-mortem's
                teacher-forced choice: the RMS factor is computed from the answer, which is unavailable at inference).

        Returns:
            :class:`CascadeOutput` with every stage's output and RMS factor.
        """
        self._check_inputs(source, conditioning, mask, target)
        if self.config.rms_reference == "target":
            if target is None:
                raise ValueError(
                    "config rms_reference='target' takes the RMS factor's reference from the answer: pass `target` "
                    "(at inference, where there is no target, use rms_reference='source')"
                )
            reference = target
        else:
            reference = source
        if mask is not None:
            frames = mask[:, None, :]  # [B, 1, T]
            source = source * frames.to(source.dtype)
            reference = reference * frames.to(reference.dtype)
            if conditioning is not None:
                conditioning = conditioning * frames.to(conditioning.dtype)
        log_levels = None
        if self.config.predict_gain:
            log_levels = _masked_rms(source, mask).log().flatten(1)  # [B, 1]
            if conditioning is not None:
                log_levels = torch.cat((log_levels, _masked_rms(conditioning, mask).log().flatten(1)), dim=1)  # [B, 2]
        level = None
        if self.config.normalize_input:
            level = _masked_rms(source, mask)  # [B, 1, 1] fp32
            source = (source.float() / level).to(source.dtype)
            reference = (reference.float() / level).to(reference.dtype)
            if conditioning is not None:
                conditioning = (conditioning.float() / _masked_rms(conditioning, mask)).to(conditioning.dtype)
        stages, scales, clamped, gains, raw_scales = [], [], [], [], []
        aim = _rms(reference, (1, 2))  # [B, 1, 1] what stage 1's factor aims at; stage k + 1's: times stage k's gain
        previous = source
        for stage in self.stages:
            result = stage(previous, conditioning, aim, mask, log_levels)
            aim = result.level
            previous = result.output  # [B, D, T]
            stages.append(previous if level is None else (previous.float() * level).to(previous.dtype))
            scales.append(stage.scale.last_scale)
            clamped.append(stage.scale.last_clamped_fraction)
            gains.append(result.gain)
            raw_scales.append(result.raw_scale)
        return CascadeOutput(
            stages=stages, scales=scales, clamped_fractions=clamped, gains=gains, raw_scales=raw_scales
        )


def _rebuild_cascade(config: dict[str, Any], state: dict[str, Tensor], training: bool) -> CascadeTransformer:
    model = CascadeTransformer(config)
    model.load_state_dict(state)
    return model.train(training)


def _calibration(p: Tensor, q: Tensor, r: float, eps: float) -> Tensor:
    """Per item, the ``lam [B, 1, 1] > 0`` with ``||lam * p + r * q|| = ||q||`` (``p, q [B, D, T]`` fp32, ``r < 1``):
    the root of ``a lam^2 + 2 r b lam - (1 - r^2) c = 0`` with ``a = ||p||^2, b = <p, q>, c = ||q||^2``, in the form
    without cancellation for the sign of ``b``. ``p`` orthogonal to ``q``: ``lam = sqrt((1 - r^2) c / a)``;
    ``p = mu * q``: ``lam = (1 - r) / mu``, so ``lam * p + r * q = q``."""
    a = p.square().sum(dim=(1, 2), keepdim=True)
    b = (p * q).sum(dim=(1, 2), keepdim=True)
    c = q.square().sum(dim=(1, 2), keepdim=True)
    root = (r * r * b.square() + a * (1.0 - r * r) * c + eps).sqrt()
    return torch.where(b >= 0, (1.0 - r * r) * c / (root + r * b + eps), (root - r * b) / (a + eps))


def _masked_time_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x [B, T, W]`` over real frames (``mask [B, T]``, True = real) -> ``[B, W]``."""
    if mask is None:
        return x.mean(dim=1)
    frames = mask[:, :, None].to(x.dtype)  # [B, T, 1]
    return (x * frames).sum(dim=1) / frames.sum(dim=1).clamp_min(1.0)


def _masked_rms(x: Tensor, mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Per-item RMS of ``x [B, C, T]`` over real frames (``mask [B, T]``) and channels, ``[B, 1, 1]`` fp32, + eps.

    ``||x||_2 / sqrt(n)`` rather than ``sqrt(mean(x^2))``: the norm's subgradient at 0 is 0, so silent input gives
    ``eps`` and no NaN gradient.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        if mask is None:
            count = torch.full((x.shape[0], 1, 1), float(x.shape[1] * x.shape[2]), device=x.device)
        else:
            frames = mask[:, None, :].float()  # [B, 1, T]
            x = x * frames
            count = (frames.sum(dim=2, keepdim=True) * x.shape[1]).clamp_min(1.0)  # [B, 1, 1]
        return torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True) / count.sqrt() + eps
