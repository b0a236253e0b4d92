"""Low-rank (Woodbury + determinant lemma) scale updates of an index-addressed
SemanticScaleMemory.

Scales are compared against a float64 numpy computation from scratch over the
stored (already L2-normalised) samples, ``np_ref.class_scales`` of
tests/conftest.py, which is written from DEFINITIONS.md and not from pml_dsb;
``_low_rank_logdet_update`` is compared against ``torch.linalg.inv`` and
``torch.linalg.slogdet`` in float64. Every test that means to exercise the
low-rank path asserts that it ran (classes updated in low rank are counted
from ``cache_updates``/``cache_valid`` around each enqueue).

The memory only keeps inverses for matrices of at least
``low_rank_min_size`` rows (128 on CPU by default, none on GPUs); the tests lower it on the instance to reach
the path with tiny shapes (d = 8, classes of 1 to 14 samples), plus two runs
at d = 256 and 512 where the class matrices are less well conditioned.
"""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pml_dsb import SemanticScaleMemory
from pml_dsb.memory._low_rank import _low_rank_logdet_update

D = 8
# dataset of 40 samples: class sizes from 14 down to a class with 2 samples
# and one with a single sample (which never has a scale)
SIZES = (14, 10, 8, 5, 2, 1)
N = sum(SIZES)
C = len(SIZES)
RTOL = 1e-9
STEPS = 120  # iterations of the long runs (about 17 epochs of 7 batches)
# gram_size 9 puts classes 0-1 in the moment form and classes 2-5 in the Gram form
BOTH_FORMS = 9


# ------------------------------------------------------------------- helpers
def _dataset(gen, sizes=SIZES, d=D):
    """Labels fixed per dataset index (shuffled) and one unit centre per class."""
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(len(labels), generator=gen)]
    centres = F.normalize(torch.randn(len(sizes), d, generator=gen), dim=1)
    return labels, centres


def _sampler(gen, labels, centres, batch, spread=0.3):
    """Endless (embeddings, labels, indices) batches: a fresh permutation of the
    dataset indices every epoch, embeddings = class centre + noise."""
    n, d = len(labels), centres.shape[1]
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            y = labels[idx]
            yield centres[y] + spread * torch.randn(len(idx), d, generator=gen), y, idx


def _memory(gram_size, exact_refresh_every=64, min_size=2, num_classes=C, memory_size=N, d=D):
    memory = SemanticScaleMemory(
        num_classes, d, memory_size, warmup_epochs=1, gram_size=gram_size,
        exact_refresh_every=exact_refresh_every,
    )
    if min_size is not None:
        memory.low_rank_min_size = min_size
        memory.low_rank_max_share = None  # tiny matrices: exercise every update in low rank
    return memory


def _reference(memory, np_ref):
    z, y = memory.contents()
    return np_ref.class_scales(z.double().numpy(), y.numpy(), memory.num_classes, normalize=False)


def _enqueue(memory, emb, labels, indices=None):
    """Enqueue; return the mask of classes whose scale this enqueue updated in low rank."""
    before = memory.cache_updates.clone()
    memory.enqueue(emb, labels, indices=indices)
    return memory.cache_valid & (memory.cache_updates == before + 1)


def _record_refreshes(memory):
    """Make ``memory._compute_scales`` record the classes it refactorises."""
    calls = []
    original = memory._compute_scales

    def recording(classes):
        calls.append(classes.clone())
        return original(classes)

    memory._compute_scales = recording
    return calls


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _assert_caches_in_both_forms(memory):
    """Valid, already updated caches exist for a moment-form and a Gram-form class."""
    large = memory.moment_index >= 0
    used = memory.cache_valid & (memory.cache_updates > 0)
    assert bool(used[large].any()) and bool(used[~large].any()), (used, large)


def _run_in_lockstep(memory, twin, batch_pairs, steps):
    """Enqueue equal batches into two memories that must stay identical: the
    same low-rank updates, bit-equal scales every step, equal state at the end;
    and some updates really were low-rank."""
    low_steps = 0
    for _ in range(steps):
        batch, twin_batch = next(batch_pairs)
        for a, b in zip(batch, twin_batch):
            assert torch.equal(a, b)
        low = _enqueue(memory, *batch)
        assert torch.equal(low, _enqueue(twin, *twin_batch))
        low_steps += int(low.sum())
        assert torch.equal(memory.scales(), twin.scales())
    assert low_steps > 0
    _assert_state_equal(_state(memory), _state(twin))


def _warm(memory, batches, steps):
    """Run ``steps`` index-addressed iterations (enqueue + scales)."""
    for _ in range(steps):
        _enqueue(memory, *next(batches))
        memory.scales()


