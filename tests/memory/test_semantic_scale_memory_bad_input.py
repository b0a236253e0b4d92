"""Issue 2 part 6: every bad input raises a ValueError/TypeError naming the argument
and the value, before anything changes (state_dict identical, tensor by tensor)."""
import math
import re

import numpy as np
import pytest
import torch

from pml_dsb import SemanticScaleMemory
from pml_dsb.functional import unnormalized_norm_limit

C, D, M = 5, 4, 12
NAN, INF = float("nan"), float("inf")


def _emb(b, d=D):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(b * 31 + d))


# (embeddings, labels, indices, exception, words that the message must contain)
BAD_BATCHES = {
    "label-too-large": (_emb(3), torch.tensor([0, 7, 1]), None, ValueError, ["labels", "7"]),
    "label-equal-C": (_emb(3), torch.tensor([0, C, 1]), None, ValueError, ["labels", str(C)]),
    "label-negative": (_emb(3), torch.tensor([0, -3, 1]), None, ValueError, ["labels", "-3"]),
    "label-float": (_emb(3), torch.tensor([0.0, 1.0, 2.0]), None, TypeError, ["labels", "float32"]),
    "label-bool": (_emb(3), torch.tensor([True, False, True]), None, TypeError, ["labels", "bool"]),
    "label-list": (_emb(3), [0, 1, 2], None, TypeError, ["labels", "list"]),
    "label-too-short": (_emb(3), torch.tensor([0, 1]), None, ValueError, ["labels", "(2,)"]),
    "label-too-long": (_emb(3), torch.tensor([0, 1, 2, 3]), None, ValueError, ["labels", "(4,)"]),
    "label-2d": (_emb(3), torch.tensor([[0], [1], [2]]), None, ValueError, ["labels", "(3, 1)"]),
    "embedding-size": (_emb(3, D + 3), torch.tensor([0, 1, 2]), None, ValueError, ["embedding", str(D + 3)]),
    "embedding-1d": (torch.ones(D), torch.tensor([0]), None, ValueError, ["embedding", f"({D},)"]),
    "embedding-int": (torch.ones(3, D, dtype=torch.long), torch.tensor([0, 1, 2]), None, TypeError, ["embeddings", "int64"]),
    # rows counted, not values
    "embedding-nan": (torch.tensor([[1.0, 0, 0, 0], [NAN, NAN, 0, 0]]), torch.tensor([0, 1]), None, ValueError,
                      ["embeddings", "NaN or Inf in 1 of 2 rows"]),
    "embedding-inf": (torch.tensor([[1.0, 0, 0, 0], [0, -INF, 0, 0]]), torch.tensor([0, 1]), None, ValueError, ["embeddings", "Inf"]),
    "empty-batch": (torch.zeros(0, D), torch.zeros(0, dtype=torch.long), None, ValueError, ["embeddings", "empty"]),
    "batch-larger-than-memory": (_emb(M + 1), torch.zeros(M + 1, dtype=torch.long), None, ValueError, [str(M + 1), "memory_size"]),
    "indices-duplicate": (_emb(4), torch.tensor([0, 1, 2, 3]), torch.tensor([2, 9, 5, 9]), ValueError,
                          ["indices", "duplicates [9];"]),
    "indices-too-large": (_emb(3), torch.tensor([0, 1, 2]), torch.tensor([0, M, 1]), ValueError, ["indices", str(M)]),
    "indices-negative": (_emb(3), torch.tensor([0, 1, 2]), torch.tensor([0, -4, 1]), ValueError, ["indices", "-4"]),
    "indices-float": (_emb(3), torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0]), TypeError, ["indices", "float32"]),
    "indices-length": (_emb(3), torch.tensor([0, 1, 2]), torch.tensor([0, 1]), ValueError, ["indices", "(2,)"]),
    # valid indices, but the memory has been filled first in, first out
    "indices-to-fifo-memory": (_emb(3), torch.tensor([0, 1, 2]), torch.tensor([0, 5, 1]), ValueError,
                               ["first in, first out", "reset()"]),
}


