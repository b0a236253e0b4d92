"""DigitsEmbeddingNet: shapes, optional L2 normalisation, input checks, training step."""
import pytest
import torch

from pml_dsb.datasets import DigitsLT
from pml_dsb.models import DigitsEmbeddingNet


@pytest.mark.parametrize("embedding_size", [8, 64])
def test_output_shape_and_raw_by_default(embedding_size):
    torch.manual_seed(0)
    net = DigitsEmbeddingNet(embedding_size=embedding_size)
    out = net(torch.rand(5, 1, 8, 8))
    assert out.shape == (5, embedding_size) and out.dtype == torch.float32
    assert not torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-3)


def test_normalize_gives_unit_rows_in_the_same_direction():
    torch.manual_seed(0)
    raw = DigitsEmbeddingNet(embedding_size=16).eval()
    unit = DigitsEmbeddingNet(embedding_size=16, normalize=True).eval()
    unit.load_state_dict(raw.state_dict())
    x = torch.rand(4, 1, 8, 8)
    a, b = raw(x), unit(x)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(b, a / a.norm(dim=1, keepdim=True))


def test_runs_on_a_digits_lt_batch_and_trains():
    torch.manual_seed(0)
    ds = DigitsLT(imbalance_factor=10, split="train")
    x, y = ds.data[:32], torch.from_numpy(ds.labels[:32])
    net = DigitsEmbeddingNet(embedding_size=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 3, 8, 8), (2, 1, 16, 16), (2, 64)])
def test_wrong_input_shape(shape):
    with pytest.raises(ValueError, match="1 x 8 x 8"):
        DigitsEmbeddingNet(8)(torch.zeros(shape))


@pytest.mark.parametrize("kwargs", [{"embedding_size": 0}, {"embedding_size": 2.0}, {"width": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DigitsEmbeddingNet(**kwargs)


def test_non_floating_input_is_named():
    net = DigitsEmbeddingNet(8)
    with pytest.raises(TypeError, match="floating tensor .* got dtype torch.int64"):  # torch: "expected scalar type Long"
        net(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="got ndarray"):
        net(torch.zeros(2, 1, 8, 8).numpy())


@pytest.mark.parametrize("width, embedding_size", [(32, 64), (4, 3)])
def test_layers_and_parameter_count_are_the_documented_ones(width, embedding_size):
    """conv(1->w) BN ReLU conv(w->2w) BN ReLU maxpool2 conv(2w->2w) BN ReLU flatten
    linear(2w*16 -> E): bias-free 3x3 convolutions, a biased linear head."""
    net = DigitsEmbeddingNet(embedding_size=embedding_size, width=width)
    w = width
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                     "Conv2d", "BatchNorm2d", "ReLU", "Flatten"]
    convs = 9 * (1 * w + w * 2 * w + 2 * w * 2 * w)
    batch_norms = 2 * (w + 2 * w + 2 * w)
    head = 2 * w * 16 * embedding_size + embedding_size
    assert sum(p.numel() for p in net.parameters()) == convs + batch_norms + head
    if (width, embedding_size) == (32, 64):
        assert convs + batch_norms + head == 121504  # "about 120k parameters at the defaults"


def test_pooling_takes_the_maximum_of_each_2x2_window():
    net = DigitsEmbeddingNet(embedding_size=4).eval()
    pool = net.features[6]
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert pool(x).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
