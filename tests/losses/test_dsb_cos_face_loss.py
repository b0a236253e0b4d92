"""DSBCosFaceLoss: a CosFaceLoss subclass; parent arguments, exact parent equality with
non-default arguments. Generic DSB behaviour (checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
import torch
from dsb_loss_testlib import leaf, make_pair
from pytorch_metric_learning.losses import CosFaceLoss

from pml_dsb import DSBCosFaceLoss, DSBWeightingMixin

CASE = "cosface"


def test_is_a_pml_parent_subclass():
    assert issubclass(DSBCosFaceLoss, CosFaceLoss) and issubclass(DSBCosFaceLoss, DSBWeightingMixin)
    loss = DSBCosFaceLoss(4, 8, memory_size=16)
    assert loss.memory.num_classes == 4 and loss.memory.embedding_size == 8


def test_parent_arguments_are_forwarded():
    loss = DSBCosFaceLoss(5, 8, memory_size=20, margin=0.2, scale=16)
    assert loss.margin == 0.2 and loss.scale == 16
    assert loss.W.shape == (8, 5)


def test_non_default_arguments_equal_parent_before_stage_3(gen):
    dsb, parent, _ = make_pair(CASE, gen, 4, 8, 16, 2, parent_kwargs=dict(margin=0.2, scale=16))
    for _ in range(4):  # 24 samples: stages 1 and 2
        emb, labels = torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        e1, e2 = leaf(emb), leaf(emb)
        got, want = dsb(e1, labels), parent(e2, labels)
        assert torch.equal(got, want)
        got.backward()
        want.backward()
        assert torch.equal(e1.grad, e2.grad)
    assert dsb.memory.stage == 2
