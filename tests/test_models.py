"""Tests for ucan_smoothing.models: shapes, normalisation inside, registry, checkpoints."""

import os

import pytest
import torch

from ucan_smoothing import models
from ucan_smoothing.models import (
    MODEL_INPUT_SHAPES, MnistCNN, build_model, cifar_resnet, imagenet_resnet50, load_checkpoint,
    load_state_dict_file, save_checkpoint,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet20", "resnet110"])
def test_output_shape_small_models(name):
    model = build_model(name).eval()
    x = torch.rand(3, *MODEL_INPUT_SHAPES[name])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, models.MODEL_NUM_CLASSES[name])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet20"])
def test_channels_last_keeps_the_outputs(name):
    model = build_model(name).eval()
    x = torch.rand(5, *MODEL_INPUT_SHAPES[name])

    def nhwc_weights():
        return [m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    assert not all(nhwc_weights())
    with torch.no_grad():
        before = model(x)
        assert models.to_channels_last(model) is model  # in place
        after = model(x)
    assert all(nhwc_weights())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_mnist_cnn_pools_before_its_relu_with_the_same_outputs_and_gradients(channels_last):
    """ReLU after max-pool (a quarter of the values) is the textbook ReLU-then-pool, exactly."""
    import torch.nn.functional as F

    model = build_model("mnist_cnn")
    if channels_last:
        models.to_channels_last(model)
    x = torch.randn(16, 1, 28, 28)

    def textbook(x):
        h = model.normalize(x)
        h = F.max_pool2d(F.relu(model.conv1(h)), 2)
        h = F.max_pool2d(F.relu(model.conv2(h)), 2)
        return model.fc2(F.relu(model.fc1(torch.flatten(h, 1))))

    out, reference = model(x), textbook(x)
    assert torch.equal(out, reference)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    reference_grads = torch.autograd.grad(reference.sum(), list(model.parameters()))
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)


def test_autocast_wrapper_returns_float32_logits_close_to_the_model():
    model = build_model("mnist_cnn").eval()
    x = torch.rand(4, 1, 28, 28)
    wrapped = models.Autocast(model, "bf16")
    with torch.no_grad():
        out, reference = wrapped(x), model(x)
    assert out.dtype == torch.float32 and not torch.equal(out, reference)  # it did run in bfloat16
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="bf16, fp16"):
        models.Autocast(model, "int8")


def test_resnet50_forward_small_input():
    # Global average pooling makes the net size-agnostic: 64x64 keeps the test fast.
    model = build_model("resnet50").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 1000)
    assert MODEL_INPUT_SHAPES["resnet50"] == (3, 224, 224)


def test_resnet50_state_dict_matches_torchvision_names():
    net = imagenet_resnet50().net
    keys = list(net.state_dict())
    assert len(keys) == 320  # torchvision resnet50().state_dict() has 320 entries
    for key in ["conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
                "layer2.3.conv2.weight", "layer3.5.bn2.bias", "layer4.2.bn3.weight",
                "fc.weight", "fc.bias"]:
        assert key in keys, key
    assert "layer1.1.downsample.0.weight" not in keys
    assert net.state_dict()["fc.weight"].shape == (1000, 2048)
    assert net.state_dict()["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert sum(p.numel() for p in net.parameters()) == 25_557_032  # torchvision's count
    # Normalisation constants are not in the state dict at all.
    assert all(not k.startswith("normalize") for k in imagenet_resnet50().state_dict())


def test_cifar_resnet_depths():
    assert len(cifar_resnet(20).layer1) == 3
    assert len(models.resnet110().layer3) == 18
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)
    n110 = sum(p.numel() for p in models.resnet110().parameters())
    assert 1.7e6 < n110 < 1.75e6  # ResNet-110: about 1.7 M parameters


