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


@pytest.mark.parametrize("training", [False, True])
def test_embed_dataset_runs_in_eval_mode_and_puts_the_mode_back(training):
    """Dropout is off while embedding (features equal the eval-mode forward pass),
    and the model leaves in the mode it came in, eval included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Dropout(0.5))
    x = torch.randn(9, 5)
    with torch.no_grad():
        want = model.eval()(x)
    model.train(training)
    features, _ = embed_dataset(model, torch.utils.data.TensorDataset(x, torch.zeros(9, dtype=torch.long)),
                                batch_size=4)
    torch.testing.assert_close(features, want, rtol=1e-6, atol=1e-6)  # batched by 4: rounding only
    assert model.training is training and all(m.training is training for m in model.modules())


def test_raw_features_of_a_dataset_with_a_transform_are_the_transformed_items():
    """``dataset.data`` is the untransformed input: with a transform set, the
    features are what the dataset's items hold."""

    class Doubled(torch.utils.data.Dataset):
        def __init__(self):
            self.data = torch.arange(12, dtype=torch.float32).reshape(4, 3)
            self.labels = [0, 1, 1, 0]
            self.transform = lambda x: 2 * x + 1

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.transform(self.data[i]), self.labels[i]

    data = Doubled()
    features, labels = raw_features(data, batch_size=3)
    assert torch.equal(features, torch.stack([data[i][0] for i in range(4)]))
    assert labels.tolist() == [0, 1, 1, 0]
    data.transform = None  # no transform: the stored inputs as they are
    assert torch.equal(raw_features(data)[0], data.data)