# --------------------------------------------- long index-addressed training
@pytest.mark.parametrize("exact_refresh_every", [3, 64], ids=lambda v: f"refresh_every={v}")
@pytest.mark.parametrize("gram_size", [3, 40], ids=["moment-form", "gram-form"])
def test_index_addressed_scales_stay_exact_over_many_iterations(gen, np_ref, gram_size, exact_refresh_every):
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(gram_size, exact_refresh_every)
    refreshed = _record_refreshes(memory)
    steps_per_class = torch.zeros(C, dtype=torch.long)
    checked_low_rank = 0  # low-rank scales compared against the reference
    rebuilt = 0  # exact refreshes of a class whose cache had been used
    for step in range(STEPS):
        updates_before = memory.cache_updates.clone()
        low = _enqueue(memory, *next(batches))
        steps_per_class += low.long()
        assert int(memory.cache_updates.max()) <= exact_refresh_every
        refreshed.clear()
        scales = memory.scales()
        # a class updated in low rank is not refactorised by scales()
        done = torch.cat(refreshed) if refreshed else torch.zeros(0, dtype=torch.long)
        assert not bool(low[done].any()), f"step {step}: low-rank classes refactorised"
        rebuilt += int((memory.cache_valid & (memory.cache_updates == 0) & (updates_before > 0)).sum())
        if step % 10 == 9 or step == STEPS - 1:
            np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
            checked_low_rank += int(low.sum())
    big = torch.tensor(SIZES) >= 2
    # the low-rank path ran for every class with a scale (moment and Gram forms)
    assert bool((steps_per_class[big] > 0).all()), steps_per_class
    assert int(steps_per_class.sum()) > STEPS
    assert checked_low_rank > 0
    # the single-sample class never has a scale, nor a cache
    assert int(steps_per_class[~big].sum()) == 0 and not bool(memory.cache_valid[~big].any())
    assert float(memory.scales()[SIZES.index(1)]) == 0.0
    if exact_refresh_every == 3:
        assert rebuilt > 0  # caches were dropped after 3 updates and rebuilt exactly
    # the form the parametrisation asks for
    large = memory.moment_index >= 0
    if gram_size == 3:
        assert bool(large[torch.tensor(SIZES) > 3].all())
    else:
        assert not bool(large.any())


def test_gram_classes_rebuilt_together_in_one_padded_bucket(gen, np_ref):
    """Classes of 10 and 9 samples share a size bucket: the 9 x 9 matrix is
    factorised padded to 10 x 10 (its diagonal beta = 9/8 there too), and its
    cached log det must leave the padding out."""
    sizes = (10, 9, 2)
    labels, centres = _dataset(gen, sizes)
    n = len(labels)
    whole = _sampler(gen, labels, centres, batch=n)
    parts = _sampler(gen, labels, centres, batch=5)
    memory = _memory(gram_size=n, exact_refresh_every=2, num_classes=len(sizes), memory_size=n)
    refreshed = _record_refreshes(memory)
    low_total, rebuilt_together = torch.zeros(len(sizes), dtype=torch.long), 0
    for step in range(24):
        low_total += _enqueue(memory, *next(whole if step % 3 != 2 else parts)).long()
        refreshed.clear()
        scales = memory.scales()
        done = torch.cat(refreshed).tolist() if refreshed else []
        rebuilt_together += int({0, 1} <= set(done) and bool(memory.cache_valid[:2].all()))
        np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
    assert not bool((memory.moment_index >= 0).any())
    assert rebuilt_together > 0 and bool((low_total > 0).all()), (rebuilt_together, low_total)


@pytest.mark.parametrize(
    "d,sizes,gram_size",
    [(512, (30, 25, 2), 64), (256, (8, 6, 2), 2)],
    ids=["gram-form-d512", "moment-form-d256"],
)
def test_low_rank_scales_stay_exact_in_high_dimension(gen, np_ref, d, sizes, gram_size):
    """Small classes in a large embedding space: beta = m/d is small, so the
    class matrices (n = 30 or 256 rows) are less well conditioned (cond ~ 50),
    and rounding in the updated inverse must not grow from update to update.
    Dataset samples are their class centre plus a fixed offset along one of
    three class directions, plus a little noise at every visit."""
    labels, centres = _dataset(gen, sizes, d)
    n = len(labels)
    directions = F.normalize(torch.randn(len(sizes), 3, d, generator=gen), dim=2)
    offsets = 0.5 * (torch.randn(n, 1, 3, generator=gen) @ directions[labels]).squeeze(1)
    memory = _memory(gram_size, num_classes=len(sizes), memory_size=n, d=d)
    low_total = torch.zeros(len(sizes), dtype=torch.long)
    for step in range(40):
        idx = torch.randperm(n, generator=gen)[:16]
        emb = centres[labels[idx]] + offsets[idx] + 0.02 * torch.randn(len(idx), d, generator=gen)
        low_total += _enqueue(memory, emb, labels[idx], idx).long()
        scales = memory.scales()
        z, y = memory.contents()
        z = z.double().numpy()
        want = [np_ref.semantic_scale(z[y.numpy() == c], normalize=False, form="mxm") for c in range(len(sizes))]
        np.testing.assert_allclose(scales.numpy(), want, rtol=RTOL, atol=1e-12, err_msg=f"step {step}")
    assert bool((low_total > 10).all()), low_total
    assert bool((memory.moment_index[:2] >= 0).all()) == (gram_size == 2)


