"""The memory builds its class statistics at the first ``scales()`` call, not
before: enqueues in the unweighted stages only write the ring buffer. The
deferred build must give the scales of a memory that kept its statistics all
along, and both must equal a float64 from-scratch computation."""
import copy
import io

import numpy as np
import pytest
import torch

from pml_dsb import SemanticScaleMemory

C, D, M = 6, 8, 40
STATISTICS = ("gram", "moment_sum", "moment_outer", "moment_index", "class_slots", "slot_position")


def _reference(memory, np_ref):
    z, y = memory.contents()
    return np_ref.class_scales(z.double().numpy(), y.numpy(), memory.num_classes, normalize=False)


def _batches(gen, indexed, batch=7):
    """Labels skewed towards class 0 (so that it outgrows a small Gram form);
    index-addressed: sample i always has label i % C."""
    while True:
        emb = torch.randn(batch, D, generator=gen)
        if indexed:
            idx = torch.randperm(M, generator=gen)[:batch]
            yield emb, idx % C, idx
        else:
            labels = torch.randint(0, C, (batch,), generator=gen)
            labels[: batch // 2] = 0
            yield emb, labels, None


def _run(memory, batches, steps, refresh=False):
    """``steps`` enqueues, each followed by a refresh if ``refresh``."""
    for _ in range(steps):
        memory.enqueue(*next(batches))
        if refresh:
            memory.scales()


def _memory(gram_size, warmup_epochs=3):
    memory = SemanticScaleMemory(C, D, M, warmup_epochs=warmup_epochs, gram_size=gram_size)
    memory.low_rank_min_size = 2  # exercise the low-rank caches at this tiny shape
    memory.low_rank_max_share = None
    return memory


def test_enqueues_before_the_first_refresh_write_only_the_ring_buffer(gen):
    memory = _memory(gram_size=3)
    empty = {k: v.clone() for k, v in memory.state_dict().items() if k in STATISTICS}
    _run(memory, _batches(gen, indexed=False), 12)  # wraps around: stage 2
    assert memory.stage == 2 and not bool(memory.statistics_built)
    state = memory.state_dict()
    for k in STATISTICS:
        assert torch.equal(state[k], empty[k]), k
    # the ring buffer and the counts are kept all the same
    _, labels = memory.contents()
    assert torch.equal(memory.class_counts, torch.bincount(labels, minlength=C))
    assert memory.num_filled == M and memory.num_enqueued == 12 * 7


@pytest.mark.parametrize("indexed", [False, True], ids=["fifo", "index"])
@pytest.mark.parametrize("gram_size", [3, None], ids=["both-forms", "gram-only"])
def test_deferred_build_matches_statistics_kept_all_along(gen, np_ref, indexed, gram_size):
    eager, lazy = _memory(gram_size), _memory(gram_size)
    batches = _batches(gen, indexed)
    for _ in range(15):
        batch = next(batches)
        eager.enqueue(*batch)
        eager.scales()
        lazy.enqueue(*batch)
    assert not bool(lazy.statistics_built)
    if gram_size == 3:
        assert bool((eager.moment_index >= 0).any())  # both forms really occur
    reference = _reference(lazy, np_ref)
    np.testing.assert_allclose(lazy.scales().numpy(), reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(eager.scales().numpy(), reference, rtol=1e-12, atol=1e-12)
    assert bool(lazy.statistics_built)
    # from then on both are kept up to date at every enqueue
    for _ in range(25):
        batch = next(batches)
        eager.enqueue(*batch)
        lazy.enqueue(*batch)
        np.testing.assert_allclose(lazy.scales().numpy(), eager.scales().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lazy.scales().numpy(), _reference(lazy, np_ref), rtol=1e-12, atol=1e-12)
    if indexed:  # the build leaves positions 0..m-1, so the low-rank caches follow
        assert bool((lazy.cache_valid & (lazy.cache_updates > 0)).any())


def test_deferred_build_keeps_classes_of_up_to_gram_size_samples_in_the_gram_form(gen, np_ref):
    """gram_size: classes of up to that many samples are kept in the Gram form,
    larger ones as moments; the first scales() builds each class in the form
    of its count then (here gram_size = 3: counts 4 and 5 take moments)."""
    memory = _memory(gram_size=3)
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4])
    memory.enqueue(torch.randn(len(labels), D, generator=gen), labels)
    scales = memory.scales()
    assert (memory.moment_index >= 0).tolist() == [False, False, False, True, True, False]
    np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("indexed", [False, True], ids=["fifo", "index"])
