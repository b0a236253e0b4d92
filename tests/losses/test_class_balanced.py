"""class_balanced_reducer: PML's ClassWeightedReducer semantics with Cui et al.'s
weights, i.e. CB-SoftTriple / CB-NormSoftmax = mean_i(w[y_i] * element_loss_i)."""
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers

from pml_dsb import class_balanced_reducer


def _cb(counts, beta):
    w = np.array([(1 - beta) / (1 - beta ** n) for n in counts])
    return w * len(w) / w.sum()


@pytest.mark.parametrize(
    "parent,kwargs",
    [(pml_losses.SoftTripleLoss, {"centers_per_class": 2}), (pml_losses.NormalizedSoftmaxLoss, {})],
    ids=["CB-ST", "CB-NSM"],
)
def test_cb_loss_is_class_weighted_mean_of_element_losses(gen, parent, kwargs):
    counts, beta = [400, 60, 9, 2], 0.99
    C, d = len(counts), 6
    cb = parent(C, d, reducer=class_balanced_reducer(counts, beta), **kwargs)
    element = parent(C, d, reducer=reducers.DoNothingReducer(), **kwargs)
    element.load_state_dict(cb.state_dict())
    emb = torch.randn(10, d, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 2, 0])
    w = torch.tensor(_cb(counts, beta), dtype=torch.float32)
    want = (w[labels] * element(emb, labels)["loss"]["losses"]).mean()
    torch.testing.assert_close(cb(emb, labels), want, rtol=1e-6, atol=1e-7)
    # and it is PML's ClassWeightedReducer with those weights
    pml = parent(C, d, reducer=reducers.ClassWeightedReducer(w), **kwargs)
    pml.load_state_dict(cb.state_dict())
    torch.testing.assert_close(cb(emb, labels), pml(emb, labels), rtol=1e-6, atol=1e-7)


def test_cb_reducer_weights():
    r = class_balanced_reducer([100, 10, 1], beta=0.9)
    assert isinstance(r, reducers.ClassWeightedReducer)
    np.testing.assert_allclose(r.weights.double().numpy(), _cb([100, 10, 1], 0.9), rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        class_balanced_reducer([3, 4], beta=1.0)
    with pytest.raises(ValueError, match="counts"):
        class_balanced_reducer([3, 0])


def test_default_beta_is_the_papers_0_9999():
    counts = [5000, 300, 20, 2]
    np.testing.assert_allclose(class_balanced_reducer(counts).weights.double().numpy(), _cb(counts, 0.9999),
                               rtol=1e-6)
    assert not np.allclose(_cb(counts, 0.9999), _cb(counts, 0.999), rtol=1e-3)  # the default matters here