def test_default_min_size_builds_no_cache_at_tiny_shapes(gen, np_ref):
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    for gram_size in (3, 40):
        memory = _memory(gram_size, min_size=None)
        assert memory.low_rank_min_size is None and memory._low_rank_min_size() == 128  # CPU default
        for step in range(30):
            low = _enqueue(memory, *next(batches))
            assert not bool(low.any())
            scales = memory.scales()
            assert not bool(memory.cache_valid.any()) and int(memory.cache_updates.max()) == 0
            if step % 10 == 9:
                np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
        assert memory.gram_inverse.shape[0] == 0 and memory.moment_inverse.shape[0] == 0


def test_default_min_size_builds_caches_for_large_matrices_on_cpu(gen, np_ref):
    """With the defaults, d = 128 classes in the moment form (128 x 128) do take the low-rank path."""
    labels, centres = _dataset(gen, sizes=(70, 66), d=128)
    batches = _sampler(gen, labels, centres, batch=16)
    memory = _memory(gram_size=None, min_size=None, num_classes=2, memory_size=len(labels), d=128)
    low = 0
    for _ in range(30):
        low += int(_enqueue(memory, *next(batches)).sum())
        scales = memory.scales()
    assert low > 0 and bool((memory.moment_index >= 0).all())
    np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)


def test_moment_form_class_larger_than_d_keeps_its_cache_at_d_256(gen, np_ref):
    """At d >= 256 on CPU the moment-form matrices are factorised one by one; a
    class of more samples than d has beta = m/d > 1, so a log det that added
    d*log(beta) instead of subtracting it would come out too large (for m < d it
    comes out negative, and the exact recomputation of scales below 1e-4 hides it)."""
    labels, centres = _dataset(gen, sizes=(300, 20), d=256)
    batches = _sampler(gen, labels, centres, batch=len(labels))
    memory = _memory(gram_size=None, min_size=None, num_classes=2, memory_size=len(labels), d=256)
    for step in range(2):  # the second exact refresh factorises and keeps the inverses
        _enqueue(memory, *next(batches))
        np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, err_msg=f"step {step}")
    assert bool(memory.cache_valid[0]) and int(memory.moment_index[0]) >= 0
    emb, y, idx = next(_sampler(gen, labels, centres, batch=24))
    assert bool(_enqueue(memory, emb, y, idx)[0])
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL)


def test_moment_form_low_rank_stays_exact_on_tight_clusters(gen, np_ref):
    """Samples 3e-4 from their class centre: s s^T/m terms of size m cancel, so an
    update written with them loses ~1e-7 relative; about the old mean it must not."""
    labels, centres = _dataset(gen, sizes=(150, 140), d=128)
    batches = _sampler(gen, labels, centres, batch=32, spread=3e-4)
    memory = _memory(gram_size=None, min_size=None, num_classes=2, memory_size=len(labels), d=128)
    low = 0
    for step in range(40):
        low += int(_enqueue(memory, *next(batches)).sum())
        scales = memory.scales()
        if step % 5 == 4:
            np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, err_msg=f"step {step}")
    assert low > 20 and bool((memory.moment_index >= 0).all())


def test_gram_inverses_are_allocated_only_for_cached_classes(gen, np_ref):
    """Only the Gram-form classes large enough to keep an inverse get a row of the pool."""
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(gram_size=40, min_size=6)  # classes of 14, 10 and 8 samples qualify
    _warm(memory, batches, 40)
    cached = torch.nonzero(memory.gram_inverse_index >= 0).flatten().tolist()
    assert cached == [0, 1, 2] and memory.gram_inverse.shape[0] == 3
    assert bool(memory.cache_updates[:3].gt(0).all())
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)


