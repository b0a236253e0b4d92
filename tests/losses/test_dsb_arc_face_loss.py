"""DSBArcFaceLoss: a ArcFaceLoss subclass; parent arguments are forwarded. Generic DSB behaviour (exact
parent equality, also with non-default arguments, checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
import numpy as np
import pytest
from pytorch_metric_learning.losses import ArcFaceLoss

from pml_dsb import DSBArcFaceLoss, DSBWeightingMixin


def test_is_a_pml_parent_subclass():
    assert issubclass(DSBArcFaceLoss, ArcFaceLoss) and issubclass(DSBArcFaceLoss, DSBWeightingMixin)
    loss = DSBArcFaceLoss(4, 8, memory_size=16)
    assert loss.memory.num_classes == 4 and loss.memory.embedding_size == 8


def test_parent_arguments_are_forwarded():
    loss = DSBArcFaceLoss(5, 8, memory_size=20, margin=20.0, scale=16)
    assert loss.margin == pytest.approx(np.radians(20.0)) and loss.scale == 16
    assert loss.W.shape == (8, 5)
