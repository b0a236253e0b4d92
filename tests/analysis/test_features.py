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


def test_load_dataset_uses_the_deterministic_test_transform(tmp_path):
    """Raw features of an image dataset must not depend on augmentation: with the
    train transform (random resized crop, flip) each read of an image differed."""
    from PIL import Image
    from torchvision import transforms as T

    from pml_dsb.analysis.features import load_dataset

    folder = tmp_path / "CUB_200_2011"
    (folder / "images" / "001.A").mkdir(parents=True)
    (folder / "images" / "101.B").mkdir()
    rng = np.random.default_rng(0)
    rels = ["001.A/a.jpg", "001.A/b.jpg", "101.B/c.jpg"]
    for rel in rels:  # textured images: a random crop or flip changes the pixels
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / "images" / rel, "JPEG")
    (folder / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel in enumerate(rels, 1)))
    (folder / "image_class_labels.txt").write_text("1 1\n2 1\n3 101\n")
    ds = load_dataset("cub200", root=tmp_path)
    assert len(ds) == 2
    # reference: the documented test transform, short side to round(224 * 256 / 224) = 256, centre 224
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    torch.manual_seed(0)
    for i, rel in enumerate(rels[:2]):
        want = reference(Image.open(folder / "images" / rel).convert("RGB"))
        first, second = ds[i][0], ds[i][0]
        assert torch.equal(first, second)
        torch.testing.assert_close(first, want)
