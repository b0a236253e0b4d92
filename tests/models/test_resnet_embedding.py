"""ResNetEmbedding: shapes, weights from a file or the hub cache, never a download."""
import os

import pytest
import torch
import torchvision

from pml_dsb.models import ResNetEmbedding
from pml_dsb.models.resnet_embedding import hub_cache_candidates


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state_dict (random weights, fc included) saved with torch.save."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_resnet18_shape_raw_and_normalised():
    torch.manual_seed(0)
    model = ResNetEmbedding("resnet18", embedding_size=16).eval()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 16)
    assert model.feature_size == 512 and model.pretrained_path is None
    unit = ResNetEmbedding("resnet18", embedding_size=16, normalize=True).eval()
    unit.load_state_dict(model.state_dict())
    torch.testing.assert_close(unit(x), out / out.norm(dim=1, keepdim=True))


def test_resnet50_shape():
    model = ResNetEmbedding("resnet50", embedding_size=8).eval()
    assert model.feature_size == 2048
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 8)


def test_loads_a_state_dict_file(resnet18_file):
    path, reference = resnet18_file
    model = ResNetEmbedding("resnet18", embedding_size=4, pretrained=path)
    assert model.pretrained_path == str(path)
    own = model.backbone.state_dict()
    assert set(own) == {k for k in reference if not k.startswith("fc.")}
    for key, value in own.items():
        assert torch.equal(value, reference[key]), key
    fresh = ResNetEmbedding("resnet18", embedding_size=4)
    assert not torch.equal(fresh.backbone.conv1.weight, reference["conv1.weight"])


def test_loads_a_wrapped_data_parallel_checkpoint(resnet18_file, tmp_path):
    _, reference = resnet18_file
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, path)
    model = ResNetEmbedding("resnet18", embedding_size=4, pretrained=str(path))
    loaded = model.backbone.layer4[1].bn2.running_var
    assert torch.equal(loaded, reference["layer4.1.bn2.running_var"])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as info:
        ResNetEmbedding("resnet18", 4, pretrained=path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"abc"], ids=["empty", "not-a-torch-file", "three-bytes"])
def test_unreadable_file_is_named_without_suggesting_weights_only_false(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="could not be read as a torch.save state_dict") as info:
        ResNetEmbedding("resnet18", 4, pretrained=path)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)


def test_wrong_architecture_in_file(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(ValueError, match="resnet50"):
        ResNetEmbedding("resnet50", 4, pretrained=path)


def test_standard_hub_file_names():
    assert os.path.basename(hub_cache_candidates("resnet18")[0]) == "resnet18-f37072fd.pth"
    assert [os.path.basename(p) for p in hub_cache_candidates("resnet50")] == [
        "resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth",
    ]


def test_hub_cache(resnet18_file, tmp_path, monkeypatch):
    path, reference = resnet18_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as info:
        ResNetEmbedding("resnet18", 4, pretrained=True)
    assert str(expected) in str(info.value)
    expected.parent.mkdir(parents=True)
    os.symlink(path, expected)
    model = ResNetEmbedding("resnet18", 4, pretrained=True)
    assert model.pretrained_path == str(expected)
    assert torch.equal(model.backbone.conv1.weight, reference["conv1.weight"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        ResNetEmbedding("resnet34", 4)
    with pytest.raises(ValueError, match="embedding_size"):
        ResNetEmbedding("resnet18", 0)
    with pytest.raises(TypeError, match="pretrained"):
        ResNetEmbedding("resnet18", 4, pretrained=1.0)


@pytest.mark.parametrize("name", ["resnet18", "digits_cnn"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_normalize_must_be_a_bool(name, value):
    # bool("false") is True: the output was silently L2-normalised
    from pml_dsb.models import build_model

    with pytest.raises(TypeError, match=f"normalize must be True or False, got {value!r}"):
        build_model(name, 8, normalize=value)


def test_a_state_dict_missing_a_key_is_refused(resnet18_file, tmp_path):
    _, reference = resnet18_file
    partial = {k: v for k, v in reference.items() if k != "layer4.1.bn2.running_var"}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(ValueError, match=r"(?s)not a torchvision resnet18 state_dict.*Missing key.*layer4\.1\.bn2\.running_var"):
        ResNetEmbedding("resnet18", 4, pretrained=path)


@pytest.mark.parametrize("value, error", [(0, TypeError), ("", FileNotFoundError)], ids=["zero", "empty-path"])
def test_falsy_pretrained_values_other_than_false_and_none_are_refused(value, error):
    # only False and None mean "no weights": 0 is no bool, "" no file
    from pml_dsb.models.resnet_embedding import resolve_pretrained

    assert resolve_pretrained("resnet18", False) is None and resolve_pretrained("resnet18", None) is None
    with pytest.raises(error, match="pretrained"):
        resolve_pretrained("resnet18", value)


def test_hub_cache_falls_back_to_the_older_resnet50_file(tmp_path, monkeypatch):
    from pml_dsb.models.resnet_embedding import resolve_pretrained

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    v1 = tmp_path / "checkpoints" / "resnet50-0676ba61.pth"
    v1.write_bytes(b"")  # resolve_pretrained only locates the file
    assert resolve_pretrained("resnet50", True) == str(v1)
    v2 = tmp_path / "checkpoints" / "resnet50-11ad3fa6.pth"
    v2.write_bytes(b"")
    assert resolve_pretrained("resnet50", True) == str(v2)  # the default (V2) first
