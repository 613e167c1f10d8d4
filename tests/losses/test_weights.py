import copy
import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_stability.losses import LossWeights
from lightning_stability.losses.weights import SpikeDamping
from tests.helpers import make_trainer, regression_loader


def test_weighted_sum_is_the_hand_computed_combination():
    lw = LossWeights({"mel": 2.5, "l1": 1.0, "sisnr": 0.0})
    losses = {"mel": torch.tensor(2.0), "l1": torch.tensor(0.5), "sisnr": torch.tensor(-3.0)}
    assert lw.weighted_sum(losses).item() == pytest.approx(2.5 * 2.0 + 1.0 * 0.5)
    assert set(lw.weighted_terms(losses)) == {"mel", "l1"}
    assert lw.names == ("mel", "l1", "sisnr")
    assert lw.as_dict() == {"mel": 2.5, "l1": 1.0, "sisnr": 0.0}
    assert dict(lw) == lw.as_dict()
    assert len(lw) == 3
    assert "mel" in lw
    assert "x" not in lw


def test_zero_weight_term_is_logged_not_optimised_and_cannot_poison_the_total():
    lw = LossWeights({"a": 1.0, "diag": 0.0})
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    diag = lw.compute("diag", lambda t: (t * float("nan")).sum(), x)
    assert not diag.requires_grad
    assert math.isnan(diag.item())
    with lw.maybe_no_grad("a"):
        a = (x**2).sum()
    assert a.requires_grad
    total = lw.weighted_sum({"a": a, "diag": diag})
    total.backward()
    assert torch.isfinite(total)
    assert torch.equal(x.grad, 2 * x.detach())
    assert lw.is_optimised("a")
    assert not lw.is_optimised("diag")


def test_setitem_and_update_validate_and_leave_the_weights_unchanged_on_error():
    lw = LossWeights({"mel": 2.5, "l1": 1.0})
    lw["mel"] = 3
    assert lw["mel"] == 3.0
    assert isinstance(lw["mel"], float)
    with pytest.raises(ValueError, match=r"unknown loss name 'mle'; known losses: \['mel', 'l1'\]"):
        lw["mle"] = 1.0
    with pytest.raises(ValueError, match=r"unknown loss name 'x'.*\['mel', 'l1'\]"):
        lw["x"]  # noqa: B018
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match=rf"`mel` must be a finite number >= 0, got {bad!r}"):
            lw["mel"] = bad
    for bad in (True, "2", torch.tensor(2.0), None):
        with pytest.raises(TypeError, match=r"`mel` must be a number"):
            lw["mel"] = bad
    with pytest.raises(TypeError, match=r"a tensor would need a host synchronisation to validate\), got tensor\(2"):
        lw["mel"] = torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"`l1` must be a finite number >= 0, got -1.0"):
        lw.update({"mel": 4.0, "l1": -1.0})
    with pytest.raises(ValueError, match=r"unknown loss name 'mle'"):
        lw.update({"mel": 4.0, "mle": 1.0})
    with pytest.raises(TypeError, match="`weights` must be a mapping of names to numbers, got 4.0"):
        lw.update(4.0)
    lw.update({})
    assert lw.as_dict() == {"mel": 3.0, "l1": 1.0}
    assert lw.get("nope") is None
    assert lw.get("mel") == 3.0


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        ({}, ValueError, r"`weights` must name at least one entry, got \{\}"),
        ([("mel", 1.0)], TypeError, r"`weights` must be a mapping of names to numbers, got \[\('mel', 1.0\)\]"),
        ({"": 1.0}, ValueError, "`weights` keys must be non-empty strings, got ''"),
        ({3: 1.0}, TypeError, "`weights` keys must be non-empty strings, got 3"),
        ({"mel": -1.0}, ValueError, r"`mel` must be a finite number >= 0, got -1.0"),
        ({"mel": float("nan")}, ValueError, r"`mel` .* got nan"),
        ({"mel": float("inf")}, ValueError, r"`mel` .* got inf"),
        ({"mel": False}, TypeError, r"`mel` must be a number, got False"),
        ({"mel": torch.tensor(1.0)}, TypeError, r"`mel` must be a number \(a Python float"),
    ],
)
def test_constructor_argument_errors(weights, error, match):
    with pytest.raises(error, match=match):
        LossWeights(weights)