def test_small_chunks_and_coarse_buckets_give_the_same_scales(gen, np_ref, monkeypatch, indexed):
    """Batched updates gather a bounded number of values at once, and classes of
    similar size share one padded batch: one class per chunk (the build, the
    moment updates and the Gram rows of new samples) and the coarse batches
    chosen on GPUs (max_buckets) must change nothing but rounding; nor must a
    batch's moments summed per sample (CPU, small d) or class by class."""
    import pml_dsb.memory._class_statistics as module

    stream = _batches(gen, indexed)
    batches = [next(stream) for _ in range(25)]
    results = {}
    for variant in ("default", "one-class-chunks", "coarse-buckets", "one-bucket", "grouped-moments"):
        memory = _memory(gram_size=6)  # both forms, FIFO and index-addressed
        if variant == "coarse-buckets":
            memory.max_buckets = 3
        elif variant == "one-bucket":
            memory.max_buckets = 1  # not reachable: the coarsest factor, 8
        with monkeypatch.context() as patch:
            if variant == "one-class-chunks":
                patch.setattr(module, "_CHUNK_VALUES", 1)
                patch.setattr(module, "_CACHED_VALUES", 1)  # the Gram rows of new samples too
            elif variant == "grouped-moments":  # a batch's moments class by class, not per sample
                patch.setattr(module, "_PER_SAMPLE_VALUES", 0)
            for i, batch in enumerate(batches):
                memory.enqueue(*batch)
                if i >= 8:  # built at the 9th batch, then kept up to date
                    memory.scales()
        results[variant] = memory
    default = results["default"]
    assert bool((default.moment_index >= 0).any()) and bool((default.moment_index < 0).any())
    for k, v in default.state_dict().items():  # chunks: the same sums, bit for bit
        assert torch.equal(v, results["one-class-chunks"].state_dict()[k]), k
    reference = _reference(default, np_ref)
    for memory in results.values():
        np.testing.assert_allclose(memory.scales().numpy(), reference, rtol=1e-12, atol=1e-12)


def test_checkpoint_before_the_build_resumes_identically(gen):
    memory = _memory(gram_size=3)
    batches = _batches(gen, indexed=False)
    for _ in range(8):
        memory.enqueue(*next(batches))
    buf = io.BytesIO()
    torch.save(memory.state_dict(), buf)
    buf.seek(0)
    fresh = _memory(gram_size=3)
    fresh.load_state_dict(torch.load(buf))
    assert not bool(fresh.statistics_built)
    for _ in range(20):
        batch = next(batches)
        memory.enqueue(*batch)
        fresh.enqueue(*batch)
        if memory.stage == 3:
            assert torch.equal(memory.scales(), fresh.scales())
    assert memory.stage == 3
    for k, v in memory.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_checkpoint_saved_before_deferral_existed_loads_as_built(gen, np_ref):
    """Older checkpoints kept their statistics at every enqueue: they load as built."""
    memory, batches = _memory(gram_size=3), _batches(gen, indexed=False)
    _run(memory, batches, 8, refresh=True)
    old = {k: v for k, v in memory.state_dict().items() if k != "statistics_built"}
    fresh = _memory(gram_size=3)
    fresh.load_state_dict(old)
    assert bool(fresh.statistics_built)
    for _ in range(10):
        batch = next(batches)
        memory.enqueue(*batch)
        fresh.enqueue(*batch)
        assert torch.equal(memory.scales(), fresh.scales())
    np.testing.assert_allclose(fresh.scales().numpy(), _reference(fresh, np_ref), rtol=1e-12, atol=1e-12)


