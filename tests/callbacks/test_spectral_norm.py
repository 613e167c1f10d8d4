import json
import logging
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_stability.callbacks import SpectralNormInjection
from lightning_stability.nn import load_with_spectral_norm, spectral_sigma
from tests.helpers import FaultyModule, assert_same, make_trainer, snapshot


class ProjModule(FaultyModule):
    """FaultyModule with a hidden block and an ``output_proj`` whose raw weight has sigma >> 1."""

    def __init__(self, *, build_in_configure_model: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.build_in_configure_model = build_in_configure_model
        self.output_proj = None if build_in_configure_model else self._make_proj()

    @staticmethod
    def _make_proj() -> nn.Linear:
        proj = nn.Linear(16, 4)
        with torch.no_grad():
            proj.weight.mul_(8.0)
        return proj

    def configure_model(self) -> None:
        if self.output_proj is None:
            self.output_proj = self._make_proj()

    def forward(self, x):
        return self.output_proj(self.net(x))


class LateModule(ProjModule):
    """Creates a matching layer after the optimizer-relevant hooks: must be refused."""

    def configure_optimizers(self):
        self.extra = nn.Sequential()
        self.extra.output_proj = nn.Linear(2, 2)
        return super().configure_optimizers()


class Probe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.param_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def sigma2(weight: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2).item()


def test_optimizer_holds_parametrized_originals_and_sigma_stays_one(tmp_path):
    torch.manual_seed(0)
    module, probe = ProjModule(), Probe()
    cb = SpectralNormInjection(log_every_n_steps=4)
    trainer = make_trainer(tmp_path, [cb, probe], max_steps=12, limit_train_batches=4)
    trainer.fit(module)
    original = module.output_proj.parametrizations.weight.original
    assert id(original) in probe.param_ids
    assert len(probe.param_ids) == len(list(module.parameters()))
    assert "output_proj.parametrizations.weight.0._u" in module.state_dict()
    module.eval()
    assert sigma2(original) > 3.0
    assert sigma2(module.output_proj.weight) == pytest.approx(1.0, abs=1e-2)
    assert spectral_sigma(module.output_proj).item() == pytest.approx(sigma2(original), rel=1e-2)
    # logged every 4 steps, from the u/v estimate of the ORIGINAL weight
    assert [s for s, _ in cb.event_log.traces["output_proj/sigma"]] == [4, 8, 12]
    logged = trainer.callback_metrics["specnorm/output_proj/sigma"]
    assert logged.item() == pytest.approx(sigma2(original), rel=1e-2)
    assert cb.wrapped == ["output_proj"]
    assert cb.event_log.num_events == {"inject": 1}
    assert cb.event_log.events[0].data["modules"] == ["output_proj"]


def test_wrapped_modules_are_announced_once_on_rank_zero(tmp_path, caplog):
    cb = SpectralNormInjection(types=(nn.Linear,), modules=())
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        make_trainer(tmp_path, [cb], max_steps=1).fit(ProjModule())
        make_trainer(tmp_path, [cb], max_steps=2).fit(ProjModule())
    announced = [r.getMessage() for r in caplog.records if "SpectralNormInjection" in r.getMessage()]
    assert announced == [
        "SpectralNormInjection: spectral norm on 2 module(s) (n_power_iterations=1): net.0, output_proj"
    ]


def test_types_alone_select_by_type_without_the_default_pattern(tmp_path):
    # A user model with no `output_proj`: passing only `types` must not also demand the default name pattern.
    assert SpectralNormInjection().modules == ("*.output_proj",)
    cb = SpectralNormInjection(types=nn.Linear)
    assert cb.modules == ()
    model = FaultyModule()
    make_trainer(tmp_path, [cb], max_steps=2).fit(model)
    assert cb.wrapped == ["net.0", "net.2"]
    assert all(hasattr(model.net[i], "parametrizations") for i in (0, 2))


def test_second_fit_and_second_callback_do_not_double_it(tmp_path):
    module = ProjModule()
    cb = SpectralNormInjection()
    make_trainer(tmp_path, [cb], max_steps=2).fit(module)
    keys = list(module.state_dict())
    make_trainer(tmp_path, [cb], max_steps=4).fit(module)
    make_trainer(tmp_path, [SpectralNormInjection("output_proj", n_power_iterations=2)], max_steps=6).fit(module)
    assert list(module.state_dict()) == keys
    assert len(module.output_proj.parametrizations.weight) == 1
    assert module.output_proj.parametrizations.weight[0].n_power_iterations == 1
    assert cb.event_log.num_events == {"inject": 1}
    assert "configure_model" not in module.__dict__  # the temporary hook wrapper is gone


def test_composes_with_weight_norm_and_warns_about_a_weight_no_optimizer_holds(tmp_path):
    class WeightNormed(ProjModule):
        def __init__(self) -> None:
            super().__init__()
            self.output_proj = weight_norm(self._make_proj())
            self.frozen = nn.Sequential(nn.Linear(4, 4))

        def configure_optimizers(self):  # forgets the frozen-by-mistake block
            return torch.optim.Adam([p for n, p in self.named_parameters() if not n.startswith("frozen")], lr=1e-2)

    module = WeightNormed()
    cb = SpectralNormInjection(("output_proj", "frozen.0"), log_every_n_steps=2)
    with pytest.warns(UserWarning, match=r"no optimizer holds the trainable weight of \['frozen.0'\]"):
        make_trainer(tmp_path, [cb], max_steps=4).fit(module)
    plist = module.output_proj.parametrizations.weight
    assert [type(p).__name__ for p in plist] == ["_WeightNorm", "_SpectralNorm"]
    module.eval()
    assert sigma2(module.output_proj.weight) == pytest.approx(1.0, abs=1e-2)
    assert cb.event_log.traces["output_proj/sigma"][-1][1] == pytest.approx(
        sigma2(plist[0](*plist.parameters())), rel=1e-2
    )


def test_layers_built_in_configure_model_are_wrapped_before_the_optimizer(tmp_path):
    module, probe = ProjModule(build_in_configure_model=True), Probe()
    make_trainer(tmp_path, [SpectralNormInjection(), probe], max_steps=3).fit(module)
    assert id(module.output_proj.parametrizations.weight.original) in probe.param_ids
    assert "configure_model" not in module.__dict__


def test_layer_created_after_configure_model_is_refused(tmp_path):
    module = LateModule()
    with pytest.raises(RuntimeError, match=r"module\(s\) \['extra.output_proj'\] match the selection but have no"):
        make_trainer(tmp_path, [SpectralNormInjection()], max_steps=1).fit(module)
    assert "configure_model" not in module.__dict__


def test_selection_errors_surface_at_setup(tmp_path):
    module = ProjModule()
    with pytest.raises(ValueError, match=r"pattern '\*\.out_proj' matched no module of ProjModule\. .*'output_proj'"):
        make_trainer(tmp_path, [SpectralNormInjection("*.out_proj")], max_steps=1).fit(module)
    assert "configure_model" not in module.__dict__  # removed on the exception
    with pytest.raises(ValueError, match=r"module 'net' \(Sequential\) has no `weight` tensor"):
        make_trainer(tmp_path, [SpectralNormInjection("net")], max_steps=1).fit(ProjModule())


def run(tmp_path, name, max_epochs, ckpt_path=None, save=None):
    """Epoch-bounded runs (4 steps an epoch): a checkpoint saved after ``fit`` resumes at the next epoch's start."""
    torch.manual_seed(0)
    module = ProjModule(build_in_configure_model=True)
    cb = SpectralNormInjection(log_every_n_steps=2)
    trainer = make_trainer(tmp_path / name, [cb], max_steps=-1, max_epochs=max_epochs, limit_train_batches=4)
    trainer.fit(module, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, cb, trainer


def test_resume_continues_exactly(tmp_path):
    full, full_cb, full_trainer = run(tmp_path, "full", 2)
    run(tmp_path, "first", 1, save=tmp_path / "half.ckpt")
    resumed, resumed_cb, resumed_trainer = run(tmp_path, "resumed", 2, ckpt_path=tmp_path / "half.ckpt")
    assert resumed.step_losses == full.step_losses[4:]
    assert_same(
        snapshot(full, full_trainer.optimizers[0]),
        snapshot(resumed, resumed_trainer.optimizers[0]),
    )
    assert "output_proj.parametrizations.weight.0._v" in resumed.state_dict()
    assert resumed_cb.state_dict() == full_cb.state_dict()
    assert [s for s, _ in resumed_cb.event_log.traces["output_proj/sigma"]] == [2, 4, 6, 8]


def test_inference_loading_without_a_trainer(tmp_path):
    trained, cb, _ = run(tmp_path, "train", 1, save=tmp_path / "trained.ckpt")
    trained.eval()
    x = torch.randn(5, 8)
    expected = trained(x)
    fresh = cb.load_for_inference(ProjModule(build_in_configure_model=True), tmp_path / "trained.ckpt")
    assert not fresh.training
    assert torch.equal(fresh(x), expected)
    # the selection read from the checkpoint; and only the inner projection
    assert torch.equal(load_with_spectral_norm(ProjModule(), tmp_path / "trained.ckpt")(x), expected)
    proj = nn.Linear(16, 4)
    SpectralNormInjection(types="torch.nn.Linear", modules=()).load_for_inference(
        proj, tmp_path / "trained.ckpt", prefix="output_proj."
    )
    assert torch.equal(proj(trained.net(x)), expected)


def test_validate_from_a_checkpoint_needs_and_gets_the_injection(tmp_path):
    run(tmp_path, "train", 1, save=tmp_path / "trained.ckpt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"output_proj.weight\""):
        make_trainer(tmp_path, limit_val_batches=1).validate(ProjModule(), ckpt_path=tmp_path / "trained.ckpt")
    cb = SpectralNormInjection()
    module = ProjModule(build_in_configure_model=True)
    (result,) = make_trainer(tmp_path, [cb], limit_val_batches=1).validate(module, ckpt_path=tmp_path / "trained.ckpt")
    assert math.isfinite(result["val_loss"])
    assert cb.selected == ["output_proj"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(tmp_path, precision):
    module = ProjModule()
    cb = SpectralNormInjection(log_every_n_steps=1)
    make_trainer(tmp_path, [cb], max_steps=4, precision=precision).fit(module)
    module.eval()
    assert module.output_proj.parametrizations.weight.original.dtype == torch.float32
    assert sigma2(module.output_proj.weight) == pytest.approx(1.0, abs=2e-2)
    values = [v for _, v in cb.event_log.traces["output_proj/sigma"]]
    assert len(values) == 4
    assert all(v == pytest.approx(sigma2(module.output_proj.parametrizations.weight.original), rel=0.1) for v in values)


class ManualModule(ProjModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = self.compute(batch)
        opt.zero_grad()
        self.manual_backward(out["loss"])
        opt.step()
        return out


def test_manual_optimization(tmp_path):
    module = ManualModule()
    cb = SpectralNormInjection(log_every_n_steps=3)
    make_trainer(tmp_path, [cb], max_steps=6).fit(module)
    assert [s for s, _ in cb.event_log.traces["output_proj/sigma"]] == [3, 6]
    module.eval()
    assert sigma2(module.output_proj.weight) == pytest.approx(1.0, abs=1e-2)


def test_two_instances_coexist_with_distinct_state_keys(tmp_path):
    a = SpectralNormInjection("*.output_proj")
    b = SpectralNormInjection((), (nn.Linear,), n_power_iterations=2)
    assert a.state_key == "SpectralNormInjection{'modules': ('*.output_proj',), 'types': (), 'n_power_iterations': 1}"
    assert b.state_key != a.state_key
    module = ProjModule()
    make_trainer(tmp_path, [a, b], max_steps=2).fit(module)
    assert a.wrapped == ["output_proj"]
    assert b.wrapped == ["net.0"]  # output_proj already had it
    assert module.net[0].parametrizations.weight[0].n_power_iterations == 2
    restored = SpectralNormInjection("*.output_proj")
    restored.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert restored.state_dict() == a.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"modules": (), "types": ()},
            ValueError,
            r"nothing to select: `modules`=\(\) and `types`=\(\) are both empty",
        ),
        ({"modules": 7}, TypeError, r"`modules` must be a glob pattern or an iterable of them, got 7"),
        ({"modules": ("*.a", "")}, ValueError, r"`modules` must contain non-empty glob pattern strings, got '' in"),
        ({"modules": [None]}, TypeError, r"`modules` must contain non-empty glob pattern strings, got None"),
        ({"types": (dict,)}, TypeError, r"`types` must contain subclasses of `torch.nn.Module`, got <class 'dict'>"),
        ({"types": "no.such.Layer"}, ValueError, r"`types` entry 'no.such.Layer' is not an importable class path"),
        ({"n_power_iterations": 0}, ValueError, r"`n_power_iterations` must be >= 1, got 0"),
        ({"n_power_iterations": "2"}, TypeError, r"`n_power_iterations` must be an int, got '2'"),
        ({"eps": -1.0}, ValueError, r"`eps` must be a finite number > 0, got -1.0"),
        ({"eps": None}, TypeError, r"`eps` must be a number, got None"),
        ({"log_every_n_steps": -1}, ValueError, r"`log_every_n_steps` must be >= 0, got -1"),
        ({"log_every_n_steps": 2.5}, TypeError, r"`log_every_n_steps` must be an int or None, got 2.5"),
        ({"replace_weight_norm": "yes"}, TypeError, r"`replace_weight_norm` must be a bool, got 'yes'"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SpectralNormInjection(**kwargs)


class DumpBuffers(Callback):
    def __init__(self, out_dir) -> None:
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage):  # runs after SpectralNormInjection.setup, before the DDP wrap
        self.u_at_setup = pl_module.output_proj.parametrizations.weight[0]._u.tolist()

    def on_train_end(self, trainer, pl_module):
        sn = pl_module.output_proj.parametrizations.weight
        state = {"u": sn[0]._u.tolist(), "v": sn[0]._v.tolist(), "w": sn.original.flatten().tolist()}
        state["u_at_setup"] = self.u_at_setup
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


class SeededPerRank(Callback):
    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_keeps_power_iteration_buffers_identical(tmp_path):
    # every rank draws different random u/v at injection (SeededPerRank); DDP must make them agree
    module = ProjModule()
    trainer = make_trainer(
        tmp_path,
        [SeededPerRank(), SpectralNormInjection(), DumpBuffers(tmp_path)],
        devices=2,
        strategy="ddp_spawn",
        max_steps=5,
    )
    trainer.fit(module)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0.pop("u_at_setup") != r1.pop("u_at_setup")  # the ranks did start apart
    assert r0 == r1
    assert r0["u"] != pytest.approx([0.0] * len(r0["u"]))


# -- legacy weight norm: a HiFi-GAN-style discriminator ----------------------------------------------------------------
LEGACY_WN = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's period discriminator in miniature: audio folded to [B, 1, T / p, p], Conv2d stack with the legacy
    ``torch.nn.utils.weight_norm`` as the HiFi-GAN code applies it."""

    def __init__(self, period: int) -> None:
        super().__init__()
        self.period = period
        chans = (1, 8, 16)
        self.convs = nn.ModuleList(
            nn.utils.weight_norm(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0))) for a, b in zip(chans, chans[1:])
        )
        self.conv_post = nn.utils.weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        if t % self.period:
            x = nn.functional.pad(x, (0, self.period - t % self.period), "reflect")
        x = x.view(b, c, -1, self.period)
        for conv in self.convs:
            x = nn.functional.leaky_relu(conv(x), 0.1)
        return self.conv_post(x).flatten(1)


class ScaleDiscriminator(nn.Module):
    """HiFi-GAN's scale discriminator in miniature (grouped strided Conv1d, weight norm)."""

    def __init__(self) -> None:
        super().__init__()
        wn = nn.utils.weight_norm
        self.convs = nn.ModuleList(
            [wn(nn.Conv1d(1, 8, 15, padding=7)), wn(nn.Conv1d(8, 16, 41, 4, groups=4, padding=20))]
        )
        self.conv_post = wn(nn.Conv1d(16, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = nn.functional.leaky_relu(conv(x), 0.1)
        return self.conv_post(x).flatten(1)


class HiFiGANDiscriminatorModule(FaultyModule):
    """Trains a multi-period + scale discriminator (hinge loss) to tell sines (real) from noise (fake)."""

    def __init__(self) -> None:
        super().__init__()
        self.discs = nn.ModuleList([PeriodDiscriminator(2), PeriodDiscriminator(3), ScaleDiscriminator()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([d(x) for d in self.discs], dim=1)

    def compute(self, batch) -> dict:
        real, fake = batch
        loss = torch.relu(1 - self(real)).mean() + torch.relu(1 + self(fake)).mean()
        return {"loss": loss}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        t = torch.arange(256) / 8000
        real = torch.stack([0.5 * torch.sin(2 * torch.pi * f * t) for f in torch.linspace(200, 900, 16)])[:, None]
        fake = 0.3 * torch.randn(16, 1, 256, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real, fake), batch_size=4)

    def val_dataloader(self):
        return self.train_dataloader()


def wn_convs(module: nn.Module) -> list[str]:
    from lightning_stability.nn.spectral import has_weight_norm

    return [n for n, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)) and has_weight_norm(m)]


def run_gan(tmp_path, name, max_epochs, ckpt_path=None, save=None):
    torch.manual_seed(0)
    module = HiFiGANDiscriminatorModule()
    cb = SpectralNormInjection(types=(nn.Conv1d, nn.Conv2d), replace_weight_norm=True, log_every_n_steps=2)
    trainer = make_trainer(tmp_path / name, [cb], max_steps=-1, max_epochs=max_epochs)
    trainer.fit(module, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, cb, trainer


@LEGACY_WN
def test_replace_weight_norm_on_a_hifigan_discriminator_trains_resumes_and_loads(tmp_path):
    assert len(wn_convs(HiFiGANDiscriminatorModule())) == 9
    with pytest.raises(ValueError, match=r"legacy `torch\.nn\.utils\.weight_norm`.*`replace_weight_norm=True`"):
        make_trainer(tmp_path, [SpectralNormInjection(types=nn.Conv2d)], max_steps=1).fit(HiFiGANDiscriminatorModule())

    full, full_cb, full_trainer = run_gan(tmp_path, "full", 2)
    assert wn_convs(full) == []
    assert len(full_cb.selected) == 9
    (inject,) = [e for e in full_cb.event_log.events if e.kind == "inject"]
    assert sorted(inject.data["replaced_weight_norm"]) == sorted(full_cb.selected)
    assert not any("weight_g" in k or "weight_v" in k for k in full.state_dict())
    optimized = {id(p) for g in full_trainer.optimizers[0].param_groups for p in g["params"]}
    for name in full_cb.selected:
        layer = full.get_submodule(name)
        assert id(layer.parametrizations.weight.original) in optimized  # the folded weight is what trains
        with torch.no_grad():  # in eval mode, reading `weight` runs no power iteration (u, v stay as trained)
            assert sigma2(layer.eval().weight) == pytest.approx(1.0, abs=0.1)  # one iteration a step lags a little
    full.train()
    assert full.step_losses[-1] < full.step_losses[0]

    run_gan(tmp_path, "first", 1, save=tmp_path / "half.ckpt")
    resumed, resumed_cb, resumed_trainer = run_gan(tmp_path, "resumed", 2, ckpt_path=tmp_path / "half.ckpt")
    assert resumed.step_losses == full.step_losses[4:]
    assert_same(snapshot(full, full_trainer.optimizers[0]), snapshot(resumed, resumed_trainer.optimizers[0]))
    assert resumed_cb.state_dict()["selected"] == full_cb.state_dict()["selected"]

    full_trainer.save_checkpoint(tmp_path / "full.ckpt")
    full.eval()
    x = torch.randn(3, 1, 256)
    expected = full(x)
    for fresh in (  # a freshly built model still has weight norm: both loaders replace it
        load_with_spectral_norm(HiFiGANDiscriminatorModule(), tmp_path / "full.ckpt"),
        full_cb.load_for_inference(HiFiGANDiscriminatorModule(), tmp_path / "full.ckpt"),
    ):
        assert wn_convs(fresh) == []
        assert torch.equal(fresh(x), expected)