def _used_memory(built=True):
    """A memory mid-way through stage 2 with wrap-around; ``built``: its statistics
    built by a scales() call (stale classes, cached scales), else still deferred."""
    g = torch.Generator().manual_seed(5)
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=3)
    for _ in range(4):
        mem.enqueue(torch.randn(4, D, generator=g), torch.randint(0, C, (4,), generator=g))
    if built:
        mem.scales()
    mem.enqueue(torch.randn(3, D, generator=g), torch.tensor([0, 1, 1]))
    return mem


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape and torch.equal(before[k], after[k]), f"{k} changed"


@pytest.mark.parametrize("built", [True, False], ids=["built", "deferred"])
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_is_rejected_before_anything_changes(case, built):
    emb, labels, indices, exc, words = BAD_BATCHES[case]
    mem = _used_memory(built)
    assert bool(mem.statistics_built) == built
    before = _snapshot(mem)
    with pytest.raises(exc) as info:
        mem.enqueue(emb, labels, indices=indices)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    assert_state_unchanged(before, mem)
    # and the memory still works
    mem.enqueue(_emb(2), torch.tensor([2, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_a_nan_or_inf_anywhere_is_rejected(dtype):
    # every position of a batch wider than a vector register, in every dtype
    # the losses may pass: the check must see each lane
    mem = SemanticScaleMemory(C, 37, M)
    emb, labels = torch.randn(3, 37).to(dtype), torch.tensor([0, 1, 2])
    before = _snapshot(mem)
    for position in range(emb.numel()):
        for value in (NAN, INF, -INF):
            bad = emb.clone()
            bad.view(-1)[position] = value
            with pytest.raises(ValueError, match="NaN or Inf in 1 of 3 rows"):
                mem.enqueue(bad, labels)
    assert_state_unchanged(before, mem)
    mem.enqueue(emb, labels)  # finite values pass, the largest of the dtype included
    mem.enqueue(torch.full((3, 37), torch.finfo(dtype).max, dtype=dtype), labels)


@pytest.mark.parametrize("built", [True, False], ids=["built", "deferred"])
def test_norms_beyond_float64_accuracy_are_rejected_when_stored_as_given(built, np_ref):
    """Without L2 normalisation, rows of norm past the memory's limit would
    let float64 rounding swallow the identity term of I + (d/m)·Zc·Zcᵀ (scales
    drifting, then a failed factorisation); a float64 value past float32's
    range would be stored as inf. Both raise with the memory unchanged; rows
    at the limit give the float64 reference's scales."""
    g = torch.Generator().manual_seed(5)
    limit = unnormalized_norm_limit(D, singular_values=False)
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=1, l2_normalize=False)
    mem.enqueue(torch.randn(M, D, generator=g), torch.arange(M) % C)
    if built:
        mem.scales()
    before = _snapshot(mem)
    emb = torch.randn(3, D, dtype=torch.float64, generator=g)
    for value, shown in [(-1e39, "1e[+]39"), (limit * 1.001, re.escape(f"{limit * 1.001:.4g}"))]:
        bad = emb.clone()
        bad[1] = 0.0
        bad[1, 2] = value
        with pytest.raises(ValueError, match=f"norm {shown}; .* up to {re.escape(f'{limit:.4g}')} at embedding_size={D}"):
            mem.enqueue(bad, torch.tensor([0, 1, 2]))
        assert_state_unchanged(before, mem)
    # a batch only read (a validation loss, a reader) is never stored: norms pass, float32's range does not
    big = emb.clone()
    big[1, 2] = limit * 10
    mem.validate_batch(big, torch.tensor([0, 1, 2]), enqueue=False)
    big[1, 2] = -1e39
    with pytest.raises(ValueError, match="beyond float32's range"):
        mem.validate_batch(big, torch.tensor([0, 1, 2]), enqueue=False)
    wide = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1) * limit
    labels = torch.arange(M) % C
    mem.enqueue(wide, labels)  # the limit passes
    stored, stored_labels = mem.contents()
    want = [np_ref.semantic_scale(stored[stored_labels == c].double().numpy(), normalize=False, form="svd") for c in range(C)]
    # the limit's promise: each of the <= D directions off by at most 1e-6 nats
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=0, atol=D * 1e-6 / math.log(2))


