"""DSBSoftTripleLoss: a SoftTripleLoss subclass; parent arguments are forwarded. Generic DSB behaviour (exact
parent equality, also with non-default arguments, checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
import pytest
from pytorch_metric_learning.losses import SoftTripleLoss

from pml_dsb import DSBSoftTripleLoss, DSBWeightingMixin


def test_is_a_pml_parent_subclass():
    assert issubclass(DSBSoftTripleLoss, SoftTripleLoss) and issubclass(DSBSoftTripleLoss, DSBWeightingMixin)
    loss = DSBSoftTripleLoss(4, 8, memory_size=16)
    assert loss.memory.num_classes == 4 and loss.memory.embedding_size == 8


def test_parent_arguments_are_forwarded():
    loss = DSBSoftTripleLoss(5, 8, memory_size=20, centers_per_class=2, la=15, gamma=0.2, margin=0.05)
    assert (loss.num_classes, loss.centers_per_class, loss.la, loss.margin) == (5, 2, 15, 0.05)
    assert loss.gamma == pytest.approx(1 / 0.2)
    assert loss.fc.shape == (8, 10)
    assert (loss.memory.memory_size, loss.memory.warmup_epochs, loss.memory.normalize) == (20, 5, "mean")
