import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_stability.nn.spectral import (
    InjectionResult,
    has_spectral_norm,
    has_weight_norm,
    inject_spectral_norm,
    load_with_spectral_norm,
    remove_weight_norm,
    select_modules,
    spectral_norm_dim,
    spectral_norm_modules_in,
    spectral_sigma,
)


class MyTransposed(nn.ConvTranspose1d):
    """A user's subclass: still normalised over its output channels."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.ELU(), nn.Conv1d(6, 8, 3, padding=1))
        self.up = MyTransposed(8, 5, 4, stride=2, padding=1)
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.blocks = nn.ModuleList([nn.ModuleDict({"output_proj": nn.Linear(16, 16)}) for _ in range(2)])
        self.output_proj = nn.Linear(16, 3)
        with torch.no_grad():  # raw weights far from sigma = 1, so normalisation visibly matters
            for p in self.parameters():
                p.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 2, 8]
        h = self.up(self.encoder(x))  # [B, 5, 16]
        for block in self.blocks:
            h = h + block["output_proj"](self.norm(h))
        return self.output_proj(h)  # [B, 5, 3]


def matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    dim = spectral_norm_dim(module)
    w = weight.movedim(dim, 0)
    return w.reshape(w.shape[0], -1)


def true_sigma(module: nn.Module, weight: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(matrix(module, weight.detach()), ord=2).item()


def test_selection_by_pattern_and_type_is_a_union_in_module_order():
    net = Net()
    picked = select_modules(net, ("*.output_proj",), (nn.ConvTranspose1d,))
    assert list(picked) == ["up", "blocks.0.output_proj", "blocks.1.output_proj", "output_proj"]
    assert list(select_modules(net, "output_proj")) == ["output_proj"]
    assert list(select_modules(net, (), "torch.nn.Conv1d")) == ["encoder.0", "encoder.2"]


def test_injection_normalises_effective_weights_and_keeps_the_optimizer_parameters():
    net = Net()
    before = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)  # built BEFORE the injection on purpose
    result = inject_spectral_norm(net, ("*.output_proj",), (nn.ConvTranspose1d,), n_power_iterations=3)
    assert result == InjectionResult(
        selected=("up", "blocks.0.output_proj", "blocks.1.output_proj", "output_proj"),
        wrapped=("up", "blocks.0.output_proj", "blocks.1.output_proj", "output_proj"),
    )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name in result.selected:
        module = net.get_submodule(name)
        original = module.parametrizations.weight.original
        assert original is before[f"{name}.weight"]
        assert id(original) in held
        assert module.parametrizations.weight[0].n_power_iterations == 3
        assert true_sigma(module, original) > 2.0
        assert true_sigma(module, module.weight) == pytest.approx(1.0, abs=2e-3)
    assert net.up.parametrizations.weight[0].dim == 1
    assert net.blocks[0]["output_proj"].parametrizations.weight[0].dim == 0
    assert "output_proj.parametrizations.weight.0._u" in net.state_dict()
    assert "encoder.0.weight" in net.state_dict()


def test_sigma_estimate_tracks_the_original_weight_during_training():
    torch.manual_seed(1)
    net = Net()
    inject_spectral_norm(net, ("*.output_proj",), (MyTransposed,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.randn(4, 2, 8), torch.randn(4, 5, 3)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    net.eval()
    for name in ("up", "blocks.0.output_proj", "blocks.1.output_proj", "output_proj"):
        module = net.get_submodule(name)
        original = module.parametrizations.weight.original
        estimate = spectral_sigma(module)
        assert estimate.dtype == torch.float32
        assert estimate.ndim == 0
        assert estimate.item() == pytest.approx(true_sigma(module, original), rel=1e-2)
        assert true_sigma(module, module.weight) == pytest.approx(1.0, abs=1e-2)


def test_injection_leaves_the_global_rng_stream_alone():
    net = Net()
    state = torch.get_rng_state()
    inject_spectral_norm(net)
    assert torch.equal(torch.get_rng_state(), state)


def test_injection_is_idempotent():
    net = Net()
    first = inject_spectral_norm(net)
    keys = list(net.state_dict())
    second = inject_spectral_norm(net)
    assert first.wrapped == ("blocks.0.output_proj", "blocks.1.output_proj", "output_proj")
    assert second == InjectionResult(selected=first.selected, wrapped=())
    assert list(net.state_dict()) == keys
    assert len(net.output_proj.parametrizations.weight) == 1
    assert not any("parametrizations.weight.1" in k for k in keys)


def test_legacy_spectral_norm_hook_counts_as_present():
    net = Net()
    nn.utils.spectral_norm(net.output_proj)
    assert has_spectral_norm(net.output_proj)
    result = inject_spectral_norm(net)
    assert "output_proj" not in result.wrapped
    assert not hasattr(net.output_proj, "parametrizations")


def test_composes_with_weight_norm_and_sigma_reads_the_weight_norm_output():
    layer = weight_norm(nn.Linear(6, 5))
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(3.0)  # g
    model = nn.Sequential(layer)
    inject_spectral_norm(model, "0")
    assert has_spectral_norm(layer)
    plist = layer.parametrizations.weight
    pre_spectral = plist[0](plist.original0, plist.original1)  # the weight-norm output that spectral norm sees
    for _ in range(20):
        layer(torch.randn(3, 6))
    assert spectral_sigma(layer).item() == pytest.approx(true_sigma(layer, pre_spectral), rel=1e-3)
    assert true_sigma(layer, layer.weight) == pytest.approx(1.0, abs=1e-3)


def test_one_dim_weights_cannot_be_selected_and_sigma_needs_the_parametrization():
    with pytest.raises(ValueError, match=r"`weight` of module '0' \(BatchNorm1d\) has shape \(4,\)"):
        inject_spectral_norm(nn.Sequential(nn.BatchNorm1d(4)), "0")
    with pytest.raises(ValueError, match=r"Linear has no spectral norm parametrization on `weight`"):
        spectral_sigma(nn.Linear(2, 2))


def test_selection_errors_name_the_problem():
    net = Net()
    with pytest.raises(ValueError, match=r"pattern '\*\.out_proj' matched no module of Net\. Some module names .*'up'"):
        inject_spectral_norm(net, ("*.output_proj", "*.out_proj"))
    with pytest.raises(ValueError, match=r"type torch\.nn\.modules\.conv\.Conv2d matched no module"):
        inject_spectral_norm(net, (), (nn.Conv2d,))
    with pytest.raises(ValueError, match=r"module 'blocks\.0' \(ModuleDict\) has no `weight` tensor"):
        inject_spectral_norm(net, ("blocks.0", "*.output_proj"))
    assert not has_spectral_norm(net.output_proj)  # a failed selection wraps nothing
    with pytest.raises(ValueError, match=r"module 'norm' \(LayerNorm\) has no `weight` tensor"):
        inject_spectral_norm(net, "norm")
    with pytest.warns(FutureWarning, match="weight_norm"):
        legacy = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) has the legacy `torch\.nn\.utils\.weight_norm`.*"
                       r"Pass `replace_weight_norm=True`"):
        inject_spectral_norm(legacy, "0")
    assert has_weight_norm(legacy[0])  # the refusal changed nothing
    plain = nn.Linear(3, 3)
    del plain.weight
    plain.weight = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"`weight` of module '0' \(Linear\) is a plain tensor attribute"):
        inject_spectral_norm(nn.Sequential(plain), "0")
    with pytest.raises(ValueError, match=r"nothing to select"):
        select_modules(net, (), ())
    assert select_modules(net, "*.missing", strict=False) == {}


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"modules": 3}, TypeError, r"`modules` must be a glob pattern or an iterable of them, got 3"),
        ({"modules": ("*.a", 1)}, TypeError, r"`modules` must contain non-empty glob pattern strings, got 1"),
        ({"modules": ("",)}, ValueError, r"`modules` must contain non-empty glob pattern strings, got '' in"),
        ({"types": (int,)}, TypeError, r"`types` must contain subclasses of `torch.nn.Module`, got <class 'int'>"),
        ({"types": 5}, TypeError, r"`types` must be a module class or a sequence of them, got 5"),
        ({"types": "torch.nn.Nope"}, ValueError, r"`types` entry 'torch.nn.Nope' is not an importable class path"),
        ({"n_power_iterations": 0}, ValueError, r"`n_power_iterations` must be >= 1, got 0"),
        ({"n_power_iterations": 1.5}, TypeError, r"`n_power_iterations` must be an int, got 1.5"),
        ({"n_power_iterations": True}, TypeError, r"`n_power_iterations` must be an int, got True"),
        ({"eps": 0.0}, ValueError, r"`eps` must be a finite number > 0, got 0.0"),
        ({"eps": float("nan")}, ValueError, r"`eps` must be a finite number > 0, got nan"),
        ({"eps": "1e-12"}, TypeError, r"`eps` must be a number, got '1e-12'"),
        ({"replace_weight_norm": 1}, TypeError, r"`replace_weight_norm` must be a bool, got 1"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        inject_spectral_norm(Net(), **kwargs)


def trained_net(tmp_path):
    torch.manual_seed(2)
    net = Net()
    inject_spectral_norm(net, ("*.output_proj",), (nn.ConvTranspose1d,))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        net(torch.randn(4, 2, 8)).square().mean().backward()
        optimizer.step()
    net.eval()
    wrapper = nn.Module()
    wrapper.model = net  # as a LightningModule holding `self.model` would save it
    torch.save({"state_dict": wrapper.state_dict(), "epoch": 1}, tmp_path / "trained.ckpt")
    return net


def test_load_with_spectral_norm_reads_the_selection_from_the_checkpoint(tmp_path):
    trained = trained_net(tmp_path)
    assert spectral_norm_modules_in(torch.load(tmp_path / "trained.ckpt")["state_dict"]) == [
        "model.up",
        "model.blocks.0.output_proj",
        "model.blocks.1.output_proj",
        "model.output_proj",
    ]
    x = torch.randn(3, 2, 8)
    fresh = load_with_spectral_norm(Net(), tmp_path / "trained.ckpt", prefix="model.")
    assert not fresh.training
    assert torch.equal(fresh(x), trained(x))
    wrapper = nn.Module()
    wrapper.model = Net()
    load_with_spectral_norm(wrapper, str(tmp_path / "trained.ckpt"))
    assert torch.equal(wrapper.model(x), trained(x))


def test_load_with_spectral_norm_with_an_explicit_selection(tmp_path):
    trained = trained_net(tmp_path)
    state = {k[len("model.") :]: v for k, v in torch.load(tmp_path / "trained.ckpt")["state_dict"].items()}
    fresh = load_with_spectral_norm(Net(), state, ("*.output_proj",), (MyTransposed,), eval_mode=False)
    assert fresh.training
    fresh.eval()
    x = torch.randn(3, 2, 8)
    assert torch.equal(fresh(x), trained(x))


def test_load_with_spectral_norm_errors(tmp_path):
    trained_net(tmp_path)
    ckpt = tmp_path / "trained.ckpt"
    with pytest.raises(ValueError, match=r"only in the checkpoint \['up'\]"):
        load_with_spectral_norm(Net(), ckpt, "*.output_proj", prefix="model.")
    with pytest.raises(ValueError, match=r"only in the model \['encoder.0', 'encoder.2'\]"):
        load_with_spectral_norm(Net(), ckpt, ("*.output_proj", "up", "encoder.[02]"), prefix="model.")
    with pytest.raises(ValueError, match=r"modules that Linear does not have: \['model.up'"):
        load_with_spectral_norm(nn.Linear(2, 2), ckpt)
    with pytest.raises(ValueError, match=r"`prefix` 'net\.' matches no key of the checkpoint"):
        load_with_spectral_norm(Net(), ckpt, prefix="net.")
    with pytest.raises(FileNotFoundError, match=r"`checkpoint` file '.*missing.ckpt' does not exist"):
        load_with_spectral_norm(Net(), tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match=r"`checkpoint` must be a path, a Lightning checkpoint dict or a state dict"):
        load_with_spectral_norm(Net(), 42)
    with pytest.raises(TypeError, match=r"does not hold a state dict"):
        load_with_spectral_norm(Net(), {"state_dict": [1, 2]})
    with pytest.raises(ValueError, match=r"`n_power_iterations` must be >= 1, got -1"):
        load_with_spectral_norm(Net(), ckpt, n_power_iterations=-1)
    with pytest.raises(TypeError, match=r"`n_power_iterations` must be an int, got 1.0"):
        load_with_spectral_norm(Net(), ckpt, n_power_iterations=1.0)
    with pytest.raises(TypeError, match=r"`replace_weight_norm` must be a bool or None, got 'auto'"):
        load_with_spectral_norm(Net(), ckpt, replace_weight_norm="auto")


# -- weight norm -------------------------------------------------------------------------------------------------------
LEGACY_WN = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


def _legacy(layer: nn.Module) -> nn.Module:
    return nn.utils.weight_norm(layer)


@LEGACY_WN
@pytest.mark.parametrize("kind", ["legacy", "parametrized"])
@pytest.mark.parametrize(
    "layer", [lambda: nn.Conv1d(3, 5, 4), lambda: nn.ConvTranspose1d(3, 5, 4), lambda: nn.Linear(6, 4)]
)
def test_remove_weight_norm_folds_g_v_into_the_weight_the_layer_computed(kind, layer):
    torch.manual_seed(0)
    module = (_legacy if kind == "legacy" else weight_norm)(layer())
    with torch.no_grad():  # g away from ||v||, so the fold must really multiply by g / ||v||
        g = module.weight_g if kind == "legacy" else module.parametrizations.weight.original0
        g.mul_(torch.linspace(0.2, 3.0, g.numel()).reshape(g.shape))
    x = torch.randn(2, 3, 9) if not isinstance(module, nn.Linear) else torch.randn(2, 6)
    before, weight = module(x), module.weight.detach().clone()
    assert remove_weight_norm(module)
    assert not has_weight_norm(module)
    assert isinstance(module.weight, nn.Parameter)
    assert module.weight.requires_grad
    assert sorted(n for n, _ in module.named_parameters()) == ["bias", "weight"]
    assert torch.equal(module.weight, weight)
    assert torch.equal(module(x), before)
    assert not remove_weight_norm(module)  # nothing left to remove


@LEGACY_WN
def test_remove_weight_norm_keeps_a_frozen_layer_frozen_and_refuses_composed_parametrizations():
    frozen = _legacy(nn.Linear(4, 4)).requires_grad_(False)
    remove_weight_norm(frozen)
    assert not frozen.weight.requires_grad
    composed = torch.nn.utils.parametrizations.spectral_norm(weight_norm(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="weight norm composed with other parametrizations"):
        remove_weight_norm(composed)


class WeightNormNet(nn.Module):
    """A decoder-ish stack with legacy weight norm, one parametrized weight norm and one plain layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _legacy(nn.Conv1d(2, 6, 3, padding=1))
        self.b = weight_norm(nn.Conv1d(6, 6, 3, padding=1))
        self.c = nn.Conv1d(6, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@LEGACY_WN
def test_replace_weight_norm_applies_spectral_norm_to_the_folded_weight():
    torch.manual_seed(0)
    net = WeightNormNet()
    folded = {name: getattr(net, name).weight.detach().clone() for name in "abc"}
    result = inject_spectral_norm(net, (), (nn.Conv1d,), replace_weight_norm=True, n_power_iterations=30)
    assert result.wrapped == ("a", "b", "c")
    assert result.replaced_weight_norm == ("a", "b")
    for name in "abc":
        layer = getattr(net, name)
        assert not has_weight_norm(layer)
        assert has_spectral_norm(layer)
        assert list(layer.parametrizations.weight.state_dict()) == ["original", "0._u", "0._v"]
        assert torch.equal(layer.parametrizations.weight.original, folded[name])
    net(torch.randn(2, 2, 8))  # training-mode forward: 30 power iterations
    for name in "abc":
        layer = getattr(net, name)
        assert true_sigma(layer, layer.weight) == pytest.approx(1.0, abs=1e-3)
        assert spectral_sigma(layer).item() == pytest.approx(true_sigma(layer, folded[name]), rel=1e-3)


@LEGACY_WN
def test_without_the_option_parametrized_weight_norm_composes_and_legacy_is_refused_untouched():
    net = WeightNormNet()
    inject_spectral_norm(net, "b")
    assert has_weight_norm(net.b)
    assert has_spectral_norm(net.b)
    with pytest.raises(ValueError, match="replace_weight_norm=True"):
        inject_spectral_norm(net, ("a", "c"))
    assert has_weight_norm(net.a)
    assert not has_spectral_norm(net.c)  # checked before anything changed


@LEGACY_WN
def test_load_with_spectral_norm_replaces_the_weight_norm_the_checkpoint_no_longer_has(tmp_path):
    torch.manual_seed(0)
    trained = WeightNormNet()
    inject_spectral_norm(trained, (), (nn.Conv1d,), replace_weight_norm=True)
    x = torch.randn(2, 2, 8)
    for _ in range(3):
        trained(x)  # move u/v away from their initial values
    trained.eval()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ckpt.pt")
    expected = trained(x)
    assert not any("weight_g" in k or "original0" in k for k in trained.state_dict())
    fresh = load_with_spectral_norm(WeightNormNet(), tmp_path / "ckpt.pt")  # selection and replacement inferred
    assert torch.equal(fresh(x), expected)
    explicit = load_with_spectral_norm(WeightNormNet(), tmp_path / "ckpt.pt", (), (nn.Conv1d,))
    assert torch.equal(explicit(x), expected)
    with pytest.raises(ValueError, match="replace_weight_norm=True"):
        load_with_spectral_norm(WeightNormNet(), tmp_path / "ckpt.pt", replace_weight_norm=False)


@LEGACY_WN
def test_load_keeps_a_weight_norm_the_checkpoint_still_has(tmp_path):
    trained = WeightNormNet()
    inject_spectral_norm(trained, "b")  # parametrized weight norm composed with spectral norm
    trained.eval()
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    fresh = load_with_spectral_norm(WeightNormNet(), tmp_path / "sd.pt")
    assert has_weight_norm(fresh.b)
    x = torch.randn(2, 2, 8)
    assert torch.equal(fresh(x), trained(x))


@LEGACY_WN
def test_encodec_convolutions_and_discriminator_get_spectral_norm_instead_of_weight_norm():
    from encodec.modules.seanet import SEANetEncoder
    from encodec.msstftd import MultiScaleSTFTDiscriminator

    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(filters=4, n_ffts=[64, 128], hop_lengths=[16, 32], win_lengths=[64, 128])
    convs = {n: m for n, m in disc.named_modules() if isinstance(m, nn.Conv2d)}
    weight_normed = {n for n, m in convs.items() if has_weight_norm(m)}
    assert len(weight_normed) == 10  # all but each scale's first conv (EnCodec leaves that one plain)
    with pytest.raises(ValueError, match="replace_weight_norm=True"):
        inject_spectral_norm(disc, (), (nn.Conv2d,))
    x = torch.randn(2, 1, 2048)
    disc.eval()
    before = disc(x)[0]
    result = inject_spectral_norm(disc, (), (nn.Conv2d,), replace_weight_norm=True)
    assert set(result.wrapped) == set(convs)
    assert set(result.replaced_weight_norm) == weight_normed
    assert not any(has_weight_norm(m) for m in convs.values())
    assert not any("weight_g" in k or "weight_v" in k for k in disc.state_dict())
    disc.train()
    for _ in range(20):
        logits, _ = disc(x)
    assert all(torch.isfinite(t).all() for t in logits)
    for m in convs.values():
        assert true_sigma(m, m.weight) == pytest.approx(1.0, abs=0.05)
    assert any(not torch.allclose(a, b) for a, b in zip(before, disc.eval()(x)[0]))  # it is a different layer now

    encoder = SEANetEncoder(channels=1, dimension=8, n_filters=2, ratios=[4, 2], lstm=0)
    wn = [n for n, m in encoder.named_modules() if isinstance(m, nn.Conv1d) and has_weight_norm(m)]
    assert len(wn) > 3
    result = inject_spectral_norm(encoder, (), (nn.Conv1d,), replace_weight_norm=True)
    assert sorted(result.replaced_weight_norm) == sorted(wn)
    assert torch.isfinite(encoder(torch.randn(1, 1, 256))).all()