def test_rejected_batch_does_not_disturb_later_scales(np_ref):
    mem, twin = _used_memory(), _used_memory()
    for emb, labels, indices, exc, _ in BAD_BATCHES.values():
        with pytest.raises(exc):
            mem.enqueue(emb, labels, indices=indices)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        emb, labels = torch.randn(4, D, generator=g), torch.randint(0, C, (4,), generator=g)
        mem.enqueue(emb, labels)
        twin.enqueue(emb, labels)
    assert torch.equal(mem.scales(), twin.scales())
    assert mem.num_enqueued == twin.num_enqueued


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(num_classes=C, embedding_size=D, memory_size=0), ValueError, ["memory_size", "0"]),
        (dict(num_classes=C, embedding_size=D, memory_size=-5), ValueError, ["memory_size", "-5"]),
        (dict(num_classes=C, embedding_size=D, memory_size=2.5), (ValueError, TypeError), ["memory_size", "2.5"]),
        (dict(num_classes=1, embedding_size=D, memory_size=M), ValueError, ["num_classes", "1"]),
        (dict(num_classes=0, embedding_size=D, memory_size=M), ValueError, ["num_classes", "0"]),
        (dict(num_classes=C, embedding_size=0, memory_size=M), ValueError, ["embedding_size", "0"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, warmup_epochs=-1), ValueError, ["warmup_epochs", "-1"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, normalize="max"), ValueError, ["normalize", "max"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, scale_dtype=torch.float16), ValueError, ["scale_dtype", "float16"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, gram_size=1), ValueError, ["gram_size", "1"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, distributed="yes"), ValueError, ["distributed", "yes"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, eps=-1.0), ValueError, ["eps", "-1.0"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, eps=NAN), ValueError, ["eps", "nan"]),
        (dict(num_classes=C, embedding_size=D, memory_size=M, eps=True), ValueError, ["eps", "True"]),
        # "no" read as True
        (dict(num_classes=C, embedding_size=D, memory_size=M, l2_normalize="no"), TypeError, ["l2_normalize", "'no'"]),
    ],
    ids=["M=0", "M<0", "M-float", "C=1", "C=0", "d=0", "n<0", "normalize", "scale_dtype", "gram_size", "distributed",
         "eps<0", "eps-nan", "eps-bool", "l2_normalize-str"],
)
def test_bad_constructor_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        SemanticScaleMemory(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_numpy_integers_are_accepted_as_sizes():
    # e.g. labels.max() + 1 computed in numpy; PML's parents accept them too
    from pytorch_metric_learning.losses import TripletMarginLoss

    from pml_dsb import DSBCrossBatchMemory, DSBNormalizedSoftmaxLoss, with_dsb_weighting

    mem = SemanticScaleMemory(np.int64(C), np.int32(D), np.int64(M), warmup_epochs=np.int64(2), gram_size=np.int64(3))
    assert (mem.num_classes, mem.embedding_size, mem.memory_size, mem.warmup_epochs, mem.gram_size) == (C, D, M, 2, 3)
    assert all(type(v) is int for v in (mem.num_classes, mem.embedding_size, mem.memory_size, mem.warmup_epochs))
    loss = DSBNormalizedSoftmaxLoss(np.int64(C), np.int64(D), memory_size=np.int64(M))
    assert loss.memory.memory_size == M
    wrapper = DSBCrossBatchMemory(with_dsb_weighting(TripletMarginLoss)(C, D, memory_size=M),
                                  embedding_size=np.int64(D), memory_size=np.int64(8))
    assert (wrapper.embedding_size, wrapper.memory_size) == (D, 8)
    with pytest.raises(ValueError, match=re.escape(f"num_classes must be an int >= 2, got {np.bool_(True)!r}")):
        SemanticScaleMemory(np.bool_(True), D, M)


def test_a_batch_without_indices_is_refused_by_an_index_addressed_memory():
    g = torch.Generator().manual_seed(7)
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=1)
    mem.enqueue(torch.randn(M, D, generator=g), torch.arange(M) % C, torch.arange(M))
    mem.scales()
    before = _snapshot(mem)
    with pytest.raises(ValueError, match="filled with dataset indices; this batch has none"):
        mem.enqueue(_emb(3), torch.tensor([0, 1, 2]))
    assert_state_unchanged(before, mem)
    # a batch that is only read (a loss that does not enqueue) is not refused, whatever its size
    mem.validate_batch(_emb(M + 4), torch.zeros(M + 4, dtype=torch.long), enqueue=False)
    mem.reset()  # a reset memory takes either addressing again
    mem.enqueue(_emb(3), torch.tensor([0, 1, 2]))
    assert mem.num_enqueued == 3 and not bool(mem.index_addressed)


