"""DSBNormalizedSoftmaxLoss: a NormalizedSoftmaxLoss subclass; parent arguments, exact parent equality with
non-default arguments, checkpoint/resume across the stage 2 -> 3 boundary, and PML's
MetricLossOnly trainer. Generic DSB behaviour is in test_dsb_weighting.py."""
import numpy as np
import pytest
import torch
from dsb_loss_testlib import checkpoint_resume, leaf, make_pair, run_metric_loss_only
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


def test_checkpoint_in_stage_2_resumes_with_identical_losses(gen):
    uninterrupted, resumed, without_memory, stages, loss, loss2 = checkpoint_resume(CASE, gen)
    assert len(resumed) == 50 and stages[0] == 2 and stages[-1] == 3
    for i, (a, b) in enumerate(zip(uninterrupted, resumed)):
        assert torch.equal(a, b), f"iteration {i} after the checkpoint"
    a, b = loss.state_dict(), loss2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # control: resuming without the memory changes the stage-3 losses
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, without_memory))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")  # PML's progress bar
def test_metric_loss_only_trainer(gen):
    loss, stages, values, before = run_metric_loss_only(CASE, gen, iterations=5, batch_size=16)
    assert loss.memory.num_enqueued == 5 * 16
    assert stages == [1, 2, 2, 3, 3]  # M = 32, warmup_epochs = 2
    assert np.all(np.isfinite(values))
    assert any(not torch.equal(b, p) for b, p in zip(before, loss.parameters()))