def test_weighted_sum_rejects_unknown_missing_and_non_scalar_terms():
    lw = LossWeights({"mel": 1.0, "adv": 0.5})
    with pytest.raises(ValueError, match=r"terms without a weight: \['mle'\]; known losses: \['mel', 'adv'\]"):
        lw.weighted_sum({"mel": torch.tensor(1.0), "adv": torch.tensor(1.0), "mle": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"lacks the weighted terms \['adv'\] \(it has \['mel'\]\)"):
        lw.weighted_sum({"mel": torch.tensor(1.0)})
    assert lw.weighted_sum({"mel": torch.tensor(2.0)}, allow_missing=True).item() == 2.0
    with pytest.raises(ValueError, match=r"loss term `mel` must be a scalar tensor, got shape \(3,\)"):
        lw.weighted_sum({"mel": torch.ones(3), "adv": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="loss term `mel` must be a tensor, got float"):
        lw.weighted_sum({"mel": 1.0, "adv": torch.tensor(1.0)})


def test_half_precision_terms_are_weighted_in_fp32():
    lw = LossWeights({"a": 3.0})
    out = lw.weighted_sum({"a": torch.tensor(1.001, dtype=torch.bfloat16)})
    assert out.dtype == torch.float32
    assert out.item() == 3.0 * torch.tensor(1.001, dtype=torch.bfloat16).float().item()


def test_damping_caps_the_term_at_max_ratio_times_reference_and_scales_its_gradient():
    lw = LossWeights({"mel": 2.0, "l1": 1.0})
    ref = torch.tensor(float("nan"))
    damping = lw.register_damping("mel", ref, max_ratio=2.0)
    x = torch.tensor(100.0, requires_grad=True)
    l1 = torch.tensor(1.0)
    # no reference yet (NaN): nothing is damped
    assert lw.weighted_sum({"mel": x, "l1": l1}).item() == 201.0
    assert damping.last_factor.item() == 1.0
    ref.fill_(2.5)  # the owner updates the reference in place
    total = lw.weighted_sum({"mel": x, "l1": l1})
    ratio = 100.0 / 2.5
    factor = 2.0 / ratio
    assert damping.last_factor.item() == pytest.approx(factor)
    assert total.item() == pytest.approx(2.0 * 100.0 * factor + 1.0)  # = w * r * ref + l1
    total.backward()
    assert x.grad.item() == pytest.approx(2.0 * factor)
    # below the limit: untouched
    assert lw.weighted_sum({"mel": torch.tensor(4.9), "l1": l1}).item() == pytest.approx(2 * 4.9 + 1)
    assert damping.last_factor.item() == 1.0
    # an infinite reference, a negative or a NaN loss is not "damped": the NaN is left for a gradient guard
    ref.fill_(float("inf"))
    assert lw.weighted_sum({"mel": x, "l1": l1}).item() == 201.0
    ref.fill_(2.5)
    assert lw.weighted_sum({"mel": torch.tensor(-100.0), "l1": l1}).item() == -199.0
    ref.fill_(2.5)
    assert math.isnan(lw.weighted_sum({"mel": torch.tensor(float("nan")), "l1": l1}).item())
    damping.enabled = False
    assert lw.weighted_sum({"mel": x, "l1": l1}).item() == 201.0
    lw.remove_damping("mel", SpikeDamping(ref, 2.0))  # not the registered object: kept
    assert lw.damping("mel") is damping
    lw.remove_damping("mel")
    assert lw.damping("mel") is None


def test_register_damping_argument_errors():
    lw = LossWeights({"mel": 1.0})
    with pytest.raises(ValueError, match=r"unknown loss name 'x'; known losses: \['mel'\]"):
        lw.register_damping("x", torch.zeros(()), 2.0)
    with pytest.raises(ValueError, match="`reference` .* one-element tensor"):
        lw.register_damping("mel", torch.zeros(2), 2.0)
    with pytest.raises(TypeError, match="`reference` .* one-element tensor, got 0.5"):
        lw.register_damping("mel", 0.5, 2.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"`max_ratio` must be a finite number > 0, got {bad!r}"):
            lw.register_damping("mel", torch.zeros(()), bad)
    for bad in (True, "2"):
        with pytest.raises(TypeError, match=rf"`max_ratio` must be a number, got {bad!r}"):
            lw.register_damping("mel", torch.zeros(()), bad)
    with pytest.raises(ValueError, match="`max_ratio` must be a finite number > 0, got inf"):
        lw.register_damping("mel", torch.zeros(()), float("inf"))
    assert lw.damping("mel") is None


def test_pickle_deepcopy_and_state_round_trip():
    lw = LossWeights({"mel": 2.5, "l1": 1.0})
    lw.register_damping("mel", torch.tensor(3.0), 2.0)
    for clone in (pickle.loads(pickle.dumps(lw)), copy.deepcopy(lw)):
        assert clone.as_dict() == lw.as_dict()
        assert clone.damping("mel").reference.item() == 3.0
        clone["mel"] = 1.0
        assert lw["mel"] == 2.5
    other = LossWeights({"mel": 1.0, "l1": 1.0})
    lw["l1"] = 0.25
    other.load_state_dict(lw.state_dict())
    assert other.as_dict() == {"mel": 2.5, "l1": 0.25}
    assert LossWeights(lw).as_dict() == lw.as_dict()
    assert repr(lw) == "LossWeights({'mel': 2.5, 'l1': 0.25}, damping=['mel'])"


class _TwoHeadModule(pl.LightningModule):
    """`main` is optimised; `probe` has its own parameters and weight 0, so they must never change."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(8, 4)
        self.probe = nn.Linear(8, 4)
        self.loss_weights = LossWeights({"main": 1.0, "probe": 0.0})

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = {
            "main": nn.functional.mse_loss(self.main(x), y),
            "probe": self.loss_weights.compute("probe", lambda: nn.functional.l1_loss(self.probe(x), y)),
        }
        self.log_dict({f"train/{k}": v for k, v in losses.items()})
        return {"loss": self.loss_weights.weighted_sum(losses), "losses": {k: v.detach() for k, v in losses.items()}}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)

    def train_dataloader(self):
        return regression_loader()


def test_zero_weight_term_in_a_real_trainer_leaves_its_parameters_bit_identical(tmp_path):
    model = _TwoHeadModule()
    probe_before = {k: v.clone() for k, v in model.probe.state_dict().items()}
    main_before = model.main.weight.detach().clone()
    make_trainer(tmp_path, max_steps=4).fit(model)
    for k, v in model.probe.state_dict().items():
        assert torch.equal(v, probe_before[k]), k
    assert not torch.equal(model.main.weight, main_before)