@pytest.mark.parametrize("name,mean,std", [
    ("mnist_cnn", models.MNIST_MEAN, models.MNIST_STD),
    ("resnet20", models.CIFAR10_MEAN, models.CIFAR10_STD),
])
def test_normalisation_is_inside(name, mean, std):
    model = build_model(name).eval()
    assert isinstance(next(iter(model.children())), models.Normalize)  # first layer
    x = torch.rand(2, *MODEL_INPUT_SHAPES[name])
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean_t) / std_t)
    # The model on [0,1] pixels equals the same weights without normalisation
    # fed the normalised input.
    with torch.no_grad():
        out = model(x)
        model.normalize = torch.nn.Identity()
        torch.testing.assert_close(model((x - mean_t) / std_t), out)


def test_resnet50_wrapper_normalises():
    model = imagenet_resnet50().eval()
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="mnist_cnn.*resnet20.*resnet110.*resnet50"):
        build_model("vgg16")


def _no_temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")] == []


def test_checkpoint_round_trip(tmp_path):
    model = MnistCNN()
    extra = {"noise": "gaussian", "scale": 0.25, "npg": "universal", "sigma": torch.ones(3)}
    path = tmp_path / "sub" / "mnist.pt"
    save_checkpoint(path, model, model_name="mnist_cnn", dataset="mnist", extra=extra)
    assert path.is_file() and _no_temp_files(path.parent)
    loaded, meta = load_checkpoint(path, expected_model_name="mnist_cnn", expected_dataset="mnist")
    assert meta["model_name"] == "mnist_cnn" and meta["dataset"] == "mnist"
    assert meta["extra"]["scale"] == 0.25 and meta["extra"]["npg"] == "universal"
    torch.testing.assert_close(meta["extra"]["sigma"], torch.ones(3))
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_checkpoint_overwrite_is_atomic_and_clean(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, MnistCNN(), model_name="mnist_cnn", dataset="mnist")
    save_checkpoint(path, MnistCNN(), model_name="mnist_cnn", dataset="fashion_mnist")
    assert os.listdir(tmp_path) == ["m.pt"]
    assert load_checkpoint(path)[1]["dataset"] == "fashion_mnist"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(models.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m.pt", MnistCNN(), model_name="mnist_cnn", dataset="mnist")
    assert os.listdir(tmp_path) == []


def test_checkpoint_wrong_model_or_dataset(tmp_path):
    path = tmp_path / "r20.pt"
    save_checkpoint(path, build_model("resnet20"), model_name="resnet20", dataset="cifar10")
    with pytest.raises(ValueError, match="'resnet20'.*'mnist_cnn'"):
        load_checkpoint(path, expected_model_name="mnist_cnn")
    with pytest.raises(ValueError, match="'cifar10'.*'mnist'"):
        load_checkpoint(path, expected_dataset="mnist")


def test_checkpoint_weights_of_another_architecture(tmp_path):
    path = tmp_path / "lie.pt"
    save_checkpoint(path, build_model("resnet20"), model_name="mnist_cnn", dataset="mnist")
    with pytest.raises(ValueError, match="do not fit model 'mnist_cnn'"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="unknown model"):
        save_checkpoint(path, MnistCNN(), model_name="nope", dataset="mnist")


def test_checkpoint_missing_or_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(bad)
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not a ucan_smoothing checkpoint"):
        load_checkpoint(plain)


def test_resnet50_pretrained_weights(tmp_path):
    source = imagenet_resnet50().net
    path = tmp_path / "resnet50-0000.pth"
    torch.save(source.state_dict(), path)  # what torchvision's file holds
    loaded = imagenet_resnet50(path)
    assert torch.equal(loaded.net.fc.weight, source.fc.weight)
    # DataParallel-style prefix and a wrapped dict are accepted too.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, wrapped)
    assert torch.equal(imagenet_resnet50(wrapped).net.conv1.weight, source.conv1.weight)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        imagenet_resnet50(tmp_path / "nowhere.pth")
    other = tmp_path / "resnet20.pth"
    torch.save(build_model("resnet20").state_dict(), other)
    with pytest.raises(ValueError, match="resnet20.pth.*do not fit ResNet50.*missing"):
        imagenet_resnet50(other)


def test_load_state_dict_file_shape_mismatch(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(MnistCNN(num_classes=7).state_dict(), path)
    with pytest.raises(ValueError, match="w.pth.*do not fit MnistCNN"):
        load_state_dict_file(MnistCNN(), path)
