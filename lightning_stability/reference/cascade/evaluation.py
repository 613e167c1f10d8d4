"""The cascade's held-out evaluation: what the example, the cascade benchmark and the docs report."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_stability.reference.cascade.module import CascadeTransformerModule, masked_distance
from lightning_stability.reference.data.latents import LatentPairDataModule

__all__ = ["evaluate"]


def evaluate(model: CascadeTransformerModule, data: LatentPairDataModule) -> dict:
    """Held-out amplitude and distance of every stage, on the validation split's windows.

    Per stage: masked L1 to the clean latents (and, for ``input``, of the degraded input: doing nothing), its gain
    over doing nothing ``1 - L1_k / L1_input``, the mean RMS factor, the share of windows whose factor was clamped,
    and the global output/target RMS ratio over real frames ``sqrt(sum y_k^2 / sum target^2)``.
    """
    model.eval()
    n_stages = model.config.n_stages
    l1 = {"input": 0.0, **{f"stage{k + 1}": 0.0 for k in range(n_stages)}}
    scales, clamped, sq_out = [0.0] * n_stages, [0.0] * n_stages, [0.0] * n_stages
    window_ratios: list[list[Tensor]] = [[] for _ in range(n_stages)]
    sq_target, windows, batches = 0.0, 0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            result = model.compute(batch)
            mask, target = batch["mask"], batch["target"]
            frames = mask[:, None, :].float()
            size = target.shape[0]
            l1["input"] += float(masked_distance(batch["source"], target, mask)) * size
            sq_target += float((target.float().square() * frames).sum())
            for k, y in enumerate(result["output"].stages):
                l1[f"stage{k + 1}"] += float(masked_distance(y, target, mask)) * size
                scales[k] += float(result["output"].scales[k].sum())
                clamped[k] += float(result["output"].clamped_fractions[k]) * size
                sq_out[k] += float((y.float().square() * frames).sum())
                window_ratios[k].append(
                    ((y.float().square() * frames).sum((1, 2)) / (target.float().square() * frames).sum((1, 2))).sqrt()
                )
            windows += size
            batches += 1
    l1 = {name: value / windows for name, value in l1.items()}
    return {
        "val_l1": l1,
        "val_gain_over_input": {name: 1.0 - value / l1["input"] for name, value in l1.items() if name != "input"},
        "val_rms_factor": [s / windows for s in scales],
        "val_clamped_fraction": [c / windows for c in clamped],
        "val_rms_ratio": [(s / max(sq_target, 1e-12)) ** 0.5 for s in sq_out],
        "val_rms_ratio_window_quantiles": [  # 10 %, 50 %, 90 % of the per-window ratios
            [float(q) for q in torch.cat(r).quantile(torch.tensor([0.1, 0.5, 0.9]))] for r in window_ratios
        ],
        "val_windows": windows,
        "val_batches": batches,
    }
