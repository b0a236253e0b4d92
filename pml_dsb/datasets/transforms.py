"""Default image transforms of each dataset, as deep-metric-learning code uses them."""
from __future__ import annotations

from typing import Callable, Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Channel statistics of the CIFAR-100 training set, as commonly quoted.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DATASETS = ("cub200", "cars196", "cifar100lt", "digitslt")


def default_transform(
    dataset: str, split: str = "train", image_size: Optional[int] = None
) -> Optional[Callable]:
    """The transform that turns a dataset's images into network input tensors.

    - ``"cub200"``, ``"cars196"`` (ImageNet-pretrained backbones; default
      ``image_size`` 224): train: ``RandomResizedCrop(image_size)``,
      horizontal flip; test: resize the short side to
      ``round(image_size * 256 / 224)``, ``CenterCrop(image_size)``; both
      then ``ToTensor`` and ImageNet mean/std normalisation.
    - ``"cifar100lt"`` (default ``image_size`` 32): a ``Resize(image_size)``
      first when ``image_size != 32``; train: ``RandomCrop(image_size,
      padding=4 * image_size // 32)`` (``RandomCrop(32, padding=4)`` at 32),
      horizontal flip; test: nothing more; both then ``ToTensor`` and
      CIFAR-100 mean/std normalisation.
    - ``"digitslt"``: ``None`` (its images already are ``1 x 8 x 8`` tensors
      in ``[0, 1]``).

    The random transforms draw from torch's global RNG, which the entry
    point (or the DataLoader's worker seeding) controls.

    >>> t = default_transform("cub200", "test", image_size=64)
    >>> from PIL import Image
    >>> tuple(t(Image.new("RGB", (100, 80))).shape)
    (3, 64, 64)
    >>> default_transform("digitslt") is None
    True
    """
    from torchvision import transforms as T

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if dataset == "digitslt":
        return None
    if dataset == "cifar100lt":
        size = 32 if image_size is None else image_size
        steps = [] if size == 32 else [T.Resize(size)]
        if split == "train":
            steps += [T.RandomCrop(size, padding=4 * size // 32), T.RandomHorizontalFlip()]
        steps += [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
        return T.Compose(steps)
    size = 224 if image_size is None else image_size
    if split == "train":
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
