"""SampleIndicesGetter and IndexedDataset: PML's trainers with an index-addressed
DSB memory, checked against a float64 numpy model of that memory (slot i holds
the latest L2-normalised embedding of sample i) built from what the loss saw."""
import numpy as np
import pytest
import torch
from dsb_loss_testlib import CASES, randomize_parameters
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import trainers

from pml_dsb import SampleIndicesGetter
from pml_dsb.datasets import IndexedDataset

C, D, N, B = 4, 8, 40, 8


def _train(loss, getter, gen, epochs, sampler=None):
    x = torch.randn(N, 6, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU())
    embedder = torch.nn.Linear(12, D)
    for m in (trunk, embedder):
        randomize_parameters(m, gen)
    seen = []  # what each call received: embeddings, labels, announced indices
    loss.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].detach().clone(), args[1].clone(), module._pending_sample_indices))
    )
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.01),
            "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.01),
            "metric_loss_optimizer": torch.optim.SGD(loss.parameters(), lr=0.1),
        },
        batch_size=B,
        loss_funcs={"metric_loss": loss},
        dataset=IndexedDataset(torch.utils.data.TensorDataset(x, y)),
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
        data_and_label_getter=getter,
        sampler=sampler(y) if sampler is not None else None,
    )
    torch.manual_seed(0)  # PML's loader shuffles with the global generator
    trainer.train(num_epochs=epochs)
    return seen, y


@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax"])
def test_pml_trainer_fills_an_index_addressed_memory(case, gen, np_ref):
    dsb_cls, _, kwargs = CASES[case]
    loss = dsb_cls(C, D, memory_size=N, warmup_epochs=1, **kwargs)
    randomize_parameters(loss, gen)
    seen, y = _train(loss, SampleIndicesGetter(loss), gen, epochs=3)

    assert len(seen) == 3 * N // B and bool(loss.memory.index_addressed)
    assert loss.memory.stage == 3 and loss._pending_sample_indices is None
    latest = {}
    for emb, labels, idx in seen:
        assert idx is not None and torch.equal(labels, y[idx])  # the indices are the batch's own
        for row, i in zip(emb.double().numpy(), idx.tolist()):
            latest[i] = row / np.linalg.norm(row)
    assert sorted(latest) == list(range(N))
    want = np.stack([latest[i] for i in range(N)])
    stored, labels = loss.memory.contents()
    np.testing.assert_allclose(stored.double().numpy(), want, rtol=1e-6, atol=1e-7)  # stored as float32
    assert torch.equal(labels, y)
    np.testing.assert_allclose(
        loss.memory.scales().numpy(), np_ref.class_scales(stored.double().numpy(), y.numpy(), C, normalize=False), rtol=1e-10
    )


def test_pml_trainer_with_a_sampler_that_repeats_samples_stores_each_ones_last_copy(gen, np_ref):
    """A sampler drawing with replacement (MPerClassSampler for classes smaller
    than m, WeightedRandomSampler) repeats dataset indices within a batch: the
    memory refused the batch ("indices contain duplicates") and training stopped.
    One slot takes one sample, the batch's last copy, as the benchmark runner does."""
    loss = CASES["norm_softmax"][0](C, D, memory_size=N, warmup_epochs=1)
    randomize_parameters(loss, gen)
    draws = torch.Generator().manual_seed(5)
    seen, y = _train(loss, SampleIndicesGetter(loss), gen, epochs=3, sampler=lambda y: torch.utils.data.WeightedRandomSampler(
        torch.ones(N), num_samples=N, replacement=True, generator=draws))
    assert any(len(set(idx.tolist())) < len(idx) for _, _, idx in seen)  # precondition: repeats happened
    latest = {}
    for emb, labels, idx in seen:
        for row, i in zip(emb.double().numpy(), idx.tolist()):
            latest[i] = row / np.linalg.norm(row)  # later copies overwrite earlier ones
    slots = sorted(latest)
    stored, labels = loss.memory.contents()
    np.testing.assert_allclose(stored.double().numpy(), np.stack([latest[i] for i in slots]), rtol=1e-6, atol=1e-7)
    assert torch.equal(labels, y[slots]) and loss.memory.num_filled == len(slots)
    if loss.memory.stage == 3:
        np.testing.assert_allclose(loss.memory.scales().numpy(),
                                   np_ref.class_scales(stored.double().numpy(), labels.numpy(), C, normalize=False),
                                   rtol=1e-10)