def test_rebuilt_gram_caches_reuse_their_pool_rows(gen, np_ref):
    """An exact refresh every 2 updates rebuilds each Gram-form class's inverse
    many times: each rebuild writes the class's own pool row, so the pool keeps
    one row per cached class instead of growing with every rebuild."""
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(gram_size=40, exact_refresh_every=2, min_size=6)  # classes of 14, 10 and 8 samples
    refreshed = _record_refreshes(memory)
    rebuilds = 0
    for _ in range(30):
        _enqueue(memory, *next(batches))
        refreshed.clear()
        memory.scales()
        done = torch.cat(refreshed) if refreshed else torch.zeros(0, dtype=torch.long)
        rebuilds += int((memory.cache_valid[done] & (memory.gram_inverse_index[done] >= 0)).sum())
    rows = memory.gram_inverse_index[memory.gram_inverse_index >= 0]
    assert rebuilds > 6 and sorted(rows.tolist()) == [0, 1, 2] and memory.gram_inverse.shape[0] == 3
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)


# ---------------------------------------------------------------- mixed usage
def test_relabels_among_index_enqueues_and_fifo_batches_refused(gen, np_ref):
    """Index-addressed enqueues with relabelled dataset indices: scales stay
    exact, and every count change drops the cache. A batch without indices
    in between is refused and changes nothing (its first-in-first-out slots
    would hold samples that indices later overwrite)."""
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(BOTH_FORMS, exact_refresh_every=8)
    low_total, fifo_steps, dropped = torch.zeros(C, dtype=torch.long), 0, 0
    for step in range(90):
        emb, y, idx = next(batches)
        valid_before, counts_before = memory.cache_valid.clone(), memory.class_counts.clone()
        if step % 9 == 8:
            before = {k: v.clone() for k, v in memory.state_dict().items()}
            with pytest.raises(ValueError, match="filled with dataset indices; this batch has none"):
                memory.enqueue(emb, y)
            after = memory.state_dict()
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            fifo_steps += 1
        else:
            if step % 7 == 6:
                # relabel: a dataset index comes back with another class, for good
                slot = int(idx[0])
                y = y.clone()
                y[0] = (int(memory.label_memory[slot]) + 1) % C
                labels[slot] = y[0]
            low_total += _enqueue(memory, emb, y, idx).long()
        changed = memory.class_counts != counts_before
        assert not bool(memory.cache_valid[changed].any()), f"step {step}: a cache survived a count change"
        dropped += int((valid_before & changed).sum())
        scales = memory.scales()
        if step % 5 == 4:
            np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
    assert fifo_steps > 0 and dropped > 0
    large = memory.moment_index >= 0
    assert bool(large.any()) and bool((~large).any())
    # the low-rank path ran in both forms
    assert int(low_total[large].sum()) > 0 and int(low_total[~large].sum()) > 0, low_total


def test_relabel_drops_both_caches_then_rebuilds(gen, np_ref):
    """One sample moves from class 0 to class 1: both caches go, and come back
    after an exact refresh at the new, again unchanging, counts."""
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(gram_size=3)
    _warm(memory, batches, 25)
    assert bool(memory.cache_valid[:2].all())
    assert int(memory.cache_updates[:2].min()) > 0
    slot = int(torch.nonzero(memory.label_memory == 0)[0])
    emb = centres[1:2] + 0.3 * torch.randn(1, D, generator=gen)
    counts = memory.class_counts.clone()
    low = _enqueue(memory, emb, torch.tensor([1]), torch.tensor([slot]))
    assert memory.class_counts[0] == counts[0] - 1 and memory.class_counts[1] == counts[1] + 1
    assert not bool(memory.cache_valid[:2].any()) and not bool(low.any())
    assert bool(memory.stale[:2].all())
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
    # the count is new: no cache yet; a second refresh at the same count builds one
    assert not bool(memory.cache_valid[:2].any())
    labels[slot] = 1
    for _ in range(12):
        _enqueue(memory, *next(batches))
        memory.scales()
    assert bool(memory.cache_valid[:2].all())
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)


