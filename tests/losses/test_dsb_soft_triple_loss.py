"""DSBSoftTripleLoss: a SoftTripleLoss subclass; parent arguments, exact parent equality with
non-default arguments. Generic DSB behaviour (checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
import pytest
import torch
from dsb_loss_testlib import leaf, make_pair
from pytorch_metric_learning.losses import SoftTripleLoss

from pml_dsb import DSBSoftTripleLoss, DSBWeightingMixin

CASE = "soft_triple"


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


def test_non_default_arguments_equal_parent_before_stage_3(gen):
    dsb, parent, _ = make_pair(CASE, gen, 4, 8, 16, 2, parent_kwargs=dict(centers_per_class=2, la=15, gamma=0.2, margin=0.05))
    for _ in range(4):  # 24 samples: stages 1 and 2
        emb, labels = torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        e1, e2 = leaf(emb), leaf(emb)
        got, want = dsb(e1, labels), parent(e2, labels)
        assert torch.equal(got, want)
        got.backward()
        want.backward()
        assert torch.equal(e1.grad, e2.grad)
    assert dsb.memory.stage == 2
