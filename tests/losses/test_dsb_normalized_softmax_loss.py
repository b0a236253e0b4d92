"""DSBNormalizedSoftmaxLoss: a NormalizedSoftmaxLoss subclass; parent arguments, exact parent equality with
non-default arguments. Generic DSB behaviour (checkpoint/resume, PML trainers,
weighting) is in test_dsb_weighting.py."""
import torch
from dsb_loss_testlib import leaf, make_pair
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

from pml_dsb import DSBNormalizedSoftmaxLoss, DSBWeightingMixin

CASE = "norm_softmax"


def test_is_a_pml_parent_subclass():
    assert issubclass(DSBNormalizedSoftmaxLoss, NormalizedSoftmaxLoss) and issubclass(DSBNormalizedSoftmaxLoss, DSBWeightingMixin)
    loss = DSBNormalizedSoftmaxLoss(4, 8, memory_size=16)
    assert loss.memory.num_classes == 4 and loss.memory.embedding_size == 8


def test_parent_arguments_are_forwarded():
    loss = DSBNormalizedSoftmaxLoss(5, 8, memory_size=20, temperature=0.2, warmup_epochs=2, normalize=None)
    assert (loss.num_classes, loss.temperature) == (5, 0.2)
    assert loss.W.shape == (8, 5)
    assert (loss.memory.memory_size, loss.memory.warmup_epochs, loss.memory.normalize) == (20, 2, None)


def test_non_default_arguments_equal_parent_before_stage_3(gen):
    dsb, parent, _ = make_pair(CASE, gen, 4, 8, 16, 2, parent_kwargs=dict(temperature=0.2))
    for _ in range(4):  # 24 samples: stages 1 and 2
        emb, labels = torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        e1, e2 = leaf(emb), leaf(emb)
        got, want = dsb(e1, labels), parent(e2, labels)
        assert torch.equal(got, want)
        got.backward()
        want.backward()
        assert torch.equal(e1.grad, e2.grad)
    assert dsb.memory.stage == 2
