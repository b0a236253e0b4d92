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


@pytest.mark.parametrize("dataset", ["cub200", "cars196"])
def test_fine_grained_test_view_is_the_centre_of_the_image_resized_to_256_per_224(dataset):
    """The standard test view: shorter side to size * 256/224, then the centre
    size x size crop. A 256-pixel image with a 16-pixel red frame around a
    black centre keeps only the black centre at size 224 (a resize straight to
    224 kept the frame)."""
    image = Image.new("RGB", (256, 256), (255, 0, 0))
    image.paste((0, 0, 0), (16, 16, 240, 240))
    out = default_transform(dataset, "test")(image)
    black = default_transform(dataset, "test")(Image.new("RGB", (256, 256), (0, 0, 0)))
    assert out.shape == (3, 224, 224) and torch.equal(out, black)
    # at 64 pixels the shorter side goes to round(64 * 256 / 224) = 73 first
    small = Image.new("RGB", (73, 73), (255, 0, 0))
    small.paste((0, 0, 0), (4, 4, 69, 69))  # a 4-5 pixel frame, outside the centre 64
    assert torch.equal(default_transform(dataset, "test", image_size=64)(small),
                       default_transform(dataset, "test", image_size=64)(Image.new("RGB", (73, 73))))


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


def _noise_image(size, seed=0):
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("dataset, split, image_size", [
    ("cub200", "train", None), ("cars196", "train", 40), ("cub200", "test", 40),
    ("cifar100lt", "train", None), ("cifar100lt", "train", 64), ("cifar100lt", "test", 48),
])
def test_pipelines_match_torchvision_built_by_hand(dataset, split, image_size):
    """The documented pipelines, written out with torchvision: same output for
    the same torch seed (random crops and flips draw in the same order)."""
    from torchvision import transforms as T

    from pml_dsb.datasets.transforms import CIFAR100_STD, IMAGENET_STD

    if dataset == "cifar100lt":
        size = image_size or 32
        steps = [] if size == 32 else [T.Resize(size)]
        if split == "train":
            steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        reference = T.Compose(steps + [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
        image = _noise_image((32, 32))
    else:
        size = image_size or 224
        steps = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if split == "train"
                 else [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])
        reference = T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        image = _noise_image((size + 30, size + 10))
    ours = default_transform(dataset, split, image_size=image_size)
    for seed in range(4):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected)
