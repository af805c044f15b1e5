"""The user's own model: Cohen et al.'s checkpoint layout, torchvision ResNet-50 weights, a factory,
TorchScript, and the input contract (ucan_smoothing.runs.load_model, ucan_smoothing.contract)."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from ucan_smoothing import Gaussian
from ucan_smoothing.contract import check_input_contract
from ucan_smoothing.models import IMAGENET_MEAN, IMAGENET_STD, ResNet50
from ucan_smoothing.runs import ExternalModel, load_model


# -- an independent Cohen-style network: Sequential(NormalizeLayer, bearpaw-style CIFAR ResNet) -----------


class CohenNormalize(nn.Module):
    """Like their NormalizeLayer: plain tensors, no parameters, nothing in the state dict."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means).view(1, -1, 1, 1), torch.tensor(sds).view(1, -1, 1, 1)

    def forward(self, x):
        return (x - self.means) / self.sds


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class CohenCifarResNet(nn.Module):
    def __init__(self, depth=20):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, cin, layers = (16, 32, 64), 16, []
        for i, width in enumerate(widths):
            blocks = [Block(cin, width, 1 if i == 0 else 2)] + [Block(width, width, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.flatten(1))


COHEN_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def randomise_batchnorm(model):
    """Non-trivial running statistics, so eval-mode logits test that they were loaded."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def cohen_checkpoint(tmp_path, depth=20, prefix="1.", arch=None):
    torch.manual_seed(0)
    reference = nn.Sequential(CohenNormalize(*COHEN_CIFAR), randomise_batchnorm(CohenCifarResNet(depth))).eval()
    state = {prefix + key[2:]: value for key, value in reference.state_dict().items()}  # keys start "1."
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": arch or f"cifar_resnet{depth}", "state_dict": state,
                "optimizer": optimizer.state_dict()}, path)
    return path, reference


@pytest.mark.parametrize("prefix", ["1.", "module.1."])
def test_cohen_checkpoint_computes_the_same_function(tmp_path, prefix):
    path, reference = cohen_checkpoint(tmp_path, prefix=prefix)
    loaded = load_model(path, noise=Gaussian(0.25))
    assert isinstance(loaded, ExternalModel)
    assert loaded.meta["dataset"] == "cifar10" and loaded.meta["arch"] == "cifar_resnet20"
    assert loaded.meta["normalization"]["std"] == pytest.approx(list(COHEN_CIFAR[1]))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), reference(x), atol=1e-5)


def test_cohen_layout_with_our_normalisation_would_be_another_function(tmp_path):
    # what a loader that kept models.py's true CIFAR-10 standard deviations would compute
    from ucan_smoothing.models import CifarResNet

    path, reference = cohen_checkpoint(tmp_path)
    ours = CifarResNet(20).eval()
    ours.load_state_dict({k[2:]: v for k, v in reference.state_dict().items()})
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(ours(x), reference(x), atol=1e-3)


def test_cohen_imagenet_resnet50_in_dataparallel(tmp_path):
    torch.manual_seed(0)
    net = randomise_batchnorm(ResNet50()).eval()
    path = tmp_path / "imagenet.pth.tar"
    torch.save({"arch": "resnet50", "state_dict": {f"1.module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_model(path, noise=Gaussian(0.5))
    assert loaded.meta["dataset"] == "imagenet" and loaded.num_classes == 1000
    x = torch.rand(1, 3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net((x - mean) / std), atol=1e-4)


def test_torchvision_resnet50_state_dict(tmp_path):
    net = ResNet50().eval()
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    loaded = load_model(path, arch="resnet50", noise=Gaussian(0.5))
    assert loaded.meta["format"] == "torchvision"
    assert torch.equal(loaded.model.net.fc.weight, net.fc.weight)
    with pytest.raises(ValueError, match="cannot tell what"):
        load_model(path, noise=Gaussian(0.5))  # a bare state dict needs --arch


def test_cohen_checkpoint_errors(tmp_path):
    path, _ = cohen_checkpoint(tmp_path, arch="vgg16")
    with pytest.raises(ValueError, match="arch 'vgg16'.*cifar_resnet20"):
        load_model(path, noise=Gaussian(0.25))
    path, _ = cohen_checkpoint(tmp_path, depth=32, arch="cifar_resnet20")  # a file of another model
    with pytest.raises(ValueError, match=r"unexpected keys \['layer1\.3"):
        load_model(path, noise=Gaussian(0.25))
    path, _ = cohen_checkpoint(tmp_path, prefix="net.")
    with pytest.raises(ValueError, match="Sequential\\(NormalizeLayer, network\\)"):
        load_model(path, noise=Gaussian(0.25))
    path, _ = cohen_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="cifar10 model but --dataset mnist"):
        load_model(path, noise=Gaussian(0.25), dataset="mnist")
    with pytest.raises(ValueError, match="give its noise with --noise"):
        load_model(path)


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def small():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def not_a_module():
        return "a string"

    def wrong_logits():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Flatten(0))
""")


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_factory_model_with_weights(tmp_path, factory_module):
    weights = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    torch.save({f"module.{k}": v for k, v in weights.state_dict().items()}, tmp_path / "w.pt")
    loaded = load_model(factory=f"{factory_module}:small", weights=tmp_path / "w.pt", dataset="mnist",
                        noise=Gaussian(0.25))
    assert torch.equal(loaded.model[1].weight, weights[1].weight) and loaded.num_classes == 10