def test_a_gram_class_left_with_a_free_position_gets_its_cache_back(gen, np_ref):
    """A relabel frees a position inside class 0's slot list (a Gram-form
    class); its later index-addressed enqueues refill it, after which the class
    is updated in low rank again."""
    memory = _memory(gram_size=8, memory_size=8, num_classes=2, d=4)
    x = torch.randn(20, 4, generator=gen)
    memory.enqueue(x[:8], torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]), indices=torch.arange(8))
    memory.scales()
    memory.enqueue(x[8:9], torch.tensor([1]), indices=torch.tensor([0]))  # slot 0 moves to class 1
    memory.scales()
    assert int(memory.class_slots[0, 0]) == -1 and int(memory.class_counts[0]) == 4
    low = []
    for i in range(6):  # class 0's own samples overwrite their slots
        low.append(bool(_enqueue(memory, x[9 + i : 10 + i], torch.tensor([0]), torch.tensor([1 + i % 4]))[0]))
        np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
    assert sorted(memory.class_slots[0, :4].tolist()) == [1, 2, 3, 4]  # no free position left inside
    assert low[-1] and bool(memory.cache_valid[0])


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_with_valid_caches_resumes_bitwise(gen):
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(BOTH_FORMS, exact_refresh_every=16)
    _warm(memory, batches, 20)
    _assert_caches_in_both_forms(memory)
    buf = io.BytesIO()
    torch.save(memory.state_dict(), buf)
    buf.seek(0)
    fresh = _memory(BOTH_FORMS, exact_refresh_every=16)
    fresh.load_state_dict(torch.load(buf))
    _assert_state_equal(_state(memory), _state(fresh))
    _run_in_lockstep(memory, fresh, ((b, b) for b in batches), 30)


def test_checkpoint_without_cache_state_loads_and_stays_exact(gen, np_ref):
    """A state_dict saved before the low-rank caches existed loads with none;
    the next refresh is exact, and the caches are rebuilt after it."""
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    memory = _memory(BOTH_FORMS)
    _warm(memory, batches, 20)
    old = {k: v for k, v in memory.state_dict().items() if k not in SemanticScaleMemory._CACHE_STATE}
    fresh = _memory(BOTH_FORMS)
    fresh.load_state_dict(old)
    assert not bool(fresh.cache_valid.any()) and fresh.gram_inverse.numel() == 0
    np.testing.assert_allclose(fresh.scales().numpy(), _reference(fresh, np_ref), rtol=RTOL, atol=1e-12)
    _warm(fresh, batches, 20)
    _assert_caches_in_both_forms(fresh)
    np.testing.assert_allclose(fresh.scales().numpy(), _reference(fresh, np_ref), rtol=RTOL, atol=1e-12)


@pytest.mark.gpu
def test_cuda_low_rank_updates_match_cpu(gen, np_ref):
    """The same index-addressed run on CUDA and on CPU: both take the low-rank
    path and both equal the float64 reference."""
    labels, centres = _dataset(gen)
    batches = list(zip(range(60), _sampler(gen, labels, centres, batch=6)))
    cpu, cuda = _memory(BOTH_FORMS), _memory(BOTH_FORMS).cuda()
    low_cpu = low_cuda = 0
    for _, (emb, y, idx) in batches:
        low_cpu += int(_enqueue(cpu, emb, y, idx).sum())
        low_cuda += int(_enqueue(cuda, emb.cuda(), y.cuda(), idx.cuda()).sum())
        np.testing.assert_allclose(cuda.scales().cpu().numpy(), cpu.scales().numpy(), rtol=1e-9, atol=1e-12)
    assert low_cpu > 0 and low_cuda > 0
    np.testing.assert_allclose(cuda.scales().cpu().numpy(), _reference(cpu, np_ref), rtol=RTOL, atol=1e-12)


# ------------------------------------------------------------------ bad input
def _bad_batches(labels, centres):
    idx = torch.tensor([0, 1, 2])
    emb = centres[labels[idx]].clone()
    nan = emb.clone()
    nan[1, 3] = float("nan")
    return {
        "nan-embedding": (nan, labels[idx], idx, ValueError),
        "label-out-of-range": (emb, torch.tensor([0, C, 1]), idx, ValueError),
        "duplicate-indices": (emb, labels[idx], torch.tensor([0, 1, 0]), ValueError),
        "wrong-embedding-size": (torch.ones(3, D + 1), labels[idx], idx, ValueError),
        "float-indices": (emb, labels[idx], idx.float(), TypeError),
    }


def test_bad_input_with_valid_caches_changes_nothing():
    def build():
        g = torch.Generator().manual_seed(77)
        labels, centres = _dataset(g)
        batches = _sampler(g, labels, centres, batch=6)
        memory = _memory(BOTH_FORMS)
        _warm(memory, batches, 20)
        _enqueue(memory, *next(batches))  # caches updated, scales not refreshed yet
        return memory, batches, labels, centres

    memory, batches, labels, centres = build()
    twin, twin_batches, _, _ = build()
    _assert_caches_in_both_forms(memory)
    before = _state(memory)
    for name, (emb, y, idx, exc) in _bad_batches(labels, centres).items():
        with pytest.raises(exc, match="embedding|labels|indices"):
            memory.enqueue(emb, y, indices=idx)
        _assert_state_equal(before, _state(memory))
    _run_in_lockstep(memory, twin, zip(batches, twin_batches), 3)


