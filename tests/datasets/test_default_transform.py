"""default_transform: output shapes and normalisation per dataset."""
import pytest
import torch
from PIL import Image

from pml_dsb.datasets import default_transform
from pml_dsb.datasets.transforms import CIFAR100_MEAN, IMAGENET_MEAN


@pytest.mark.parametrize("dataset", ["cub200", "cars196"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_fine_grained_shapes(dataset, split):
    t = default_transform(dataset, split, image_size=48)
    out = t(Image.new("RGB", (90, 70), (1, 2, 3)))
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert default_transform(dataset, split)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)


def test_imagenet_normalisation_centres_the_mean_colour():
    colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    out = default_transform("cub200", "test", image_size=32)(Image.new("RGB", (40, 40), colour))
    assert out.abs().max() < 0.02


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_shapes_and_normalisation(split):
    colour = tuple(round(255 * m) for m in CIFAR100_MEAN)
    out = default_transform("cifar100lt", split)(Image.new("RGB", (32, 32), colour))
    assert out.shape == (3, 32, 32)
    if split == "test":
        assert out.abs().max() < 0.02
    assert default_transform("cifar100lt", split, image_size=64)(
        Image.new("RGB", (32, 32))
    ).shape == (3, 64, 64)


def test_digits_and_errors():
    assert default_transform("digitslt", "train") is None
    with pytest.raises(ValueError, match="dataset"):
        default_transform("imagenet")
    with pytest.raises(ValueError, match="split"):
        default_transform("cub200", "val")
    with pytest.raises(ValueError, match="image_size"):
        default_transform("cub200", image_size=0)
