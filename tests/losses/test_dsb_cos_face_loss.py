"""DSBCosFaceLoss: a CosFaceLoss subclass; parent arguments are forwarded. Generic DSB behaviour (exact
parent equality, also with non-default arguments, checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
from pytorch_metric_learning.losses import CosFaceLoss

from pml_dsb import DSBCosFaceLoss, DSBWeightingMixin


def test_is_a_pml_parent_subclass():
    assert issubclass(DSBCosFaceLoss, CosFaceLoss) and issubclass(DSBCosFaceLoss, DSBWeightingMixin)
    loss = DSBCosFaceLoss(4, 8, memory_size=16)
    assert loss.memory.num_classes == 4 and loss.memory.embedding_size == 8


def test_parent_arguments_are_forwarded():
    loss = DSBCosFaceLoss(5, 8, memory_size=20, margin=0.2, scale=16)
    assert loss.margin == 0.2 and loss.scale == 16
    assert loss.W.shape == (8, 5)
