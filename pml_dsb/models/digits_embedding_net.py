"""A small CNN that embeds 1x8x8 digit images (digits-LT) at their native size."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..functional.semantic_scale import check_flag


class DigitsEmbeddingNet(nn.Module):
    """Three 3x3 convolutions and a linear embedding head for ``N x 1 x 8 x 8`` input.

    ``conv(1->w) - BN - ReLU - conv(w->2w) - BN - ReLU - maxpool 2 (4x4) -
    conv(2w->2w) - BN - ReLU - flatten (2w*16) - linear -> embedding_size``
    with ``w = width``. About 120k parameters at the defaults; no pretrained
    weights exist for it.

    Args:
        embedding_size: dimension of the output embedding.
        width: channels of the first convolution.
        normalize: if True, the output is L2-normalised (unit norm per row);
            by default it is the raw linear output (PML's losses and the
            DSB memory normalise where they need to).

    Returns from ``forward``: a float tensor ``N x embedding_size``.

    >>> net = DigitsEmbeddingNet(embedding_size=16).eval()
    >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape)
    (2, 16)
    """

    def __init__(self, embedding_size: int = 64, width: int = 32, normalize: bool = False) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.embedding_size = embedding_size
        self.normalize = check_flag("normalize", normalize)  # "false" would read as true

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(1, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 2 * width),
            nn.Flatten(),
        )
        self.embedding = nn.Linear(2 * width * 4 * 4, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"DigitsEmbeddingNet expects a floating tensor (e.g. DigitsLT's images), got {what}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"DigitsEmbeddingNet expects input of shape N x 1 x 8 x 8, got {tuple(x.shape)}"
            )
        out = self.embedding(self.features(x))
        return F.normalize(out, p=2, dim=1) if self.normalize else out