@pytest.mark.parametrize("indexed", [False, True])
def test_a_state_saved_without_its_addressing_takes_either(indexed):
    # index_addressed came after the first release: the next batch decides it
    g = torch.Generator().manual_seed(8)
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=1)
    mem.enqueue(torch.randn(6, D, generator=g), torch.arange(6) % C)
    old = {k: v for k, v in mem.state_dict().items() if k not in SemanticScaleMemory._CACHE_STATE}
    fresh = SemanticScaleMemory(C, D, M, warmup_epochs=1)
    fresh.load_state_dict(old)
    # saved again before its next batch, it is still undecided
    resaved = SemanticScaleMemory(C, D, M, warmup_epochs=1)
    resaved.load_state_dict(fresh.state_dict())
    fresh = resaved
    fresh.enqueue(_emb(3), torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9]) if indexed else None)
    assert bool(fresh.index_addressed) == indexed
    with pytest.raises(ValueError, match="this batch has"):  # decided now
        fresh.enqueue(_emb(3), torch.tensor([0, 1, 2]), None if indexed else torch.tensor([7, 8, 9]))


def _other_state(case):
    """A state dict that cannot be loaded into ``_used_memory()``, yet shares
    most of its keys and shapes (torch would copy those)."""
    g = torch.Generator().manual_seed(11)
    size, d = {"memory_size": (M + 4, D), "embedding_size": (M, D + 1)}.get(case, (M, D))
    other = SemanticScaleMemory(C, d, size, warmup_epochs=3)
    other.enqueue(torch.randn(7, d, generator=g), torch.randint(0, C, (7,), generator=g))
    other.scales()
    state = other.state_dict()
    if case == "missing-key":
        del state["class_counts"]
    if case == "missing-embeddings":  # once loaded all the rest: counts of a memory without its samples
        del state["embedding_memory"]
    return state


@pytest.mark.parametrize("case", ["memory_size", "embedding_size", "missing-key", "missing-embeddings"])
def test_a_failed_load_leaves_the_memory_unchanged(case):
    """torch copies every buffer that fits before it raises for the others: a
    memory half loaded would hold counts of one state and samples of another."""
    mem, twin = _used_memory(), _used_memory()
    before = _snapshot(mem)
    words = {"missing-key": "Missing key.*class_counts", "missing-embeddings": "Missing key.*embedding_memory"}.get(
        case, "size mismatch(.|\n)*SemanticScaleMemory was left unchanged")
    with pytest.raises(RuntimeError, match=words):
        mem.load_state_dict(_other_state(case))
    assert_state_unchanged(before, mem)
    g = torch.Generator().manual_seed(12)
    emb, labels = torch.randn(4, D, generator=g), torch.randint(0, C, (4,), generator=g)
    mem.enqueue(emb, labels)
    twin.enqueue(emb, labels)
    assert torch.equal(mem.scales(), twin.scales())


@pytest.mark.parametrize("case, key", [("missing-key", "class_counts"), ("missing-embeddings", "embedding_memory")])
def test_a_non_strict_load_without_a_key_loads_nothing(case, key):
    """A memory is whole or nothing: counts of one state with samples of another are no memory."""
    mem = _used_memory()
    before = _snapshot(mem)
    result = mem.load_state_dict(_other_state(case), strict=False)
    assert result.missing_keys == [key]
    assert_state_unchanged(before, mem)


# ---------------------------------------------------------------------------
# errors that torch itself raises half-way through an enqueue (out of memory
# while a pool grows, Ctrl-C): no check can see them coming, so the memory
# puts its samples and counters back and rebuilds its statistics from them


def _failing_after(method, error):
    def fail(*args, **kwargs):
        method(*args, **kwargs)  # the step's changes are made, then the error
        raise error

    return fail


def _history(indexed, steps, seed):
    """(embeddings, labels, indices) batches; index-addressed ones first fill
    every slot, then overwrite slots of the same samples (labels fixed per slot)."""
    g = torch.Generator().manual_seed(seed)
    slot_labels = torch.arange(M) % C
    out = []
    for step in range(steps):
        emb = torch.randn(4, D, generator=g)
        if indexed:
            idx = torch.arange(4 * step, 4 * step + 4) % M if step < M // 4 else torch.randperm(M, generator=g)[:4]
            out.append((emb, slot_labels[idx], idx))
        else:
            out.append((emb, torch.randint(0, C, (4,), generator=g), None))
    return out


