"""build_model: names, arguments passed through, clear errors."""
import pytest
import torch

from pml_dsb.models import MODEL_NAMES, DigitsEmbeddingNet, ResNetEmbedding, build_model


def test_digits_cnn():
    model = build_model("digits_cnn", 12, normalize=True)
    assert isinstance(model, DigitsEmbeddingNet) and model.normalize
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 12)


def test_resnet18_and_pretrained_passthrough(tmp_path):
    model = build_model("resnet18", 6)
    assert isinstance(model, ResNetEmbedding) and model.arch == "resnet18"
    path = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("resnet18", 6, pretrained=path)


def test_errors():
    with pytest.raises(ValueError, match="digits_cnn"):
        build_model("digits_cnn", 8, pretrained=True)
    with pytest.raises(ValueError, match="pretrained must be False for 'digits_cnn'.*'/x.pt'"):
        build_model("digits_cnn", 8, pretrained="/x.pt")  # a weights path: refused, not ignored
    with pytest.raises(ValueError, match="BN-Inception"):
        build_model("bn_inception", 64)
    with pytest.raises(ValueError) as info:
        build_model("vgg16", 64)
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_resnet_keyword_arguments_are_passed_through():
    assert build_model("resnet18", 6, normalize=True).normalize is True
    assert build_model("resnet18", 6).normalize is False


@pytest.mark.parametrize("name", ["BN-Inception", "bninception", "BN_Inception"])
def test_bn_inception_spellings_are_named(name):
    with pytest.raises(ValueError, match="BN-Inception is not available"):
        build_model(name, 64)
