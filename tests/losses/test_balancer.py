"""``LossBalancer``: gradient shares set by the weights, in a real Trainer (fp32, bf16, fp16), EMA state in
checkpoints, non-finite safety, validation, rank agreement and argument errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_stability.losses import LossBalancer, LossWeights
from tests.helpers import make_trainer, regression_loader

CUDA = torch.cuda.is_available()

# Two losses on disjoint halves of the output, with scales a million apart: the balanced gradient's first half is
# the "big" loss's contribution and the second half the "tiny" loss's, so their norms are the shares.


def split_losses(y: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    h = y.shape[1] // 2
    return {
        "big": 1e3 * nn.functional.mse_loss(y[:, :h], target[:, :h]),
        "tiny": 1e-3 * nn.functional.l1_loss(y[:, h:], target[:, h:]),
    }


def half_norms(grad: torch.Tensor) -> tuple[float, float]:
    h = grad.shape[1] // 2
    return grad[:, :h].norm().item(), grad[:, h:].norm().item()


def test_first_call_gives_exact_shares_and_the_audiocraft_formula():
    torch.manual_seed(0)
    y = torch.randn(4, 6, requires_grad=True)
    target = torch.randn(4, 6)
    balancer = LossBalancer({"big": 3.0, "tiny": 1.0}, per_batch_item=False, total_norm=2.0)
    losses = split_losses(y, target)
    out = balancer(losses, y)
    g = {k: torch.autograd.grad(v, y, retain_graph=True)[0] for k, v in losses.items()}
    # EMA after one update is the current norm (bias-corrected), so G = R * (3/4 g_big/|g_big| + 1/4 g_tiny/|g_tiny|)
    expected = 2.0 * (0.75 * g["big"] / g["big"].norm() + 0.25 * g["tiny"] / g["tiny"].norm())
    assert torch.allclose(out.grad, expected, rtol=1e-5, atol=0)
    big, tiny = half_norms(out.grad)
    assert big / tiny == pytest.approx(3.0, rel=1e-5)
    assert out.shares["big"].item() == pytest.approx(0.75, rel=1e-5)
    # the raw gradient shares (audiocraft's monitor) are wildly unbalanced
    assert out.ratios["big"].item() > 0.999
    # the surrogate's gradient w.r.t. y is G, and its value is the effective loss sum_i scale_i * loss_i
    (grad_y,) = torch.autograd.grad(out.loss, y)
    assert torch.allclose(grad_y, expected, rtol=1e-5, atol=0)
    effective = sum(out.scales[k] * losses[k].detach() for k in losses)
    assert out.loss.item() == pytest.approx(effective.item(), rel=1e-6)
    assert out.effective_loss.item() == pytest.approx(effective.item(), rel=1e-6)
    assert set(out.log_dict()) == {
        f"balancer/{k}/{n}" for k in ("ratio", "share", "scale", "grad_norm") for n in losses
    }


def test_ema_is_bias_corrected_over_steps():
    balancer = LossBalancer({"a": 1.0}, per_batch_item=False, ema_decay=0.5)
    y = torch.ones(3, requires_grad=True)
    seen = []
    for k in (1.0, 3.0, 5.0):
        out = balancer({"a": k * y.sum()}, y)
        seen.append(out.ema_norms["a"].item())
    n = [math.sqrt(3) * k for k in (1.0, 3.0, 5.0)]
    assert seen[0] == pytest.approx(n[0])
    assert seen[1] == pytest.approx((0.5 * n[0] + n[1]) / 1.5)
    assert seen[2] == pytest.approx((0.25 * n[0] + 0.5 * n[1] + n[2]) / 1.75)


def test_per_batch_item_norm_is_the_mean_of_item_norms():
    balancer = LossBalancer({"a": 1.0}, per_batch_item=True)
    y = torch.zeros(2, 3, requires_grad=True)
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    out = balancer({"a": (y * weights).sum()}, y)
    assert out.norms["a"].item() == pytest.approx((1.0 + 5.0) / 2)


class BalancedModule(pl.LightningModule):
    """A linear model whose output feeds two losses of very different scales through a 3:1 balancer."""

    def __init__(self, weights=None, *, ema_decay: float = 0.9) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same initial model in every instance (full vs interrupted + resumed)
            self.net = nn.Linear(8, 4)
        self.balancer = LossBalancer(weights or {"big": 3.0, "tiny": 1.0}, ema_decay=ema_decay, per_batch_item=False)
        self.grads: list[torch.Tensor] = []
        self.outs = []

    def training_step(self, batch, batch_idx):
        x, target = batch
        y = self.net(x).float()
        losses = split_losses(y, target)
        out = self.balancer(losses, y)
        # registered after the balancer's own autograd.grad calls: sees only Lightning's backward
        y.register_hook(lambda g: self.grads.append(g.detach().float().clone()))
        self.outs.append(out)
        self.log_dict(out.log_dict())
        return {"loss": out.loss, "losses": {k: v.detach() for k, v in losses.items()}}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        # one batch an epoch: every step sees the same data, however a resumed run positions its loader
        return regression_loader(n=8, batch_size=8)


@pytest.mark.parametrize(
    "precision",
    [
        "32-true",
        "bf16-mixed",
        pytest.param("16-mixed", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="fp16 AMP needs CUDA")]),
    ],
)
def test_weights_3_to_1_give_gradient_shares_3_to_1_in_a_real_trainer(tmp_path, precision):
    module = BalancedModule()
    accelerator = "gpu" if precision == "16-mixed" else "cpu"
    trainer = make_trainer(tmp_path, max_steps=8, precision=precision, accelerator=accelerator)
    trainer.fit(module)
    assert len(module.grads) == 8
    for grad, out in zip(module.grads, module.outs):
        assert torch.isfinite(grad).all()
        grad = grad.cpu()
        big, tiny = half_norms(grad)
        # the EMA of the norms lags the current norm by a little as the model moves
        assert big / tiny == pytest.approx(3.0, rel=0.05)
        if precision == "32-true":  # what reached y through Lightning's backward is exactly G
            assert torch.allclose(grad, out.grad.cpu(), rtol=1e-5, atol=1e-12)
    assert trainer.callback_metrics["balancer/share/big"].item() == pytest.approx(0.75, rel=0.1)
    assert trainer.callback_metrics["balancer/ratio/big"].item() > 0.99


def test_without_balancing_the_tiny_loss_gets_no_gradient_share():
    y = torch.randn(4, 6, requires_grad=True)
    out = LossBalancer({"big": 3.0, "tiny": 1.0}, balance_grads=False)(split_losses(y, torch.randn(4, 6)), y)
    big, tiny = half_norms(out.grad)
    assert big / tiny > 1e4


def test_ema_state_is_in_the_checkpoint_and_a_resumed_run_continues_identically(tmp_path):
    # interrupted at an epoch boundary (8 batches an epoch), so the resumed run sees the same batches
    full = BalancedModule()
    make_trainer(tmp_path / "full", max_steps=16).fit(full)

    first = BalancedModule()
    trainer = make_trainer(tmp_path / "a", max_steps=8)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(state["balancer.ema_norms"], first.balancer.ema_norms)
    assert state["balancer.ema_weight"][0].item() == pytest.approx(sum(0.9**k for k in range(8)))
    second = BalancedModule()
    make_trainer(tmp_path / "b", max_steps=16).fit(second, ckpt_path=tmp_path / "half.ckpt")
    assert torch.equal(second.balancer.ema_norms, full.balancer.ema_norms)
    assert torch.equal(second.balancer.ema_weight, full.balancer.ema_weight)
    assert len(first.grads + second.grads) == len(full.grads) == 16
    for a, b in zip(first.grads + second.grads, full.grads):
        assert torch.equal(a, b)
    # without the EMA state (audiocraft's behaviour) the resumed run would have scaled its first steps differently
    fresh = BalancedModule()
    fresh.load_state_dict({k: v for k, v in state.items() if k.startswith("net.")}, strict=False)
    assert fresh.balancer.ema_weight.sum().item() == 0.0


def test_a_nan_loss_does_not_poison_the_ema():
    balancer = LossBalancer({"a": 1.0, "b": 1.0}, per_batch_item=False)
    y = torch.ones(4, requires_grad=True)
    balancer({"a": y.sum(), "b": (2 * y).sum()}, y)
    before = balancer.ema_norms.clone(), balancer.ema_weight.clone()
    out = balancer({"a": y.sum() * math.nan, "b": (2 * y).sum()}, y)
    assert not torch.isfinite(out.grad).all()  # this step is bad (a gradient guard skips it) ...
    assert torch.equal(balancer.ema_norms[0], before[0][0])  # ... but the EMA of `a` kept its state
    assert torch.equal(balancer.ema_weight[0], before[1][0])
    assert balancer.ema_weight[1] > before[1][1]  # `b` was updated
    out = balancer({"a": y.sum(), "b": (2 * y).sum()}, y)
    assert torch.isfinite(out.grad).all()


def test_validation_uses_current_scales_and_leaves_the_ema_alone():
    balancer = LossBalancer({"a": 3.0, "b": 1.0}, per_batch_item=False)
    y = torch.ones(4, requires_grad=True)
    with torch.no_grad():
        plain = balancer({"a": y.sum(), "b": (2 * y).sum()}, y)
    assert plain.loss.item() == pytest.approx(3.0 * 4 + 1.0 * 8)  # before any training step: plain weighted sum
    balancer({"a": y.sum(), "b": (2 * y).sum()}, y)
    state = balancer.state_dict()
    with torch.no_grad():
        out = balancer({"a": y.sum(), "b": (2 * y).sum()}, y)
    assert all(torch.equal(v, balancer.state_dict()[k]) for k, v in state.items())
    expected = 0.75 / 2.0 * 4 + 0.25 / 4.0 * 8  # scale_i = desired_i * R / EMA(|g_i|); |g_a| = 2, |g_b| = 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert not out.loss.requires_grad


def test_weight_zero_terms_are_left_out_and_live_loss_weights_are_followed():
    weights = LossWeights({"a": 1.0, "b": 1.0, "probe": 0.0})
    balancer = LossBalancer(weights, per_batch_item=False)
    y = torch.randn(2, 4, requires_grad=True)
    probe = torch.tensor(5.0)  # does not depend on y: fine at weight 0
    losses = {"a": y[:, :2].pow(2).sum(), "b": y[:, 2:].abs().sum(), "probe": probe}
    out = balancer(losses, y)
    assert set(out.scales) == {"a", "b"}
    assert half_norms(out.grad)[0] / half_norms(out.grad)[1] == pytest.approx(1.0, rel=1e-5)
    weights["a"] = 3.0  # a callback or the user changes the shared weights: the balancer follows
    out = balancer(losses, y)
    assert out.shares["a"].item() == pytest.approx(0.75, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": {}}, ValueError, "`weights` must name at least one entry"),
        ({"weights": [("a", 1.0)]}, TypeError, "`weights` must be a mapping"),
        ({"weights": {"a": 0.0}}, ValueError, r"needs at least one weight > 0, got \{'a': 0.0\}"),
        ({"weights": {"a": -1.0}}, ValueError, r"`a` must be a finite number >= 0, got -1.0"),
        ({"total_norm": 0.0}, ValueError, "`total_norm` must be finite and > 0, got 0.0"),
        ({"total_norm": "1"}, TypeError, "`total_norm` must be a real number"),
        ({"ema_decay": 0.0}, ValueError, "`ema_decay` must be finite and > 0, got 0.0"),
        ({"ema_decay": 1.5}, ValueError, r"`ema_decay` must be in \(0, 1\], got 1.5"),
        ({"eps": math.nan}, ValueError, "`eps` must be finite and > 0, got nan"),
        ({"balance_grads": 1}, TypeError, "`balance_grads` must be a bool, got 1"),
        ({"per_batch_item": "yes"}, TypeError, "`per_batch_item` must be a bool, got 'yes'"),
    ],
)
def test_argument_errors(kwargs, error, match):
    kwargs = {"weights": {"a": 1.0}, **kwargs}
    with pytest.raises(error, match=match):
        LossBalancer(**kwargs)


def test_call_errors():
    balancer = LossBalancer({"a": 1.0, "b": 1.0})
    y = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"terms without a weight: \['c'\]; known losses: \['a', 'b'\]"):
        balancer({"a": y.sum(), "b": y.sum(), "c": y.sum()}, y)
    with pytest.raises(ValueError, match=r"lacks the weighted terms \['b'\] \(it has \['a'\]\)"):
        balancer({"a": y.sum()}, y)
    with pytest.raises(ValueError, match=r"loss term `a` must be a scalar tensor, got \(2, 3\)"):
        balancer({"a": y * 1, "b": y.sum()}, y)
    with pytest.raises(ValueError, match="loss term `b` does not depend on `output`"):
        balancer({"a": y.sum(), "b": torch.ones((), requires_grad=True) * 2}, y)
    with pytest.raises(TypeError, match="`output` must be the model output tensor, got list"):
        balancer({"a": y.sum(), "b": y.sum()}, [y])


def test_fp16_output_warns_once():
    balancer = LossBalancer({"a": 1.0})
    y = torch.ones(2, 3, dtype=torch.float16, requires_grad=True)
    with pytest.warns(UserWarning, match="compute the balanced losses from `output.float\\(\\)`"):
        balancer({"a": y.float().sum()}, y)


class RankBalancedModule(BalancedModule):
    """Each rank sees different data; every rank writes its EMA after training."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        x, target = batch
        return super().training_step((x * (1 + 9 * self.global_rank), target), batch_idx)

    def on_train_end(self) -> None:
        state = {k: v.tolist() for k, v in self.balancer.state_dict().items()}
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(state))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ranks_agree_on_the_ema(tmp_path):
    module = RankBalancedModule(str(tmp_path))
    trainer = make_trainer(tmp_path, max_steps=4, devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    trainer.fit(module)
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a == b
    assert a["ema_weight"][0] > 0