def test_factory_errors(tmp_path, factory_module):
    with pytest.raises(ValueError, match="returned str, not a torch.nn.Module"):
        load_model(factory=f"{factory_module}:not_a_module", dataset="mnist", noise=Gaussian(0.25))
    with pytest.raises(ValueError, match=r"logits of shape \(batch, classes\)"):
        load_model(factory=f"{factory_module}:wrong_logits", dataset="mnist", noise=Gaussian(0.25))
    with pytest.raises(ValueError, match="no callable 'missing'"):
        load_model(factory=f"{factory_module}:missing", dataset="mnist", noise=Gaussian(0.25))
    with pytest.raises(ValueError, match="--dataset"):
        load_model(factory=f"{factory_module}:small", noise=Gaussian(0.25))
    with pytest.raises(ValueError, match="returns 10 logits per input but 1000"):
        load_model(factory=f"{factory_module}:small", dataset="mnist", num_classes=1000, noise=Gaussian(0.25))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing keys"):
        load_model(factory=f"{factory_module}:small", weights=tmp_path / "bad.pt", dataset="mnist",
                   noise=Gaussian(0.25))


def test_torchscript_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    path = tmp_path / "model.ts"
    torch.jit.script(model).save(str(path))
    loaded = load_model(path, dataset="mnist", noise=Gaussian(0.25))
    assert loaded.meta["format"] == "torchscript"
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x))


def test_sigma_file_must_fit_the_input(tmp_path, factory_module):
    torch.save(torch.ones(3, 28, 28), tmp_path / "sigma.pt")
    with pytest.raises(ValueError, match=r"--sigma .* shape \(3, 28, 28\).*\(1, 28, 28\)"):
        load_model(factory=f"{factory_module}:small", dataset="mnist", noise=Gaussian(0.25),
                   sigma=tmp_path / "sigma.pt")
    torch.save(torch.full((1, 28, 28), 2.0), tmp_path / "sigma.pt")
    loaded = load_model(factory=f"{factory_module}:small", dataset="mnist", noise=Gaussian(0.25),
                        sigma=tmp_path / "sigma.pt")
    assert loaded.noise().sigma.shape == (1, 28, 28) and loaded.description() == "fixed_sigma"


# -- the input contract -----------------------------------------------------------------------


class Brightness(nn.Module):
    """Class = which of 4 brightness bands the mean pixel falls in, after its own normalisation."""

    def __init__(self, mean=0.5, std=0.25):
        super().__init__()
        self.mean, self.std = mean, std
        self.centres = nn.Parameter(torch.tensor([0.125, 0.375, 0.625, 0.875]), requires_grad=False)

    def forward(self, x):
        level = ((x - self.mean) / self.std).flatten(1).mean(1) * self.std + self.mean  # undo: pixel units
        return -(level[:, None] - self.centres) ** 2


def contract_data():
    labels = torch.arange(32) % 4
    images = (0.125 + 0.25 * labels.float()).view(32, 1, 1, 1).expand(32, 1, 8, 8).clone()
    return images, labels


def test_contract_passes_a_model_that_honours_it():
    from ucan_smoothing import Smooth

    images, labels = contract_data()
    model = Brightness()
    report = check_input_contract(Smooth(model, 4, Gaussian(0.05)), model, images, labels, 4)
    assert report.clean_accuracy == 1.0 and report.noisy_accuracy > 0.9 and report.problem() is None


def test_contract_stops_a_normalisation_applied_twice():
    from ucan_smoothing import Smooth

    images, labels = contract_data()
    model = nn.Sequential(CohenNormalize((0.5,), (0.25,)), Brightness())  # the user normalised it once more
    report = check_input_contract(Smooth(model, 4, Gaussian(0.05)), model, images, labels, 4)
    assert report.problem() is not None and "clean inputs at chance" in report.problem()


def test_contract_stops_noise_in_the_wrong_units():
    from ucan_smoothing import Smooth

    images, labels = contract_data()
    model = Brightness()
    report = check_input_contract(Smooth(model, 4, Gaussian(64.0)), model, images, labels, 4)  # 0-255 units
    assert report.clean_accuracy == 1.0 and "noisy accuracy" in report.problem()