def _memory_after(history, indexed):
    # classes of more than gram_size take the moment form: both forms in use (some
    # first-in-first-out classes still in the Gram form after 8 batches)
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=1, gram_size=2 if indexed else 3)
    mem.low_rank_min_size, mem.low_rank_max_share = 2, None  # reach the low-rank caches at this tiny shape
    for step, (emb, labels, idx) in enumerate(history):
        mem.enqueue(emb, labels, indices=idx)
        if step >= 1:
            mem.scales()  # statistics built from the second batch on
    return mem


FAILURE_POINTS = {
    # (indexed, method that fails after doing its part)
    "fifo-remove": (False, "_remove"),
    "fifo-promote": (False, "_promote_large_classes"),
    "fifo-positions": (False, "_allocate_positions"),
    "fifo-statistics": (False, "_update_statistics"),
    "fifo-all-but-counters": (False, "_store_and_update"),
    "indexed-plan": (True, "_plan_low_rank"),
    "indexed-statistics": (True, "_update_statistics"),
    "indexed-low-rank": (True, "_apply_low_rank"),
    "indexed-all-but-counters": (True, "_overwrite_and_update"),
}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("CUDA out of memory (simulated)")],
                         ids=["interrupt", "out-of-memory"])
@pytest.mark.parametrize("case", list(FAILURE_POINTS))
def test_an_enqueue_that_fails_half_way_puts_the_memory_back(case, error, np_ref, monkeypatch, caplog):
    indexed, method = FAILURE_POINTS[case]
    history = _history(indexed, 12, seed=3)
    mem, twin = _memory_after(history[:8], indexed), _memory_after(history[:8], indexed)
    if indexed:
        assert bool(mem.cache_valid.any()), "the low-rank caches are not in use: the case tests nothing"
    assert bool((mem.moment_index >= 0).any()) and bool((mem.moment_index < 0).any()), "not both forms"
    before = {k: getattr(mem, k).clone() for k in ("embedding_memory", "label_memory", "class_counts")}
    stage, enqueued, queue_idx = mem.stage, mem.num_enqueued, int(mem.queue_idx)
    emb, labels, idx = history[8]
    calls = []
    monkeypatch.setattr(mem, method, _failing_after(lambda *a: calls.append(getattr(type(mem), method)(mem, *a)),
                                                    error))
    with pytest.raises(type(error)):
        mem.enqueue(emb, labels, indices=idx)
    assert calls, f"{method} was not reached"
    monkeypatch.undo()
    assert "put back" in caplog.text

    for k, v in before.items():
        assert torch.equal(getattr(mem, k), v), f"{k} not put back"
    assert (mem.stage, mem.num_enqueued, int(mem.queue_idx)) == (stage, enqueued, queue_idx)
    stored, stored_labels = mem.contents()
    want = np_ref.class_scales(stored.numpy(), stored_labels.numpy(), C, normalize=False)  # the rows as stored
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-9, atol=1e-12)
    # retried, then carried on: as if the failure never happened (up to rounding)
    for emb, labels, idx in history[8:]:
        mem.enqueue(emb, labels, indices=idx)
        twin.enqueue(emb, labels, indices=idx)
        assert torch.equal(mem.label_memory, twin.label_memory)
        assert torch.equal(mem.embedding_memory, twin.embedding_memory)
        np.testing.assert_allclose(mem.scales().numpy(), twin.scales().numpy(), rtol=1e-9, atol=1e-12)
    assert torch.equal(mem.class_counts, twin.class_counts) and mem.num_enqueued == twin.num_enqueued
    if indexed:
        assert bool(mem.cache_valid.any())  # rebuilt, and updating in low rank again


def test_an_enqueue_that_fails_before_the_statistics_exist_puts_the_memory_back(monkeypatch):
    history = _history(False, 3, seed=4)
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=3)
    for emb, labels, _ in history[:2]:
        mem.enqueue(emb, labels)
    before = _snapshot(mem)
    monkeypatch.setattr(mem, "_store", _failing_after(lambda *a: type(mem)._store(mem, *a), KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        mem.enqueue(*history[2][:2])
    assert_state_unchanged(before, mem)  # nothing was built: the state dict is exactly as it was
