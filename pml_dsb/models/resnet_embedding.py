"""torchvision ResNet-18/50 backbones with a linear embedding head."""
from __future__ import annotations

import logging
import os
import pickle
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..functional.semantic_scale import check_flag

logger = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet50")


def _arch_spec(arch: str):
    from torchvision import models

    if arch == "resnet18":
        return models.resnet18, models.ResNet18_Weights
    if arch == "resnet50":
        return models.resnet50, models.ResNet50_Weights
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def hub_cache_candidates(arch: str) -> list[str]:
    """Paths in the torch hub cache where torchvision would have stored the
    ImageNet weights of ``arch`` (``<torch.hub.get_dir()>/checkpoints/<file of
    the weights URL>``), its default weights first."""
    _, weights_enum = _arch_spec(arch)
    members = [weights_enum.DEFAULT] + [w for w in weights_enum if w != weights_enum.DEFAULT]
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    return [os.path.join(checkpoints, w.url.rsplit("/", 1)[-1]) for w in members]


def resolve_pretrained(arch: str, pretrained: Union[bool, str, os.PathLike, None]) -> Optional[str]:
    """The weights file that ``pretrained`` designates, or None for no weights.

    ``False``/``None``: none. ``True``: the first existing file of
    :func:`hub_cache_candidates`. A path: that file. Never downloads; a
    missing file raises ``FileNotFoundError``.
    """
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        candidates = hub_cache_candidates(arch)
        for path in candidates:
            if os.path.isfile(path):
                return path
        _, weights_enum = _arch_spec(arch)
        raise FileNotFoundError(
            f"pretrained=True: no ImageNet weights for {arch} in the torch hub cache; "
            f"expected one of {candidates}. Nothing is downloaded: copy the file from "
            f"{weights_enum.DEFAULT.url} there, pass pretrained=<path to a state_dict file>, "
            f"or pretrained=False."
        )
    if isinstance(pretrained, (str, os.PathLike)):
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained={path!r}: no such file; expected a torchvision {arch} state_dict "
                f"saved with torch.save"
            )
        return path
    raise TypeError(f"pretrained must be a bool, None or a file path, got {pretrained!r}")


def load_backbone_state_dict(backbone: nn.Module, path: str, arch: str) -> None:
    """Load a torchvision ResNet state_dict file into ``backbone`` (whose ``fc``
    is already ``Identity``): ``fc.*`` keys are dropped, a ``{"state_dict": ...}``
    wrapper and a ``module.`` prefix are accepted, every other key must match."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # a three-byte file failed inside the unpickler with IndexError
    except (pickle.UnpicklingError, EOFError, RuntimeError, IndexError, KeyError, TypeError, ValueError) as err:
        # torch's own message for a file it cannot read suggests weights_only=False
        # (arbitrary code): a weights file is tensors, so say what is wrong instead
        raise ValueError(
            f"pretrained file {path!r} could not be read as a torch.save state_dict of tensors "
            f"({type(err).__name__}); is it corrupt or truncated? Replace it with the original file"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained file {path!r} does not hold a state_dict (a dict of tensors)")
    state = {
        (k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
    }
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"pretrained file {path!r} is not a torchvision {arch} state_dict: {err}"
        ) from err


class ResNetEmbedding(nn.Module):
    """A torchvision ResNet whose classifier is replaced by a linear embedding head.

    ``forward(x)`` computes ``head(pool(resnet_trunk(x)))``: the ResNet up to
    its global average pooling (512 features for ResNet-18, 2048 for
    ResNet-50), then ``nn.Linear(features, embedding_size)``. Input: ``N x 3
    x H x W`` images, normalised as the weights expect (ImageNet mean/std
    for ImageNet weights; any ``H, W >= 32``).

    Weights: the backbone is built with ``weights=None`` (torchvision never
    downloads) and then, per ``pretrained``:

    - ``False`` (default): random initialisation; runs anywhere.
    - ``True``: torchvision's ImageNet file from the torch hub cache,
      ``<torch.hub.get_dir()>/checkpoints/resnet18-f37072fd.pth`` or, for
      ResNet-50, ``resnet50-11ad3fa6.pth`` (V2) then ``resnet50-0676ba61.pth``
      (V1); ``FileNotFoundError`` when none is there.
    - a path: a torchvision ResNet ``state_dict`` saved with ``torch.save``.

    The embedding head is always freshly initialised.

    Args:
        arch: ``"resnet18"`` or ``"resnet50"``.
        embedding_size: output dimension.
        pretrained: ``False``, ``True`` or a file path (see above).
        normalize: if True, L2-normalise the output rows; by default the raw
            linear output is returned.

    Attributes: ``pretrained_path`` (the file loaded, or None) and
    ``feature_size``.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        embedding_size: int = 512,
        pretrained: Union[bool, str, os.PathLike] = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        constructor, _ = _arch_spec(arch)
        if (
            isinstance(embedding_size, bool)
            or not isinstance(embedding_size, int)
            or embedding_size < 1
        ):
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        path = resolve_pretrained(arch, pretrained)
        backbone = constructor(weights=None)
        self.feature_size = backbone.fc.in_features
        backbone.fc = nn.Identity()
        if path is not None:
            load_backbone_state_dict(backbone, path, arch)
            logger.info("ResNetEmbedding(%s): loaded backbone weights from %s", arch, path)
        self.arch = arch
        self.embedding_size = embedding_size
        self.normalize = check_flag("normalize", normalize)  # "false" would read as true
        self.pretrained_path = path
        self.backbone = backbone
        self.embedding = nn.Linear(self.feature_size, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.embedding(self.backbone(x))
        return F.normalize(out, p=2, dim=1) if self.normalize else out