def test_pml_trainer_with_a_custom_getter_and_two_losses(gen):
    """The rest of each batch goes through the user's getter; every loss gets the
    indices (a second loss sharing the memory reads it without enqueuing)."""
    first = CASES["norm_softmax"][0](C, D, memory_size=N, warmup_epochs=1)
    second = CASES["norm_softmax"][0](C, D, memory=first.memory, update_memory=False)
    swapped = []

    def getter(rest):
        swapped.append(len(rest))
        return rest[0], rest[1]

    combined = SampleIndicesGetter(first, second, data_and_label_getter=getter)
    x, y = torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)
    idx = torch.randperm(N, generator=gen)[:B]
    data, labels = combined((x, y, idx))
    assert data is x and labels is y and swapped == [2]
    first(x, y)
    second(x, y)
    assert first.memory.num_enqueued == B and bool(first.memory.index_addressed)
    assert first.memory.label_memory[idx].tolist() == y.tolist()
    assert first._pending_sample_indices is None and second._pending_sample_indices is None


def test_every_loss_of_a_getter_gets_the_indices(gen):
    """Two losses with memories of their own: both become index-addressed,
    each sample in its own slot (the second loss's memory was filled first
    in, first out when only the first loss was told)."""
    first = CASES["norm_softmax"][0](C, D, memory_size=N, warmup_epochs=1)
    second = CASES["norm_softmax"][0](C, D, memory_size=N, warmup_epochs=1)
    x, y = torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)
    idx = torch.randperm(N, generator=gen)[:B]
    data, labels = SampleIndicesGetter(first, second)((x, y, idx))
    first(data, labels)
    second(data, labels)
    for loss in (first, second):
        assert bool(loss.memory.index_addressed)
        assert torch.nonzero(loss.memory.label_memory >= 0).flatten().tolist() == sorted(idx.tolist())
        assert loss.memory.label_memory[idx].tolist() == y.tolist()


def test_bad_uses_raise_clearly_and_leave_the_memory_as_it_was(gen):
    loss = CASES["norm_softmax"][0](C, D, memory_size=N, warmup_epochs=1)
    with pytest.raises(ValueError, match="at least one DSB loss"):
        SampleIndicesGetter()
    with pytest.raises(TypeError, match="got NormalizedSoftmaxLoss"):
        SampleIndicesGetter(pml_losses.NormalizedSoftmaxLoss(C, D))
    getter = SampleIndicesGetter(loss)
    x, y = torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)
    with pytest.raises(TypeError, match="IndexedDataset"):
        getter(x)
    with pytest.raises(TypeError, match=r"must be \(data, labels, indices\); got 2 fields"):
        getter((x, y))  # a dataset not wrapped in IndexedDataset
    with pytest.raises(TypeError, match=r"must be \(data, labels, indices\); got 4 fields"):
        getter((x, y, y, torch.arange(B)))  # an extra field needs a data_and_label_getter
    assert loss._pending_sample_indices is None  # nothing announced by a refused batch
    with pytest.raises(TypeError, match="tuples or lists"):
        IndexedDataset([x[0]])[0]
    assert IndexedDataset([(x[0], 1)])[0][1:] == (1, 0)

    before = {k: v.clone() for k, v in loss.memory.state_dict().items()}
    bad = [
        (torch.arange(B - 1), {}, ValueError, r"indices must have shape \(8,\)"),  # e.g. a subset batch miner
        (torch.arange(B) + N, {}, ValueError, "indices must lie in"),
        (torch.arange(B), {"sample_indices": torch.arange(B)}, ValueError, "give them one way"),
    ]
    for announced, kwargs, error, match in bad:
        loss.expect_sample_indices(announced)
        with pytest.raises(error, match=match):
            loss(x, y, **kwargs)
        assert loss._pending_sample_indices is None  # used by that call only
        after = loss.memory.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    loss(x, y)  # nothing left over: first in, first out
    assert loss.memory.num_enqueued == B and not bool(loss.memory.index_addressed)


def test_indexed_dataset_appends_the_index_to_tuple_and_list_items():
    x = torch.arange(6.0).reshape(3, 2)
    as_lists = [[x[i], i % 2] for i in range(3)]  # a dataset returning lists, as some custom ones do
    ds = IndexedDataset(as_lists)
    assert len(ds) == 3
    for i in range(3):
        image, label, index = ds[i]
        assert torch.equal(image, x[i]) and label == i % 2 and index == i
    assert IndexedDataset(torch.utils.data.TensorDataset(x, torch.tensor([5, 6, 7])))[2][1:] == (torch.tensor(7), 2)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert [t.tolist() for t in batch[1:]] == [[0, 1, 0], [0, 1, 2]]
