"""Embedding a dataset for the analysis: a model's features and the labels, in order."""
import numpy as np
import pytest
import torch

from pml_dsb.analysis.features import embed_dataset, raw_features


def test_a_dataset_without_a_labels_attribute_gives_its_items_labels():
    # a TensorDataset has no .labels: they come from its (input, label) items
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 5, generator=g), torch.randint(0, 4, (37,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Linear(5, 3).train()
    features, labels = embed_dataset(model, data, batch_size=8)
    with torch.no_grad():
        torch.testing.assert_close(features, model(x), rtol=1e-6, atol=1e-7)
    assert labels.dtype == np.int64 and labels.tolist() == y.tolist() and model.training
    raw, raw_labels = raw_features(data, batch_size=10)
    assert torch.equal(raw, x) and raw_labels.tolist() == y.tolist()


def test_a_model_without_parameters_embeds_on_the_cpu():
    # next(model.parameters()) raised a bare StopIteration
    x = torch.randn(5, 2, 3)
    features, labels = embed_dataset(torch.nn.Flatten(), torch.utils.data.TensorDataset(x, torch.arange(5)))
    assert torch.equal(features, x.flatten(1)) and labels.tolist() == list(range(5))


def test_load_dataset_refuses_a_split_seed_for_fixed_splits():
    from pml_dsb.analysis.features import load_dataset

    with pytest.raises(ValueError, match="a split seed applies to digits-lt only; 'cub200' has a fixed split"):
        load_dataset("cub200", root=".", seed=3)
    a, b = load_dataset("digits-lt"), load_dataset("digits-lt", seed=0)  # the default is seed 0
    assert a.source_indices.tolist() == b.source_indices.tolist()
    assert load_dataset("digits-lt", seed=1).source_indices.tolist() != a.source_indices.tolist()
