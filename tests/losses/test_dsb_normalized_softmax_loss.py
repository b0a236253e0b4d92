"""DSBNormalizedSoftmaxLoss: a NormalizedSoftmaxLoss subclass; parent arguments are forwarded. Generic DSB behaviour (exact
parent equality, also with non-default arguments, checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

from pml_dsb import DSBNormalizedSoftmaxLoss, DSBWeightingMixin


def test_is_a_pml_parent_subclass():
    assert issubclass(DSBNormalizedSoftmaxLoss, NormalizedSoftmaxLoss) and issubclass(DSBNormalizedSoftmaxLoss, DSBWeightingMixin)
    loss = DSBNormalizedSoftmaxLoss(4, 8, memory_size=16)
    assert loss.memory.num_classes == 4 and loss.memory.embedding_size == 8


def test_parent_arguments_are_forwarded():
    loss = DSBNormalizedSoftmaxLoss(5, 8, memory_size=20, temperature=0.2, warmup_epochs=2, normalize=None)
    assert (loss.num_classes, loss.temperature) == (5, 0.2)
    assert loss.W.shape == (8, 5)
    assert (loss.memory.memory_size, loss.memory.warmup_epochs, loss.memory.normalize) == (20, 2, None)
