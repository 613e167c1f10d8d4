"""Codec-quality benchmark: ``CodecModule`` on the eSpeak NG Telugu speech corpus after a fixed training budget, with
and without the kit callbacks, against a peer recipe (EnCodec's architecture and losses) at the same budget and bitrate.

Data: ``SpeechCorpusDataModule`` (Telugu, eSpeak NG, loudness-normalised to -16 LUFS, 24 kHz), training crops of
``segment_seconds``; evaluation on the held-out utterances (the module's ``val`` split: utterances never trained on),
each utterance whole (cropped to at most ``eval_max_seconds``) through ``encode``/``decode``-equivalent inference.

Recipes (all at 6 kbps: 8 codebooks x 1024 codes (10 bits) x 75 frames/s at 24 kHz, hop 320 = ratios 8, 5, 4, 2; the
same SEANet width ``n_filters``, LSTM depth, batch, crop, steps and learning rate):

- ``kit``: ``CodecModule`` built exactly as ``lightning_stability.reference.codec.demo`` builds it (unbounded decoder,
  EnCodec scale normalisation, RMS-output safety clamp, the demo's losses and weights, which the JSON records in
  ``cases[].codec_hparams``) with the demo's kit callbacks (``demo.build_callbacks`` without its checkpoint and
  progress bar: ``GradientGuard``, ``AdaptiveLossWeight("mel")``, ``ScaleFactorClamp``, ``SignalMonitor``,
  ``StabilityReport`` written to a temporary folder);
- ``no_kit``: the same ``CodecModule``, no callbacks;
- ``peer_encodec``: the ``encodec`` package's ``SEANetEncoder``/``SEANetDecoder``/``ResidualVectorQuantizer`` built
  without pretrained weights (its defaults: EMA codebooks, k-means init (10 iterations instead of 50, as ours, for
  CPU time), dead-code threshold 2), trained with
  EnCodec's non-adversarial losses (Défossez et al. 2022, §3.4): ``0.1 x L1(time) + 1 x sum_{i=5..11} (L1 + L2) of
  64-band mel spectrograms (window 2^i, hop 2^i / 4) + 1 x commitment``, Adam betas (0.5, 0.9) (EnCodec's), no
  discriminator (none of the recipes uses one at this budget). Skipped, with a message, when ``encodec`` is not
  installed (``pip install encodec``).

Metrics on the held-out utterances: SI-SNR (dB, Le Roux et al. 2019 with zero-mean signals, torchmetrics
``scale_invariant_signal_noise_ratio``, mean over utterances), mel distance (DAC's definition,
``lightning_stability.losses.spectral.mel_distance``, mean over utterances), RMS ratio (output RMS / input RMS over all
held-out samples), wide-band PESQ (ITU-T P.862.2 by the ``pesq`` package, both signals resampled from 24 kHz to the
16 kHz the standard requires), STOI (``pystoi``, which resamples to its native 10 kHz), the loudness error
``|L(recon) - L(original)|`` and its signed mean (LU; BS.1770-4 integrated loudness by ``pyloudnorm``) (all three from
``lightning_stability.metrics.perceptual``, means over the utterances each can score, ``quality_skipped`` counting the
rest), DC offset (mean of the output over all held-out samples), codebook usage per stage (perplexity of
the code histogram over all held-out frames, out of 1024, and the fraction of codes never used), bitrate
(n_q x log2(codebook_size) x frame rate). Training wall time and steps are recorded. Published references
(their papers; trained for days on GPUs): EnCodec 6 kbps SI-SDR 5.99 dB, mel distance 1.83; DAC 5.33 kbps SI-SDR
8.13 dB, mel distance 1.07. A CPU budget of minutes gets nowhere near them; the comparison that matters is between
the recipes at the same budget.

Target: the kit recipe is at least as good as the peer on SI-SNR and mel distance at the same budget and bitrate,
and finishes finite. (At a CPU budget of minutes every recipe's SI-SNR is below 0 dB: the mel-dominated losses
shape the magnitude spectrum long before the waveform's phase; the SI-SNR comparison is then between noise levels.)

JSON (``benchmarks/results/codec_quality.json``; common layout in ``benchmarks/_common.py``)::

    cases: [{"recipe": "kit"|"no_kit"|"peer_encodec", "description", "skipped": null | "<why>",
             "params": int, "steps": int, "train_wall_s": float, "final_train_loss": float, "finite": bool,
             "eval": {"si_snr_db", "mel_distance", "rms_ratio", "pesq", "stoi", "loudness_error_lu", "loudness_diff_lu",
                      "quality_skipped", "dc_offset", "perplexity": [8], "dead_fraction": [8],
                      "mean_perplexity", "mean_dead_fraction", "bitrate_kbps", "num_utterances", "seconds"},
             "kit_stats": {...} (kit only)}]
    summary: {"target", "target_met", "kit_vs_peer": {"si_snr_db": kit - peer, "mel_distance": kit - peer},
              "kit_vs_no_kit": {...}, "budget": {"steps", "batch_size", "segment_seconds"}}

Usage::

    python benchmarks/codec_quality.py           # full mode: 240-utterance corpus, 300 steps per recipe
    python benchmarks/codec_quality.py --quick   # CI mode: 24 utterances, 12 steps per recipe
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

SAMPLE_RATE = 24000
N_Q = 8
CODEBOOK_SIZE = 1024
RATIOS = (8, 5, 4, 2)
FRAME_RATE = SAMPLE_RATE / math.prod(RATIOS)  # 75 Hz
BITRATE_KBPS = N_Q * math.log2(CODEBOOK_SIZE) * FRAME_RATE / 1000  # 6.0


# ---------------------------------------------------------------------------------------------------------------------
# the peer: EnCodec's architecture and losses from the `encodec` package, no pretrained weights
# ---------------------------------------------------------------------------------------------------------------------
def encodec_available() -> str | None:
    """``None`` when the ``encodec`` package imports, else the reason it does not."""
    try:
        import encodec  # noqa: F401
        from encodec.modules import SEANetDecoder, SEANetEncoder  # noqa: F401
        from encodec.quantization import ResidualVectorQuantizer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"the `encodec` package is not importable ({type(exc).__name__}: {exc}); `pip install encodec`"
    return None


class EncodecMelLoss(nn.Module):
    """EnCodec's frequency-domain loss: ``sum_{i=5..11} mean|S_i(x) - S_i(y)| + mean (S_i(x) - S_i(y))^2`` over
    64-band mel spectrograms ``S_i`` with window ``2^i`` and hop ``2^i / 4`` (Défossez et al. 2022, eq. 1).

    The FFT size is ``max(2^i, 128)`` (the window zero-padded for i = 5, 6) so that 64 mel bands never get an empty
    filter; the window length, hop and band count are EnCodec's."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__()
        import torchaudio

        self.specs = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate,
                n_fft=max(2**i, 128),  # at least 65 frequency bins for 64 mel bands (window 2^i)
                win_length=2**i,
                hop_length=2**i // 4,
                n_mels=64,
                normalized=True,
                power=1.0,
            )
            for i in range(5, 12)
        )

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        loss = preds.new_zeros(())
        for spec in self.specs:
            a, b = spec(preds.float()), spec(target.float())
            loss = loss + F.l1_loss(a, b) + F.mse_loss(a, b)
        return loss