# -------------------------------------------------- _low_rank_logdet_update
def _spd(gen, t, n, shift=0.5):
    x = torch.randn(t, n, n, generator=gen, dtype=torch.float64)
    return x @ x.transpose(1, 2) / n + shift * torch.eye(n, dtype=torch.float64)


def _logdet(a):
    sign, value = torch.linalg.slogdet(a)
    assert bool((sign > 0).all())
    return value


def _indefinite_update(gen, t, n, k):
    """A, U and a core C = diag(+1, ..., -small) such that A + U C U^T is SPD."""
    a = _spd(gen, t, n)
    u = torch.randn(t, n, k, generator=gen, dtype=torch.float64)
    signs = torch.where(torch.arange(k) % 2 == 0, 1.0, -0.01).to(torch.float64)
    core = torch.diag_embed(signs.expand(t, k).clone())
    # a symmetric off-diagonal coupling too (C need not be diagonal)
    core[:, 0, 1] = core[:, 1, 0] = 0.05
    return a, u, core


def test_low_rank_logdet_update_matches_inverse_and_slogdet(gen):
    t, n, k = 4, 7, 4
    a, u, core = _indefinite_update(gen, t, n, k)
    updated = a + u @ core @ u.transpose(1, 2)
    assert bool((torch.linalg.eigvalsh(updated)[:, 0] > 1e-3).all())  # precondition: SPD
    inverse = torch.linalg.inv(a)
    change, ok = _low_rank_logdet_update(inverse, u, core)  # replaces ``inverse`` in place
    torch.testing.assert_close(inverse, torch.linalg.inv(updated), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(change, _logdet(updated) - _logdet(a), rtol=1e-10, atol=1e-10)
    assert change.shape == (t,) and ok.dtype == torch.bool and bool(ok.all())


def test_low_rank_logdet_update_with_a_rank_larger_than_n(gen):
    # the moment form updates a d x d inverse by rank 2r + 2, which may exceed d
    t, n, k = 2, 3, 6
    a, u, core = _indefinite_update(gen, t, n, k)
    updated = a + u @ core @ u.transpose(1, 2)
    assert bool((torch.linalg.eigvalsh(updated)[:, 0] > 0).all())
    inverse = torch.linalg.inv(a)
    change, ok = _low_rank_logdet_update(inverse, u, core)
    torch.testing.assert_close(inverse, torch.linalg.inv(updated), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(change, _logdet(updated) - _logdet(a), rtol=1e-10, atol=1e-10)
    assert bool(ok.all())


def test_low_rank_logdet_update_ignores_zero_padding(gen):
    t, n, k, pad = 3, 6, 3, 2
    a, u, core = _indefinite_update(gen, t, n, k)
    padded_u = torch.cat([u, torch.zeros(t, n, pad, dtype=torch.float64)], 2)
    padded_core = torch.zeros(t, k + pad, k + pad, dtype=torch.float64)
    padded_core[:, :k, :k] = core
    # and padding between real columns, as _pad_groups leaves it for short groups
    perm = torch.tensor([0, 3, 1, 4, 2])
    padded_u, padded_core = padded_u[:, :, perm], padded_core[:, perm][:, :, perm]
    plain, padded = torch.linalg.inv(a), torch.linalg.inv(a)
    change, ok = _low_rank_logdet_update(plain, u, core)
    change_p, ok_p = _low_rank_logdet_update(padded, padded_u, padded_core)
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(change_p, change, rtol=1e-12, atol=1e-12)
    assert bool(ok.all()) and bool(ok_p.all())
    # all-padding (a class with nothing to update) changes nothing at all
    untouched = torch.linalg.inv(a)
    zero_change, zero_ok = _low_rank_logdet_update(
        untouched, torch.zeros(t, n, 2, dtype=torch.float64), torch.zeros(t, 2, 2, dtype=torch.float64)
    )
    torch.testing.assert_close(untouched, torch.linalg.inv(a), rtol=1e-14, atol=1e-14)
    assert torch.equal(zero_change, torch.zeros(t, dtype=torch.float64)) and bool(zero_ok.all())


def test_low_rank_logdet_update_flags_a_negative_determinant_ratio(gen):
    t, n = 3, 5
    a = _spd(gen, t, n)
    u = torch.randn(t, n, 2, generator=gen, dtype=torch.float64)
    core = torch.diag_embed(torch.tensor([[1.0, -0.01]] * t, dtype=torch.float64))
    # matrix 1: take away along one direction far more than A holds there
    v = u[1, :, 1]
    core[1, 1, 1] = -10.0 * float(torch.linalg.eigvalsh(a[1])[-1]) / float(v @ v)
    updated = a + u @ core @ u.transpose(1, 2)
    eig = torch.linalg.eigvalsh(updated)[:, 0]
    assert float(eig[1]) < 0 and bool((eig[[0, 2]] > 0).all())  # precondition
    inverse = torch.linalg.inv(a)
    change, ok = _low_rank_logdet_update(inverse, u, core)
    assert ok.tolist() == [True, False, True]
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(change[keep], _logdet(updated[keep]) - _logdet(a[keep]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse[keep], torch.linalg.inv(updated[keep]), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("value", [0, -1, 2.5, "4", True, None], ids=repr)
def test_bad_exact_refresh_every(value):
    with pytest.raises(ValueError) as info:
        SemanticScaleMemory(3, 4, 10, exact_refresh_every=value)
    assert "exact_refresh_every" in str(info.value) and repr(value) in str(info.value)


def test_exact_refresh_every_is_kept():
    assert SemanticScaleMemory(3, 4, 10).exact_refresh_every == 64
    assert SemanticScaleMemory(3, 4, 10, exact_refresh_every=1).exact_refresh_every == 1


def test_high_rank_updates_take_the_exact_refresh(gen, np_ref):
    """An update of rank k >= low_rank_max_share * n (default 0.6) costs more in
    low rank than a refactorisation: that class is refreshed exactly, and its
    cache is rebuilt for the next batch."""
    labels = torch.tensor([0] * 12 + [1] * 6)
    memory = SemanticScaleMemory(2, D, len(labels), warmup_epochs=1, gram_size=16)
    memory.low_rank_min_size = 2
    assert memory.low_rank_max_share == 0.6
    centres = F.normalize(torch.randn(2, D, generator=gen), dim=1)

    def batch(indices):
        y = labels[indices]
        return centres[y] + 0.3 * torch.randn(len(indices), D, generator=gen), y, indices

    _enqueue(memory, *batch(torch.arange(len(labels))))
    memory.scales()
    for indices, low_rank in [
        ([0], None),  # the exact refresh after this enqueue builds class 0's cache
        ([1], True),  # rank 2 < 0.6 * 12
        ([2, 3, 4], True),  # rank 6 < 7.2
        ([5, 6, 7, 8], False),  # rank 8 >= 7.2: refreshed exactly (and the cache rebuilt)
        ([9], True),
    ]:
        low = _enqueue(memory, *batch(torch.tensor(indices)))
        if low_rank is not None:
            assert bool(low[0]) == low_rank, indices
        np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
        assert bool(memory.cache_valid[0])


@pytest.mark.parametrize(
    "gram_size,share", [(2, 5 / 8), (16, 1 / 2)], ids=["moment-form-n=d=8", "gram-form-n=8"]
)
def test_low_rank_share_limit_is_strict_and_counts_the_moment_forms_extra_column(gen, np_ref, gram_size, share):
    """The rank k of an update (2 per replaced sample, +1 in the moment form for
    the mean's shift) must stay strictly below low_rank_max_share * n. Class 0
    has 8 samples; n = d = 8 in the moment form (limit 5/8 * 8 = 5: one sample,
    k = 3, passes; two, k = 5, do not), n = 8 in the Gram form (limit 4: one
    sample, k = 2, passes; two, k = 4, do not)."""
    labels = torch.tensor([0] * 8 + [1] * 6)
    memory = SemanticScaleMemory(2, D, len(labels), warmup_epochs=1, gram_size=gram_size)
    memory.low_rank_min_size = 2
    memory.low_rank_max_share = share
    centres = F.normalize(torch.randn(2, D, generator=gen), dim=1)

    def batch(indices):
        y = labels[indices]
        return centres[y] + 0.3 * torch.randn(len(indices), D, generator=gen), y, indices

    for _ in range(2):  # the second exact refresh (count unchanged) keeps the inverses
        memory.enqueue(*batch(torch.arange(len(labels))))
        memory.scales()
    assert bool(memory.cache_valid[0]) and bool(memory.moment_index[0] >= 0) == (gram_size == 2)
    for indices, low_rank in [([0], True), ([1, 2], False), ([3], True), ([4, 5], False)]:
        low = _enqueue(memory, *batch(torch.tensor(indices)))
        assert bool(low[0]) == low_rank, indices
        assert bool(memory.cache_valid[0]) == low_rank, indices  # a refused update drops the cache
        np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
        assert bool(memory.cache_valid[0])  # rebuilt by the exact refresh (count unchanged)


@pytest.mark.parametrize("gram_size", [3, 40], ids=["moment-form", "gram-form"])
def test_a_failed_low_rank_update_drops_the_cache(gen, np_ref, monkeypatch, gram_size):
    """An update that the determinant lemma flags unusable (``_woodbury_core``'s
    ok, forced False here for one enqueue) leaves the class to an exact refresh:
    its cache is dropped, so that a second enqueue before the next scales()
    does not update it from a log det that missed the first one."""
    from pml_dsb.memory import _low_rank

    labels, centres = _dataset(gen)
    memory = _memory(gram_size)
    _warm(memory, _sampler(gen, labels, centres, batch=6), 20)
    assert bool(memory.cache_valid[0])
    real = _low_rank._woodbury_core

    def failing(u, w, core):
        change, ok, x = real(u, w, core)
        return change, torch.zeros_like(ok), x

    monkeypatch.setattr(_low_rank, "_woodbury_core", failing)
    first, second = torch.nonzero(labels == 0).flatten()[:2]
    memory.enqueue(centres[0] + 0.3 * torch.randn(1, D, generator=gen), labels[first : first + 1], first.view(1))
    assert not bool(memory.cache_valid[0]) and bool(memory.stale[0])
    monkeypatch.setattr(_low_rank, "_woodbury_core", real)
    memory.enqueue(centres[0] + 0.3 * torch.randn(1, D, generator=gen), labels[second : second + 1], second.view(1))
    np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("gram_size", [2, 16], ids=["moment-form", "gram-form"])
def test_a_class_overwritten_with_copies_in_low_rank_gets_no_scale_even_with_eps_0(gen, gram_size):
    """Class 0's 8 samples are overwritten one by one, in low rank, with copies
    of one vector. Its low-rank log det keeps rounding (S ~ +-1e-16), which
    with eps = 0 would count as a scale (1/S: all the weight); the scale is
    recomputed from the centred rows, which are exactly zero: S = 0."""
    labels = torch.tensor([0] * 8 + [1] * 6)
    memory = SemanticScaleMemory(2, D, len(labels), warmup_epochs=1, gram_size=gram_size, eps=0.0)
    memory.low_rank_min_size = 2
    memory.low_rank_max_share = None
    for _ in range(2):  # the second exact refresh keeps the inverses
        memory.enqueue(torch.randn(len(labels), D, generator=gen), labels, torch.arange(len(labels)))
        memory.scales()
    v = torch.randn(1, D, generator=gen)
    for step in range(16):
        i = torch.tensor([step % 8])
        assert bool(_enqueue(memory, v, labels[i], i)[0])  # the low-rank path ran
        scales = memory.scales()
        if step >= 7:  # class 0 holds 8 copies of v
            assert float(scales[0]) == 0.0, step
            assert memory.weights().tolist() == [1.0, 1.0]  # no scale: class 1's weight


@pytest.mark.parametrize("gram_size", [3, 40], ids=["moment-form", "gram-form"])
def test_unnormalized_memory_refreshes_exactly_with_mixed_norms(gen, np_ref, gram_size):
    """l2_normalize=False: samples of norm ~1 and ~300 in one class. Woodbury
    updates of such matrices drifted to 4e-2 relative error (1e-12 refreshed
    exactly), so this memory keeps no inverses and stays exact."""
    labels, centres = _dataset(gen)
    memory = SemanticScaleMemory(C, D, N, warmup_epochs=1, gram_size=gram_size, l2_normalize=False)
    memory.low_rank_min_size, memory.low_rank_max_share = 2, None
    batches = _sampler(gen, labels, centres, batch=6)
    for step in range(60):
        emb, y, idx = next(batches)
        big = torch.rand(len(idx), 1, generator=gen) < 0.5
        _enqueue(memory, torch.where(big, 300.0 * emb, emb), y, idx)
        scales = memory.scales()
        assert not bool(memory.cache_valid.any())
        if step % 10 == 9:
            np.testing.assert_allclose(scales.numpy(), _reference(memory, np_ref), rtol=RTOL, err_msg=f"step {step}")


def test_unnormalized_memory_drops_caches_it_loads(gen, np_ref):
    """An older release kept low-rank caches with l2_normalize=False too: loaded,
    they would take Woodbury updates until their next exact refresh."""
    labels, centres = _dataset(gen)
    batches = _sampler(gen, labels, centres, batch=6)
    cached = _memory(gram_size=3)
    _warm(cached, batches, 20)
    assert bool(cached.cache_valid.any())
    memory = SemanticScaleMemory(C, D, N, warmup_epochs=1, gram_size=3, l2_normalize=False)
    memory.low_rank_min_size, memory.low_rank_max_share = 2, None
    memory.load_state_dict(cached.state_dict())
    assert not bool(memory.cache_valid.any())
    for _ in range(5):
        assert not bool(_enqueue(memory, *next(batches)).any())  # no class updated in low rank
        np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=RTOL, atol=1e-12)
