"""Tests for ucan_smoothing.generators: the noise parameter generators (NPGs)."""

import json
import math

import pytest
import torch

from ucan_smoothing import Anisotropic, Gaussian, Laplace, Smooth, make_noise
from ucan_smoothing.npg.generators import (
    GENERATORS, InputDependentGenerator, PatternFixedGenerator, UniversalGenerator, generator_from_config,
    make_generator, sigma_stats,
)

MNIST = (1, 28, 28)
RGB = (3, 8, 10)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise(module, scale=1.0, seed=1):
    """Give every parameter random values (a 'trained' generator)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def _geomean(t):
    return float(t.detach().double().log().mean().exp())


# --------------------------------------------------------------------------- pattern-fixed


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_pattern_values_at_known_pixels(p):
    gen = PatternFixedGenerator((1, 5, 5), p=p, kappa=2.0, iota=0.5, normalize=False)
    sigma, mu = gen()
    assert sigma.shape == (1, 5, 5) and mu.shape == (1, 5, 5)
    assert torch.equal(mu, torch.zeros(1, 5, 5))
    # centre (2, 2): distance 0 -> iota; (0, 0): offsets (2, 2)
    dist = {1: 4.0, 2: math.sqrt(8), "inf": 2.0}[p]
    assert sigma[0, 2, 2].item() == pytest.approx(0.5)
    assert sigma[0, 0, 0].item() == pytest.approx(2.0 * dist**2 + 0.5)
    # (2, 4): offsets (0, 2) -> distance 2 in every norm
    assert sigma[0, 2, 4].item() == pytest.approx(2.0 * 4 + 0.5)
    # (1, 3): offsets (1, 1)
    d13 = {1: 2.0, 2: math.sqrt(2), "inf": 1.0}[p]
    assert sigma[0, 1, 3].item() == pytest.approx(2.0 * d13**2 + 0.5, rel=1e-6)
    assert sigma.argmin().item() == 12  # the centre pixel is the unique minimum
    assert (sigma.flatten().topk(2).values[0] > sigma[0, 2, 2])


def test_pattern_normalised_geometric_mean_and_channels():
    gen = PatternFixedGenerator((3, 28, 28), p=2, kappa=0.05, iota=1.0)
    sigma, _ = gen()
    assert sigma.shape == (3, 28, 28)
    assert _geomean(sigma) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(sigma[0], sigma[1]) and torch.equal(sigma[0], sigma[2])
    # Normalisation keeps the shape: ratio to the unnormalised pattern is constant.
    raw, _ = PatternFixedGenerator((3, 28, 28), p=2, kappa=0.05, iota=1.0, normalize=False)()
    ratio = sigma / raw
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
    # Even image size: the centre lies between pixels, four minimal pixels.
    minimal = (sigma[0] == sigma[0].min()).nonzero().tolist()
    assert sorted(minimal) == [[13, 13], [13, 14], [14, 13], [14, 14]]


def test_pattern_normalize_accepts_names():
    assert PatternFixedGenerator(MNIST, normalize="none").normalize is False
    assert PatternFixedGenerator(MNIST, normalize="geometric").normalize is True
    with pytest.raises(ValueError, match="normalize"):
        PatternFixedGenerator(MNIST, normalize="mean")


def test_pattern_kappa_zero_is_isotropic():
    sigma, _ = PatternFixedGenerator(MNIST, p=1, kappa=0.0, iota=3.0)()
    assert torch.allclose(sigma, torch.ones_like(sigma))
    sigma, _ = PatternFixedGenerator(MNIST, p=1, kappa=0.0, iota=3.0, normalize=False)()
    assert torch.allclose(sigma, torch.full_like(sigma, 3.0))


def test_pattern_custom_centre():
    sigma, _ = PatternFixedGenerator((1, 6, 6), p=2, kappa=1.0, iota=1.0, centre=(0, 5), normalize=False)()
    assert sigma[0, 0, 5].item() == pytest.approx(1.0)
    assert sigma.argmin().item() == 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(kappa=-0.1), "kappa"),
    (dict(iota=0.0), "iota"),
    (dict(iota=-1.0), "iota"),
    (dict(kappa=float("nan")), "kappa"),
    (dict(p=3), "norm"),
    (dict(centre=(1.0,)), "centre"),
    (dict(trainable=True, kappa=0.0), "kappa"),
])
def test_pattern_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatternFixedGenerator(MNIST, **kwargs)


def test_pattern_not_trainable_by_default_and_trainable_option():
    fixed = PatternFixedGenerator(MNIST, p=2, kappa=0.1, iota=1.0)
    assert not fixed.has_trainable_parameters()
    assert fixed.state_dict() == {} or len(fixed.state_dict()) == 0
    learn = PatternFixedGenerator(MNIST, p=2, kappa=0.1, iota=1.0, trainable=True)
    assert learn.has_trainable_parameters()
    sigma, _ = learn()
    assert torch.allclose(sigma, fixed()[0], rtol=1e-5)
    sigma.mean().backward()
    assert learn.log_kappa.grad is not None and learn.log_kappa.grad.abs() > 0


# --------------------------------------------------------------------------- universal


@pytest.mark.parametrize("normalize", ["none", "geometric"])
@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_universal_sigma_positive_and_bounded(normalize, gamma):
    gen = UniversalGenerator(RGB, gamma=gamma, normalize=normalize, hidden=32, latent_dim=8)
    # Large random weights saturate tanh: sigma must still stay in bounds.
    for seed, scale in [(1, 0.1), (2, 1.0), (3, 10.0)]:
        _randomise(gen, scale, seed)
        with torch.no_grad():
            sigma, mu = gen()
        assert sigma.shape == RGB and mu.shape == RGB
        low, high = gen.sigma_bounds()
        assert torch.isfinite(sigma).all() and (sigma > 0).all()
        assert float(sigma.min()) >= low * (1 - 1e-5) and float(sigma.max()) <= high * (1 + 1e-5)
        assert float(mu.abs().max()) <= gen.gamma_mu * (1 + 1e-6)
        if normalize == "geometric":
            assert _geomean(sigma) == pytest.approx(1.0, rel=1e-4)
    bound = gamma * (2 if normalize == "geometric" else 1)
    assert gen.sigma_bounds() == pytest.approx((math.exp(-bound), math.exp(bound)))


def test_universal_starts_isotropic_and_ignores_x():
    gen = UniversalGenerator(MNIST)
    sigma, mu = gen()
    assert torch.equal(sigma, torch.ones(MNIST)) and torch.equal(mu, torch.zeros(MNIST))
    _randomise(gen, 0.3)
    s1, m1 = gen()
    s2, m2 = gen(torch.rand(4, *MNIST))
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def test_universal_five_linear_layers_each_and_fixed_input():
    gen = UniversalGenerator(MNIST, hidden=16, latent_dim=4)
    for net in (gen.sigma_net, gen.mu_net):
        assert sum(isinstance(m, torch.nn.Linear) for m in net) == 5
    assert "fixed_input" in gen.state_dict()
    assert not gen.fixed_input.requires_grad
    assert UniversalGenerator(MNIST, learn_mu=False).mu_net is None


def test_universal_gradients_flow_to_both_generators():
    gen = _randomise(UniversalGenerator(RGB, hidden=16, latent_dim=8), 0.3)
    sigma, mu = gen()
    x = torch.rand(5, *RGB)
    eps = torch.randn(5, *RGB)
    loss = -sigma.mean() + ((x + eps * sigma + mu) ** 2).mean()
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
    assert all(float(p.grad.abs().sum()) > 0 for p in gen.sigma_net.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in gen.mu_net.parameters())


def test_universal_fresh_generator_gets_gradient_at_zero_init():
    # Zero-initialised heads must still learn (the last layer receives a gradient).
    gen = UniversalGenerator(MNIST, hidden=16, latent_dim=8)
    sigma, _ = gen()
    (-sigma.mean()).backward()
    assert float(gen.sigma_net[-1].bias.grad.abs().sum()) > 0


def test_universal_bad_parameters():
    with pytest.raises(ValueError, match="gamma"):
        UniversalGenerator(MNIST, gamma=0)
    with pytest.raises(ValueError, match="normalize"):
        UniversalGenerator(MNIST, normalize="arithmetic")
    with pytest.raises(ValueError, match="input_shape"):
        UniversalGenerator((28, 28))


# --------------------------------------------------------------------------- input-dependent


def test_input_dependent_shapes_and_flags():
    gen = _randomise(InputDependentGenerator(MNIST), 0.05)
    x = torch.rand(3, *MNIST)
    with torch.no_grad():
        sigma, mu = gen(x)
    assert sigma.shape == (3, *MNIST) and mu.shape == (3, *MNIST)
    assert (sigma > 0).all()
    assert float(sigma.max()) <= math.e * (1 + 1e-6) and float(sigma.min()) >= math.exp(-1) * (1 - 1e-6)
    assert float(mu.abs().max()) <= 1.0
    # different inputs get different noise parameters
    assert not torch.allclose(sigma[0], sigma[1])
    assert gen.input_dependent and gen.is_certificate is False
    assert gen.describe()["is_certificate"] is False
    convs = [m for m in gen.sigma_net.features if isinstance(m, torch.nn.Conv2d)]
    relus = [m for m in gen.sigma_net.features if isinstance(m, torch.nn.LeakyReLU)]
    assert len(convs) == 4 and len(relus) == 4


def test_input_dependent_sigma_sees_x_plus_mu():
    gen = _randomise(InputDependentGenerator((1, 8, 8)), 0.1)
    x = torch.rand(2, 1, 8, 8)
    sigma, mu = gen(x)
    expected = torch.exp(gen.gamma * torch.tanh(gen.sigma_net(x + mu)))
    assert torch.allclose(sigma, expected)


def test_input_dependent_geometric_per_image_and_large_images():
    gen = _randomise(InputDependentGenerator((3, 70, 70), normalize="geometric", channels=(4, 4, 4, 4)), 0.1)
    sigma, mu = gen(torch.rand(2, 3, 70, 70))
    assert sigma.shape == (2, 3, 70, 70)
    assert gen.sigma_net.out_shape == (3, 56, 56)  # low-resolution dense head, upsampled
    for image in sigma:
        assert _geomean(image) == pytest.approx(1.0, rel=1e-4)


def test_input_dependent_to_noise_raises_and_needs_x():
    gen = InputDependentGenerator(MNIST)
    with pytest.raises(ValueError, match="not hold|not sound|DESIGN"):
        gen.to_noise(Gaussian(0.25))
    with pytest.raises(ValueError, match="batch"):
        gen()
    with pytest.raises(ValueError, match="batch"):
        gen(torch.rand(2, 1, 27, 28))


# --------------------------------------------------------------------------- common interface


def _all_generators():
    return [
        PatternFixedGenerator(RGB, p="inf", kappa=0.3, iota=0.7, centre=(1, 2)),
        PatternFixedGenerator(RGB, p=1, kappa=0.3, iota=0.7, trainable=True, normalize=False),
        UniversalGenerator(RGB, gamma=2.0, gamma_mu=0.5, normalize="geometric", hidden=16, latent_dim=8,
                           input_seed=7),
        UniversalGenerator(RGB, learn_mu=False, hidden=16, latent_dim=8),
        InputDependentGenerator(RGB, channels=(4, 8, 8, 8), pool=2),
    ]


@pytest.mark.parametrize("index", range(5))
def test_describe_round_trip_gives_identical_outputs(index):
    gen = _all_generators()[index]
    if gen.kind != "pattern":
        _randomise(gen, 0.2, seed=index)
    cfg = gen.describe()
    cfg = json.loads(json.dumps(cfg))  # JSON-serialisable, survives a config.json
    rebuilt = generator_from_config(cfg, gen.state_dict())
    assert type(rebuilt) is type(gen) and rebuilt.describe() == cfg
    x = torch.rand(2, *RGB)
    for a, b in zip(gen(x), rebuilt(x)):
        assert torch.equal(a, b)


def test_rebuild_errors():
    with pytest.raises(ValueError, match="kind"):
        generator_from_config({"input_shape": [1, 2, 2]})
    with pytest.raises(ValueError, match="unknown generator kind"):
        make_generator("spiral", MNIST)
    with pytest.raises(ValueError, match="do not fit"):
        generator_from_config(UniversalGenerator(MNIST, hidden=8).describe(),
                              UniversalGenerator(MNIST, hidden=16).state_dict())
    with pytest.raises(ValueError, match="bad parameters"):
        make_generator("pattern", MNIST, gamma=3)
    assert set(GENERATORS) == {"pattern", "universal", "input_dependent", "elastic_sigma"}


def test_to_noise_returns_fixed_anisotropic_with_the_right_law():
    gen = _randomise(UniversalGenerator((1, 4, 4), gamma=1.0, gamma_mu=0.5, hidden=16, latent_dim=8), 0.5)
    with torch.no_grad():
        sigma, mu = gen()
    noise = gen.to_noise(Gaussian(0.5))
    assert isinstance(noise, Anisotropic) and noise.is_certificate
    assert torch.allclose(noise.sigma, sigma.double()) and torch.allclose(noise.mu, mu.double())
    draws = noise.sample((40000, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    std, mean = draws.std(dim=0), draws.mean(dim=0)
    # std per pixel = scale * sigma; mean = mu (sampling error ~ 1/sqrt(2n), 1/sqrt(n))
    assert torch.allclose(std, 0.5 * sigma, rtol=0.03)
    assert torch.allclose(mean, mu, atol=4 * float((0.5 * sigma).max()) / 200)


def test_pattern_to_noise_has_no_mu_and_certifies():
    gen = PatternFixedGenerator((1, 6, 6), p=2, kappa=0.5, iota=1.0)
    noise = gen.to_noise(Laplace(0.3))
    assert noise.mu is None
    assert noise.base.name == "laplace" and noise.scale == 0.3
    draws = noise.sample((20000, 1, 6, 6), generator=torch.Generator().manual_seed(0))
    # Laplace(b) has std b * sqrt(2)
    assert torch.allclose(draws.std(dim=0), 0.3 * math.sqrt(2) * gen()[0], rtol=0.05)
    # Certification code needs nothing else: a constant classifier gets certified.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    cert = Smooth(model, 3, noise).certify(torch.rand(1, 6, 6), n0=10, n=200, alpha=0.01, generator=0)
    assert cert.prediction == 1 and cert.is_certificate and cert.radius(1) > 0
    # Laplace is native in l1: the l1 radius is R * min(sigma) (DESIGN.md section 3).
    assert cert.radius(1) == pytest.approx(cert.regions[0].radius_scaled * float(gen()[0].min()), rel=1e-5)


def test_to_noise_rejects_sigma_below_sigma_min():
    gen = PatternFixedGenerator(MNIST, p=2, kappa=100.0, iota=1e-3)
    with pytest.raises(ValueError, match="sigma_min"):
        gen.to_noise(Gaussian(0.25), sigma_min=0.01)
    with pytest.raises(TypeError):
        gen.to_noise(0.25)


def test_sigma_stats():
    stats = sigma_stats(torch.tensor([1.0, 4.0]))
    assert stats == {"sigma_mean": 2.5, "sigma_min": 1.0, "sigma_max": 4.0, "sigma_geomean": pytest.approx(2.0)}


def test_make_noise_families_combine_with_generators():
    gen = PatternFixedGenerator((1, 4, 4), p=1, kappa=0.2, iota=1.0)
    for family in ("gaussian", "laplace", "uniform", "expinf"):
        noise = gen.to_noise(make_noise(family, 0.1))
        assert noise.sample((3, 1, 4, 4)).shape == (3, 1, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generators_on_cuda():
    for gen in _all_generators():
        gen = gen.cuda()
        sigma, mu = gen(torch.rand(2, *RGB, device="cuda"))
        assert sigma.is_cuda and mu.is_cuda
        if not gen.input_dependent:
            assert gen.to_noise(Gaussian(0.1)).sigma.device.type == "cpu"
