"""The model factory the training runner calls with a config's model section."""
from __future__ import annotations

import os
from typing import Union

from torch import nn

from .digits_embedding_net import DigitsEmbeddingNet
from .resnet_embedding import ResNetEmbedding

MODEL_NAMES = ("digits_cnn", "resnet18", "resnet50")


def build_model(
    name: str,
    embedding_size: int,
    pretrained: Union[bool, str, os.PathLike] = False,
    **kwargs,
) -> nn.Module:
    """Build the embedding network ``name`` with output dimension ``embedding_size``.

    - ``"digits_cnn"``: :class:`DigitsEmbeddingNet` (input ``N x 1 x 8 x 8``);
      it has no pretrained weights, so ``pretrained`` must be false.
    - ``"resnet18"``, ``"resnet50"``: :class:`ResNetEmbedding` with
      ``pretrained`` = ``False``, ``True`` (torch hub cache) or a file path.

    Extra keyword arguments go to the class (``normalize``; ``width`` for
    ``digits_cnn`` only).
    BN-Inception, the paper's backbone, is not provided: torchvision has no
    definition of it and no faithful one is available offline.

    >>> build_model("digits_cnn", 32).embedding_size
    32
    """
    if name == "digits_cnn":
        if pretrained:
            raise ValueError(
                f"pretrained must be False for 'digits_cnn' (no pretrained weights exist), "
                f"got {pretrained!r}"
            )
        return DigitsEmbeddingNet(embedding_size=embedding_size, **kwargs)
    if name in ("resnet18", "resnet50"):
        return ResNetEmbedding(name, embedding_size=embedding_size, pretrained=pretrained, **kwargs)
    if name.lower().replace("-", "").replace("_", "") == "bninception":
        raise ValueError(
            f"name={name!r}: BN-Inception is not available (torchvision has no definition and "
            f"no faithful one is bundled); use one of {MODEL_NAMES}"
        )
    raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
