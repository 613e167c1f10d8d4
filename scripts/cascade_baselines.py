"""How much of the held-out gap to the clean latents can simple maps close? Baselines for the cascade's gain.

    python scripts/cascade_baselines.py [random|CODEC.ckpt] [ROOT]

On the latents ``benchmarks/cascade_amplitude.py`` trains on (the 240-utterance eSpeak NG corpus cached under ``ROOT``,
default ``$CASCADE_EXP_ROOT`` or ``cascade_exp``; the same split), per held-out utterance: masked L1 of doing nothing
(the degraded source), of the source rescaled to the target's RMS (an oracle that fixes only the level and reads the
answer to do it), of the best single scalar gain per utterance (an oracle too), and of a per-frame ridge regression
from the source (+-k frames of context) to the target fitted on the training split. Printed as gains over doing
nothing (``1 - L1 / L1_input``), weighted by frames like the cascade's evaluation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_stability.reference.data import LatentPairDataModule


def _frames(items, k: int):
    xs, ys, ss = [], [], []
    for item in items:
        s, t = item.source.float(), item.target.float()  # [D, T]
        length = s.shape[1]
        padded = F.pad(s[None], (k, k), mode="replicate")[0]
        context = torch.cat([padded[:, i : i + length] for i in range(2 * k + 1)], dim=0)  # [(2k + 1) D, T]
        xs.append(torch.cat([context, torch.ones(1, length)], dim=0).T)
        ys.append(t.T)
        ss.append(s.T)
    return torch.cat(xs), torch.cat(ys), torch.cat(ss)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    encoder = argv[0] if argv else "random"
    root = Path(argv[1] if len(argv) > 1 else os.environ.get("CASCADE_EXP_ROOT", "cascade_exp"))
    data = LatentPairDataModule(
        encoder=None if encoder == "random" else encoder,
        corpus={"cache_dir": root / "speech_corpus", "num_utterances": 240, "num_voices": 8},
        cache_dir=root / "latent_cache",
        segment_frames=150,
        batch_size=8,
        val_fraction=0.1,
    )
    data.prepare_data()
    data.setup("fit")
    train, val = data.items("train"), data.items("val")
    l1_in = l1_level = l1_scalar = count = 0.0
    gains = torch.linspace(0.3, 3.0, 271)
    for item in val:
        s, t = item.source.float(), item.target.float()
        level = t.square().mean().sqrt() / s.square().mean().sqrt()
        n = s.numel()
        l1_in += float((s - t).abs().mean()) * n
        l1_level += float((level * s - t).abs().mean()) * n
        l1_scalar += min(float((g * s - t).abs().mean()) for g in gains) * n
        count += n
    print(f"{encoder}: held-out L1 of doing nothing {l1_in / count:.3f}")
    print(f"  level oracle (source x rms(target) / rms(source)): gain {1 - l1_level / l1_in:+.3f}")
    print(f"  best scalar gain per utterance (oracle): gain {1 - l1_scalar / l1_in:+.3f}")
    for k in (0, 2):
        x, y, _ = _frames(train, k)
        xv, yv, sv = _frames(val, k)
        weights = torch.linalg.solve(x.T @ x + 10.0 * torch.eye(x.shape[1]), x.T @ y)
        pred = xv @ weights
        gain = 1 - float((pred - yv).abs().mean()) / float((sv - yv).abs().mean())
        ratio = float(pred.square().mean().sqrt() / yv.square().mean().sqrt())
        print(f"  ridge regression, +-{k} frames of context: gain {gain:+.3f}, output/target RMS {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