def test_reset_defers_again(gen, np_ref):
    memory, batches = _memory(gram_size=3), _batches(gen, indexed=False)
    _run(memory, batches, 4, refresh=True)
    memory.reset()
    assert not bool(memory.statistics_built)
    _run(memory, batches, 4)
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=1e-12, atol=1e-12)


def test_partial_state_dict_leaves_the_memory_alone(gen):
    """Loading a parent loss's state_dict with strict=False (no memory keys) must
    not fill in compatibility defaults: the memory stays exactly as it was."""
    from pml_dsb import DSBSoftTripleLoss
    from pytorch_metric_learning.losses import SoftTripleLoss

    dsb = DSBSoftTripleLoss(num_classes=C, embedding_size=D, memory=_memory(gram_size=3))
    batches = _batches(gen, indexed=False)
    for _ in range(3):
        dsb.memory.enqueue(*next(batches))
    before = {k: v.clone() for k, v in dsb.memory.state_dict().items()}
    result = dsb.load_state_dict(SoftTripleLoss(num_classes=C, embedding_size=D).state_dict(), strict=False)
    assert "memory.statistics_built" in result.missing_keys
    for k, v in dsb.memory.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "sizes,batches",
    [
        (list(range(55, 119)), [(55, 57), (58, 86), (87, 118)]),  # factor 1.5 needs 3 batches: kept
        (list(range(5, 257)), [(5, 7), (8, 63), (64, 256)]),  # needs factor 8 for 3 batches
    ],
    ids=["balanced", "long-tailed"],
)
def test_coarse_batches_take_the_finest_factor_within_the_limit(sizes, batches):
    memory = _memory(gram_size=3)
    memory.max_buckets = 3
    sizes = torch.tensor(sizes)[torch.randperm(len(sizes), generator=torch.Generator().manual_seed(0))]
    buckets = memory._buckets(sizes)
    assert sorted(torch.cat(buckets).tolist()) == list(range(len(sizes)))  # every class once
    assert [(int(sizes[b].min()), int(sizes[b].max())) for b in buckets] == batches


def test_cpu_batches_keep_the_factor_1_5_however_many_it_takes():
    """max_buckets=None (the default) on CPU: sizes within a factor 1.5 share a
    batch, however many batches that makes (no coarser factor)."""
    memory = _memory(gram_size=3)
    assert memory.max_buckets is None
    sizes = torch.arange(5, 257)[torch.randperm(252, generator=torch.Generator().manual_seed(0))]
    buckets = memory._buckets(sizes)
    assert sorted(torch.cat(buckets).tolist()) == list(range(len(sizes)))  # every class once
    assert len(buckets) > 3 and all(int(sizes[b].max()) < 1.5 * int(sizes[b].min()) for b in buckets)


@pytest.mark.parametrize("indexed", [False, True], ids=["fifo", "index"])
def test_inference_mode_calls_leave_ordinary_buffers(gen, np_ref, indexed):
    """scales()/weights() (e.g. for logging) or enqueue under torch.inference_mode
    create buffers (the first build, grown pools, low-rank inverses): they must
    be ordinary tensors, or the next enqueue outside inference mode fails
    half-way and leaves the memory inconsistent."""
    memory, batches = _memory(gram_size=2), _batches(gen, indexed)
    _run(memory, batches, 6)
    with torch.inference_mode():
        memory.weights()  # the deferred build
        memory.enqueue(*next(batches))  # classes may grow past gram_size here
        memory.scales()
    assert [name for name, b in memory.named_buffers() if b.is_inference()] == []
    _run(memory, batches, 6, refresh=True)  # in-place updates outside inference mode
    assert bool((memory.moment_index >= 0).any())
    if indexed:
        assert bool((memory.cache_valid & (memory.cache_updates > 0)).any())
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        memory.reset()
    assert [name for name, b in memory.named_buffers() if b.is_inference()] == []