class EncodecPeer(pl.LightningModule):
    """EnCodec (``encodec`` package modules, random init) trained with EnCodec's non-adversarial losses."""

    def __init__(self, *, n_filters: int, lstm: int, lr: float) -> None:
        super().__init__()
        from encodec.modules import SEANetDecoder, SEANetEncoder
        from encodec.quantization import ResidualVectorQuantizer

        self.sample_rate = SAMPLE_RATE
        common = {"channels": 1, "dimension": 128, "n_filters": n_filters, "ratios": list(RATIOS), "lstm": lstm}
        self.encoder = SEANetEncoder(**common, causal=False, norm="weight_norm")
        self.decoder = SEANetDecoder(**common, causal=False, norm="weight_norm")
        # k-means iterations 10 (encodec's default 50 costs minutes on CPU; ours uses 10 too)
        self.quantizer = ResidualVectorQuantizer(dimension=128, n_q=N_Q, bins=CODEBOOK_SIZE, kmeans_iters=10)
        self.mel = EncodecMelLoss()
        self.lr = lr
        self.hop = math.prod(RATIOS)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``audio [B, 1, T] -> (reconstruction [B, 1, T], codes [B, n_q, F], commitment penalty)``."""
        length = audio.shape[-1]
        x = F.pad(audio, (0, (-length) % self.hop))
        q = self.quantizer(self.encoder(x), FRAME_RATE, BITRATE_KBPS)
        y = self.decoder(q.quantized)[..., :length]
        return y, q.codes.transpose(0, 1), q.penalty  # encodec's codes are [n_q, B, F]

    def training_step(self, batch, batch_idx):
        audio = batch[0] if isinstance(batch, (list, tuple)) else batch
        y, _, penalty = self(audio)
        losses = {"l1": F.l1_loss(y, audio), "mel": self.mel(y, audio), "commit": penalty}
        total = 0.1 * losses["l1"] + losses["mel"] + losses["commit"]
        return {
            "loss": total,
            "losses": {k: v.detach() for k, v in losses.items()},
            "preds": y.detach(),
            "target": audio,
        }

    @torch.no_grad()
    def reconstruct(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        y, codes, _ = self(audio)
        return y, codes

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.5, 0.9))


# ---------------------------------------------------------------------------------------------------------------------
# our codec
# ---------------------------------------------------------------------------------------------------------------------
def demo_config(*, n_filters: int, lstm: int, lr: float, quick: bool, seed: int, steps: int):
    """The demo's configuration at this benchmark's width, learning rate and budget (everything else: the demo's)."""
    from lightning_stability.reference.codec.demo import DemoConfig

    return DemoConfig(
        n_filters=n_filters,
        lstm=lstm,
        lr=lr,
        seed=seed,
        max_steps=steps,
        sample_rate=SAMPLE_RATE,
        n_q=N_Q,
        codebook_size=CODEBOOK_SIZE,
        progress=False,
        quick=quick,
    )


def codec_module(config):
    """``CodecModule`` as the demo builds it: the recipe (``reference/codec/recipe.py``: ``CodecModule``'s default
    objective, the demo's output safety net) at this benchmark's width, so it measures the codec the project ships."""
    from lightning_stability.reference.codec.recipe import demo_codec

    return demo_codec(
        sample_rate=config.sample_rate,
        n_filters=config.n_filters,
        lstm=config.lstm,
        n_q=config.n_q,
        codebook_size=config.codebook_size,
        kmeans_iters=3 if config.quick else 10,
        lr=config.lr,
        seed=config.seed,
    )


def kit_callbacks(config, root: Path) -> list[Any]:
    """The demo's kit (``lightning_stability.reference.codec.demo.build_callbacks``) without its checkpoint and
    progress bar."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from lightning_stability.reference.codec.demo import build_callbacks

    return [cb for cb in build_callbacks(config, root / "report") if not isinstance(cb, (ModelCheckpoint, ProgressBar))]


@torch.no_grad()
def reconstruct(model: pl.LightningModule, audio: Tensor) -> tuple[Tensor, Tensor]:
    """``(reconstruction [B, 1, T], codes [B, n_q, F])`` of either recipe."""
    if isinstance(model, EncodecPeer):
        return model.reconstruct(audio)
    out = model(audio)
    return out.audio, out.codes


# ---------------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: pl.LightningModule, clips: list[Tensor]) -> dict[str, Any]:
    """Held-out metrics of ``model.reconstruct`` over ``clips`` (each ``[1, T]``)."""
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    from lightning_stability.losses.spectral import mel_distance
    from lightning_stability.metrics.functional import codebook_histogram, codebook_perplexity, dead_code_fraction
    from lightning_stability.metrics.perceptual import loudness_error, stoi, wideband_pesq

    quality_fns = {
        "pesq": lambda y, x: wideband_pesq(y, x, SAMPLE_RATE, on_error="nan"),  # resampled to 16 kHz (P.862.2)
        "stoi": lambda y, x: stoi(y, x, SAMPLE_RATE, on_error="nan"),  # pystoi resamples to its 10 kHz
        "loudness_diff_lu": lambda y, x: loudness_error(y, x, SAMPLE_RATE, signed=True, on_error="nan"),
    }
    quality: dict[str, list[float]] = {k: [] for k in quality_fns}
    model.eval()
    si_snr, mel, sq_pred, sq_target, seconds, dc_sum, n_samples = [], [], 0.0, 0.0, 0.0, 0.0, 0
    hist = torch.zeros(N_Q, CODEBOOK_SIZE, dtype=torch.long)
    finite = True
    for clip in clips:
        audio = clip[None]  # [1, 1, T]
        y, codes = reconstruct(model, audio)
        finite = finite and bool(torch.isfinite(y).all())
        si_snr.append(float(scale_invariant_signal_noise_ratio(y, audio).mean()))
        dc_sum += float(y.double().sum())
        mel.append(float(mel_distance(y, audio, SAMPLE_RATE)))
        for key, fn in quality_fns.items():
            quality[key].append(float(fn(y.float(), audio)))
        sq_pred += float(y.double().pow(2).sum())
        sq_target += float(audio.double().pow(2).sum())
        seconds += audio.shape[-1] / SAMPLE_RATE
        n_samples += audio.numel()
        hist += codebook_histogram(codes.long().cpu(), CODEBOOK_SIZE, N_Q)
    perplexity = codebook_perplexity(hist)
    dead = dead_code_fraction(hist)

    def mean(values: list[float]) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    return {
        "si_snr_db": sum(si_snr) / len(si_snr),
        "mel_distance": sum(mel) / len(mel),
        "rms_ratio": math.sqrt(sq_pred / sq_target) if sq_target > 0 else float("nan"),
        "dc_offset": dc_sum / max(1, n_samples),
        "perplexity": [round(float(v), 2) for v in perplexity],
        "dead_fraction": [round(float(v), 4) for v in dead],
        "mean_perplexity": float(perplexity.mean()),
        "mean_dead_fraction": float(dead.mean()),
        "pesq": mean(quality["pesq"]),
        "stoi": mean(quality["stoi"]),
        "loudness_error_lu": mean([abs(v) for v in quality["loudness_diff_lu"]]),
        "loudness_diff_lu": mean(quality["loudness_diff_lu"]),
        "quality_skipped": {k: sum(1 for v in vals if not math.isfinite(v)) for k, vals in quality.items()},
        "bitrate_kbps": BITRATE_KBPS,
        "num_utterances": len(clips),
        "seconds": round(seconds, 2),
        "finite": finite,
    }


def kit_stats(callbacks: list[Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for cb in callbacks:
        name = type(cb).__name__
        if name == "GradientGuard":
            stats["guard_skipped"] = int(cb.num_skipped)
        if name == "AdaptiveLossWeight":
            stats["mel_weight_events"] = dict(cb.event_log.num_events)
    return stats


def train_recipe(
    recipe: str, datamodule, *, steps: int, n_filters: int, lstm: int, lr: float, quick: bool, seed: int, root: Path
) -> tuple[pl.LightningModule, dict[str, Any]]:
    pl.seed_everything(seed, workers=True, verbose=False)
    config = demo_config(n_filters=n_filters, lstm=lstm, lr=lr, quick=quick, seed=seed, steps=steps)
    if recipe == "peer_encodec":
        model = EncodecPeer(n_filters=n_filters, lstm=lstm, lr=lr)
    else:
        model = codec_module(config)
    callbacks = kit_callbacks(config, root / recipe) if recipe == "kit" else []

    class LastLoss(pl.Callback):
        value = float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == steps:
                self.value = float(outputs["loss"])

    last = LastLoss()
    trainer = _common.make_trainer(root / recipe, [*callbacks, last], max_steps=steps)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - t0
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": trainer.global_step,
        "train_wall_s": round(wall, 1),
        "s_per_step": round(wall / max(1, trainer.global_step), 3),
        "final_train_loss": last.value,
    }
    if recipe == "kit":
        info["kit_stats"] = kit_stats(callbacks)
        info["callbacks"] = [type(cb).__name__ for cb in callbacks]
    if recipe != "peer_encodec":
        info["codec_hparams"] = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_")}
    return model, info


DESCRIPTIONS = {
    "kit": "the demo's CodecModule + the demo's kit: GradientGuard, AdaptiveLossWeight(mel), ScaleFactorClamp, "
    "SignalMonitor, StabilityReport",
    "no_kit": "the demo's CodecModule, no callbacks",
    "peer_encodec": "encodec package SEANet + RVQ (random init), EnCodec losses (0.1 L1 + mel L1+L2 + commitment), "
    "Adam betas (0.5, 0.9)",
}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _package_versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    p = _common.parser("codec_quality", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per recipe (default 300, quick 12)")
    p.add_argument("--cache-dir", type=Path, default=None, help="speech corpus cache (default: a temporary folder)")
    p.add_argument("--recipes", default="kit,no_kit,peer_encodec", help="comma-separated recipes to run")
    args = p.parse_args()
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    quick = args.quick
    steps = args.steps or (12 if quick else 300)
    cfg = {
        "num_utterances": 24 if quick else 240,
        "num_voices": 4 if quick else 8,
        "batch_size": 4 if quick else 8,
        "segment_seconds": 0.5,
        "n_filters": 4 if quick else 8,
        "lstm": 1,
        "lr": 1e-3,
        "eval_max_seconds": 2.0 if quick else 4.0,
        "eval_max_utterances": 4 if quick else 24,
    }
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in DESCRIPTIONS]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; the recipes are {list(DESCRIPTIONS)}")

    from lightning_stability.reference.data import SpeechCorpusDataModule

    with tempfile.TemporaryDirectory(prefix="codec_quality_") as tmp:
        root = Path(tmp)
        cache = args.cache_dir or root / "speech_corpus"
        datamodule = SpeechCorpusDataModule(
            cache,
            language="te",
            num_utterances=cfg["num_utterances"],
            num_voices=cfg["num_voices"],
            sample_rate=SAMPLE_RATE,
            segment_seconds=cfg["segment_seconds"],
            batch_size=cfg["batch_size"],
            val_fraction=0.1,
            loudness_lufs=-16.0,
            seed=args.seed,
            cache_audio=True,
        )
        t0 = time.perf_counter()
        datamodule.prepare_data()
        datamodule.setup("fit")
        corpus_s = time.perf_counter() - t0
        held_out = datamodule.utterances("val")[: cfg["eval_max_utterances"]]
        max_len = int(cfg["eval_max_seconds"] * SAMPLE_RATE)
        clips = [datamodule.load(u.path)[:, :max_len] for u in held_out]

        cases = []
        for recipe in recipes:
            case: dict[str, Any] = {"recipe": recipe, "description": DESCRIPTIONS[recipe], "skipped": None}
            if recipe == "peer_encodec":
                reason = encodec_available()
                if reason is not None:
                    print(f"[codec_quality] skipping the peer recipe: {reason}", flush=True)
                    case["skipped"] = reason
                    cases.append(case)
                    continue
            model, info = train_recipe(
                recipe,
                datamodule,
                steps=steps,
                n_filters=cfg["n_filters"],
                lstm=cfg["lstm"],
                lr=cfg["lr"],
                quick=quick,
                seed=args.seed,
                root=root,
            )
            case.update(info)
            case["eval"] = evaluate(model, clips)
            case["finite"] = bool(case["eval"]["finite"] and math.isfinite(info["final_train_loss"]))
            cases.append(case)
            ev = case["eval"]
            print(
                f"[codec_quality] {recipe}: SI-SNR {ev['si_snr_db']:.2f} dB, mel distance {ev['mel_distance']:.3f}, "
                f"RMS ratio {ev['rms_ratio']:.3f}, PESQ {_fmt(ev['pesq'])}, STOI {_fmt(ev['stoi'])}, "
                f"loudness error {_fmt(ev['loudness_error_lu'], '.2f')} LU, perplexity {ev['mean_perplexity']:.1f}, "
                f"{info['train_wall_s']:.0f} s for {info['steps']} steps",
                flush=True,
            )

    by = {c["recipe"]: c for c in cases if c.get("eval")}

    def diff(a: str, b: str) -> dict[str, float] | None:
        if a not in by or b not in by:
            return None
        keys = ("si_snr_db", "mel_distance", "rms_ratio", "pesq", "stoi", "loudness_error_lu")
        return {
            k: by[a]["eval"][k] - by[b]["eval"][k]
            for k in keys
            if by[a]["eval"].get(k) is not None and by[b]["eval"].get(k) is not None
        }

    kit_vs_peer = diff("kit", "peer_encodec")
    target_met = bool(
        kit_vs_peer is not None
        and by["kit"]["finite"]
        and kit_vs_peer["si_snr_db"] >= 0
        and kit_vs_peer["mel_distance"] <= 0
    )
    summary = {
        "target": "kit recipe >= peer on SI-SNR and <= peer on mel distance at the same budget and bitrate, finite",
        "target_met": target_met,
        "kit_vs_peer": kit_vs_peer,
        "kit_vs_no_kit": diff("kit", "no_kit"),
        "budget": {"steps": steps, "batch_size": cfg["batch_size"], "segment_seconds": cfg["segment_seconds"]},
        "bitrate_kbps": BITRATE_KBPS,
        "peer_skipped": next((c["skipped"] for c in cases if c["recipe"] == "peer_encodec" and c["skipped"]), None),
    }
    config = {
        "quick": quick,
        "seed": args.seed,
        "steps": steps,
        **cfg,
        "sample_rate": SAMPLE_RATE,
        "n_q": N_Q,
        "codebook_size": CODEBOOK_SIZE,
        "ratios": list(RATIOS),
        "frame_rate_hz": FRAME_RATE,
        "corpus": "SpeechCorpusDataModule(language='te', loudness_lufs=-16), val split held out",
        "corpus_prepare_s": round(corpus_s, 1),
        "quality_packages": _package_versions("pesq", "pystoi", "pyloudnorm"),
    }
    out = _common.write_result(
        "codec_quality", args, config=config, cases=cases, summary=summary, started=started, machine=machine
    )
    parts = [
        f"{c['recipe']} SI-SNR {c['eval']['si_snr_db']:.2f} dB / mel {c['eval']['mel_distance']:.3f}"
        for c in cases
        if c.get("eval")
    ]
    print(
        f"codec_quality ({steps} steps, {BITRATE_KBPS:g} kbps): "
        + "; ".join(parts)
        + f"; target {'met' if target_met else 'NOT met'} -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