def test_whole_module_pickle_from_an_older_release_loads(gen, np_ref):
    """torch.save(memory) from before the low-rank caches and the deferred build:
    the module loads with those buffers at their defaults and keeps working."""
    memory, batches = _memory(gram_size=3, warmup_epochs=1), _batches(gen, indexed=False)
    _run(memory, batches, 8, refresh=True)
    late = list(SemanticScaleMemory._CACHE_STATE) + ["statistics_built"]
    for name in late:  # what an older release's module lacked
        del memory._buffers[name]
    del memory.exact_refresh_every
    object.__setattr__(memory, "_buffers", dict(memory._buffers))  # it kept its buffers in a dict
    buf = io.BytesIO()
    torch.save(memory, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert set(late) <= set(dict(loaded.named_buffers())) and bool(loaded.statistics_built)
    assert loaded.exact_refresh_every == 64
    # and now in the mapping that keeps them out of PML's HookContainer records
    assert not isinstance(loaded._buffers, dict) and isinstance(copy.deepcopy(loaded)._buffers, type(loaded._buffers))
    _run(loaded, batches, 6, refresh=True)
    np.testing.assert_allclose(loaded.scales().numpy(), _reference(loaded, np_ref), rtol=1e-12, atol=1e-12)
    assert set(loaded.state_dict()) == set(_memory(gram_size=3).state_dict())


@pytest.mark.parametrize("indexed", [False, True], ids=["fifo", "index"])
def test_whole_module_pickle_from_before_the_addressing_was_recorded_takes_either(gen, np_ref, indexed):
    """An older release's pickle records no addressing (no index_addressed
    buffer, no _addressing_unknown attribute): the next batch decides it, with
    dataset indices or without, and the memory keeps that one from then on."""
    memory, stream = _memory(gram_size=3, warmup_epochs=1), _batches(gen, indexed=True)
    for _ in range(6):
        memory.enqueue(*next(stream))
        memory.scales()
    for name in list(SemanticScaleMemory._CACHE_STATE) + ["statistics_built"]:
        del memory._buffers[name]
    del memory.exact_refresh_every, memory._addressing_unknown
    object.__setattr__(memory, "_buffers", dict(memory._buffers))
    buf = io.BytesIO()
    torch.save(memory, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "index_addressed" not in loaded.state_dict()  # still unknown: saved as the older release saved it
    for _ in range(4):
        emb, labels, idx = next(stream)
        loaded.enqueue(emb, labels, idx if indexed else None)
    assert bool(loaded.index_addressed) == indexed and "index_addressed" in loaded.state_dict()
    np.testing.assert_allclose(loaded.scales().numpy(), _reference(loaded, np_ref), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dataset indices" if indexed else "first in, first out"):
        loaded.enqueue(emb, labels, None if indexed else idx)


@pytest.mark.parametrize("indexed", [False, True], ids=["fifo", "index"])
def test_a_class_whose_first_batch_outgrows_the_gram_form(gen, np_ref, indexed):
    """After the build, a class with no stored sample that receives more than
    ``gram_size`` samples in one enqueue is promoted with nothing to add to its
    moments (this once divided by its zero width, half-way through the enqueue)."""
    memory = _memory(gram_size=2, warmup_epochs=1)
    labels = torch.tensor([0, 0, 1, 1])
    memory.enqueue(torch.randn(4, D, generator=gen), labels, torch.arange(4) if indexed else None)
    memory.scales()
    memory.enqueue(torch.randn(3, D, generator=gen), torch.tensor([2, 2, 2]), torch.arange(4, 7) if indexed else None)
    assert int(memory.moment_index[2]) >= 0 and int(memory.class_counts[2]) == 3
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=1e-10, atol=1e-12)
