"""SemanticScaleMemory: stages, FIFO and index-addressed contents, scales and
weights against from-scratch float64 numpy over the stored samples, checkpoints."""
import collections
import io

import numpy as np
import pytest
import torch

from pml_dsb import SemanticScaleMemory


def _batch(gen, b, d, num_classes, probs=None):
    emb = torch.randn(b, d, generator=gen)
    if probs is None:
        labels = torch.randint(0, num_classes, (b,), generator=gen)
    else:
        labels = torch.multinomial(torch.tensor(probs), b, replacement=True, generator=gen)
    return emb, labels


def _label_stream(gen, n, probs, rare_every):
    """Labels drawn from ``probs`` over classes 0..len(probs)-1, except that every
    ``rare_every``-th sample is the extra class len(probs), which therefore never
    holds more than ceil(M / rare_every) samples of a FIFO memory of size M."""
    labels = torch.multinomial(torch.tensor(probs), n, replacement=True, generator=gen)
    labels[rare_every - 1 :: rare_every] = len(probs)
    return labels


def _unit64(emb):
    e = emb.double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _assert_same_samples(memory, model_emb, model_labels, atol=1e-6):
    """The memory holds exactly the (embedding, label) pairs of the model, in any order."""
    emb, labels = memory.contents()
    assert emb.shape == (len(model_labels), memory.embedding_size)
    if len(model_labels) == 0:
        return
    model_emb = np.asarray(model_emb)
    dist = np.abs(emb.double().numpy()[:, None, :] - model_emb[None, :, :]).max(-1)
    match = dist.argmin(1)
    assert np.all(dist[np.arange(len(match)), match] < atol), "a stored embedding is not in the model"
    assert sorted(match.tolist()) == list(range(len(model_labels))), "not a one-to-one match"
    np.testing.assert_array_equal(labels.numpy(), np.asarray(model_labels)[match])


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _expected_stage(n_enqueued, memory_size, warmup_epochs):
    # DEFINITIONS.md: 1 until M enqueued, 2 until n*M, 3 afterwards
    if n_enqueued < memory_size:
        return 1
    if n_enqueued < warmup_epochs * memory_size:
        return 2
    return 3


# ---------------------------------------------------------------------- stages
@pytest.mark.parametrize("warmup_epochs", [0, 1, 2, 3])
def test_stage_changes_exactly_at_m_and_n_times_m(gen, warmup_epochs):
    M = 10
    mem = SemanticScaleMemory(3, 4, M, warmup_epochs=warmup_epochs)
    assert mem.stage == _expected_stage(0, M, warmup_epochs)
    for k in range(1, 4 * M + 1):  # one sample at a time: every count is visited
        mem.enqueue(*_batch(gen, 1, 4, 3))
        assert mem.num_enqueued == k
        assert mem.stage == _expected_stage(k, M, warmup_epochs), f"after {k} samples"


def test_stage_counts_samples_not_batches(gen):
    M, n = 12, 2
    mem = SemanticScaleMemory(3, 4, M, warmup_epochs=n)
    seen = 0
    for b in [5, 6, 1, 7, 4, 1, 12, 3]:
        mem.enqueue(*_batch(gen, b, 4, 3))
        seen += b
        assert mem.num_enqueued == seen
        assert mem.stage == _expected_stage(seen, M, n)


def test_constructor_arguments_kept(gen):
    mem = SemanticScaleMemory(4, 3, 7, warmup_epochs=2, normalize=None)
    assert (mem.num_classes, mem.embedding_size, mem.memory_size, mem.warmup_epochs, mem.normalize) == (
        4, 3, 7, 2, None,
    )
    assert mem.num_enqueued == 0 and mem.fill_level == 0.0
    assert SemanticScaleMemory(2, 3, 7).warmup_epochs == 5


# ------------------------------------------------------- FIFO and wrap-around
def test_fifo_contents_match_deque_model(gen):
    M, d, C = 9, 3, 3
    mem = SemanticScaleMemory(C, d, M)
    model = collections.deque(maxlen=M)
    for b in [2, 3, 1, 4, 9, 5, 2, 8, 1, 3, 3]:  # wraps around several times
        emb, labels = _batch(gen, b, d, C)
        mem.enqueue(emb, labels)
        model.extend(zip(_unit64(emb), labels.tolist()))
        _assert_same_samples(mem, [e for e, _ in model], [l for _, l in model])
        assert mem.fill_level == pytest.approx(len(model) / M)
        np.testing.assert_array_equal(
            mem.class_counts.numpy(), np.bincount([l for _, l in model], minlength=C)
        )


def test_full_memory_is_a_ring_in_arrival_order(gen):
    M, d = 7, 3
    mem = SemanticScaleMemory(2, d, M)
    model = collections.deque(maxlen=M)
    for b in [3, 3, 3, 2, 5, 4]:
        emb, labels = _batch(gen, b, d, 2)
        mem.enqueue(emb, labels)
        model.extend(_unit64(emb))
        if len(model) < M:
            continue
        stored = mem.contents()[0].double().numpy()  # slot order
        oldest = np.abs(stored - model[0]).max(1).argmin()
        rotated = np.roll(stored, -oldest, axis=0)  # oldest first
        np.testing.assert_allclose(rotated, np.stack(model), atol=1e-6)


def test_stored_embeddings_are_detached_unit_float32(gen):
    mem = SemanticScaleMemory(2, 4, 8)
    emb = (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    mem.enqueue(emb, torch.tensor([0, 1, 0, 1, 1]))
    stored, _ = mem.contents()
    assert stored.dtype == torch.float32 and not stored.requires_grad
    np.testing.assert_allclose(stored.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(stored.double().numpy(), _unit64(emb.detach()), atol=1e-6)


def test_tiny_embeddings_are_stored_unit_norm(gen):
    # a norm below F.normalize's default eps (1e-12) must still be normalised
    mem = SemanticScaleMemory(2, 4, 8)
    emb = torch.randn(4, 4, generator=gen) * (2.0 ** -50)
    mem.enqueue(emb, torch.tensor([0, 0, 1, 1]))
    np.testing.assert_allclose(mem.contents()[0].norm(dim=1).numpy(), 1.0, rtol=1e-6)


def test_float64_rows_of_any_finite_norm_are_stored_unit_norm(gen, np_ref):
    """Rows whose squares overflow float64 (norm past ~1e154) once came out as
    zero vectors, subnormal ones short of unit length."""
    mem = SemanticScaleMemory(2, 4, 8, warmup_epochs=1)
    directions = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    factors = torch.tensor([1e200, 1e300, 1.0, 1e-310, 1e-300, 1e155, 3.0, 1e-306], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    mem.enqueue(directions * factors.unsqueeze(1), labels)
    stored, _ = mem.contents()
    np.testing.assert_allclose(stored.double().numpy(), _unit64(directions), rtol=1e-6, atol=1e-6)
    want = np_ref.class_scales(_unit64(directions), labels.numpy(), 2, normalize=False)
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("cast", ["double", "half", "bfloat16", "float", "to-float64"])
def test_dtype_casts_leave_the_buffers_as_they_are(gen, np_ref, cast):
    """A model cast (``loss.double()``, ``.half()``, ``.to(dtype)``) reaches the
    memory through the loss that holds it; re-typed buffers once broke the
    next enqueue half-way through (float64 embeddings, float32 statistics)."""
    mem, twin = _grown_memory(gen), _grown_memory(torch.Generator().manual_seed(0))
    twin.load_state_dict(mem.state_dict())
    before = _state(mem)
    cast_back = mem.to(torch.float64) if cast == "to-float64" else getattr(mem, cast)()
    assert cast_back is mem
    _assert_state_equal(before, _state(mem))  # dtypes included
    for _ in range(5):
        batch = _batch(gen, 5, 8, 4)
        mem.enqueue(*batch)
        twin.enqueue(*batch)
        assert torch.equal(mem.scales(), twin.scales())
    z, y = mem.contents()
    np.testing.assert_allclose(mem.scales().numpy(), np_ref.class_scales(z.double().numpy(), y.numpy(), 4, normalize=False), rtol=1e-9)


def test_buffers_follow_torch_module_semantics(gen):
    """The buffers live in a mapping that is not a dict (see _UnrecordedBuffers):
    torch's ways of setting, replacing and deleting them still work."""
    mem = SemanticScaleMemory(2, 4, 8)
    mem.extra = torch.nn.Parameter(torch.ones(1))  # a name torch files elsewhere
    mem.register_buffer("scratch", torch.zeros(2))
    assert "scratch" in dict(mem.named_buffers())
    mem.scratch = torch.nn.Parameter(torch.ones(2))  # a buffer replaced by a parameter
    assert "scratch" not in dict(mem.named_buffers()) and "scratch" in dict(mem.named_parameters())
    del mem.scratch
    assert not hasattr(mem, "scratch")
    assert not isinstance(mem._buffers, dict) and set(mem.state_dict()) == set(SemanticScaleMemory(2, 4, 8).state_dict()) | {"extra"}


# ------------------------------------------------------- index-addressed mode
def test_index_addressed_memory_keeps_latest_embedding_per_index(gen, np_ref):
    M, d, C = 12, 3, 3
    mem = SemanticScaleMemory(C, d, M)
    model = {}
    total = 0
    for step in range(25):
        b = int(torch.randint(1, 6, (1,), generator=gen))
        idx = torch.randperm(M, generator=gen)[:b]
        emb, labels = _batch(gen, b, d, C)
        mem.enqueue(emb, labels, indices=idx)
        for i, e, l in zip(idx.tolist(), _unit64(emb), labels.tolist()):
            model[i] = (e, l)
        total += b
        assert mem.num_enqueued == total
        assert mem.fill_level == pytest.approx(len(model) / M)
        _assert_same_samples(mem, [e for e, _ in model.values()], [l for _, l in model.values()])
        z, y = mem.contents()
        want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
        np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-6, atol=1e-12)


def test_index_addressed_counts_every_enqueued_sample(gen):
    mem = SemanticScaleMemory(2, 3, 10, warmup_epochs=2)
    for _ in range(4):
        mem.enqueue(torch.randn(5, 3, generator=gen), torch.tensor([0, 1, 0, 1, 0]), indices=torch.arange(5))
    assert mem.num_enqueued == 20 and mem.num_filled == 5 and mem.stage == 3


@pytest.mark.parametrize("gram_size", [2, 40], ids=["moment form", "Gram form"])
def test_overwriting_samples_of_the_same_class_keeps_the_bookkeeping(gen, np_ref, gram_size):
    # once full, an index-addressed memory overwrites each slot with a sample of
    # the same class: the enqueue's short path keeps slot lists and positions
    M, d, C = 30, 5, 4
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1, gram_size=gram_size)
    sample_label = torch.arange(M) % C
    mem.enqueue(torch.randn(M, d, generator=gen), sample_label, indices=torch.arange(M))
    mem.scales()  # builds the statistics: later enqueues update them
    before = {k: getattr(mem, k).clone() for k in ("class_slots", "slot_position", "class_counts", "label_memory")}
    for _ in range(6):
        idx = torch.randperm(M, generator=gen)[:7]
        emb = torch.randn(7, d, generator=gen)
        mem.enqueue(emb, sample_label[idx], indices=idx)
        np.testing.assert_allclose(mem.embedding_memory[idx].numpy(), _unit64(emb), rtol=1e-6)
        for name, value in before.items():
            assert torch.equal(getattr(mem, name), value), name
        z, y = mem.contents()
        want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
        np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-9)
    # one sample changing class takes the general path: counts follow it
    mem.enqueue(torch.randn(1, d, generator=gen), torch.tensor([1]), indices=torch.tensor([0]))
    assert mem.class_counts.tolist() == [7, 9, 7, 7]
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-9)


def test_a_removed_sample_leaves_a_zero_gram_row_past_a_short_capacity(gen, np_ref):
    # slot lists hold 16 positions (2 x 40/5), gram_size is 20: the clear of a
    # removed sample's row and column stops at the capacity, which must still
    # reach the last position a class can hold
    M, d, C = 40, 3, 5
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1, gram_size=20)
    labels = torch.cat([torch.zeros(16, dtype=torch.long), torch.arange(1, C).repeat(6)])
    mem.enqueue(torch.randn(M, d, generator=gen), labels, indices=torch.arange(M))
    mem.scales()
    assert mem.class_slots.shape[1] == 16 < mem.gram_size
    assert int(mem.slot_position[15]) == 15 and bool(mem.gram[0, 15, :16].ne(0).all())
    mem.enqueue(torch.randn(1, d, generator=gen), torch.tensor([1]), indices=torch.tensor([15]))  # leaves class 0
    assert not bool(mem.gram[0, 15].any()) and not bool(mem.gram[0, :, 15].any())
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-9)


# ------------------------------------------------------------ scales, weights
def test_unfilled_slots_never_count(gen, np_ref):
    M, d, C = 50, 4, 3
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1)
    emb = torch.randn(9, d, generator=gen)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 0])
    mem.enqueue(emb, labels)
    assert mem.fill_level == pytest.approx(9 / M) and mem.num_filled == 9
    want = np_ref.class_scales(emb.double().numpy(), labels.numpy(), C)
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-6)
    assert float(mem.scales()[2]) == 0.0  # one sample: no scale
    # the same samples padded with origin points would give a smaller scale
    zeros = np.zeros((M - 9, d))
    with_origin = np_ref.semantic_scale(np.concatenate([_unit64(emb[labels == 0]), zeros]), normalize=False)
    assert abs(with_origin - want[0]) > 0.1


@pytest.mark.parametrize("normalize", ["mean", None])
def test_weights_follow_definitions(gen, np_ref, normalize):
    C, d, M = 5, 3, 30
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1, normalize=normalize)
    emb, labels = _batch(gen, 20, d, 4, probs=[0.5, 0.3, 0.15, 0.05])  # class 4 never seen
    labels[0] = 3
    labels[1:] = torch.where(labels[1:] == 3, torch.zeros_like(labels[1:]), labels[1:])  # class 3 once
    mem.enqueue(emb, labels)
    scales = np_ref.class_scales(_unit64(emb), labels.numpy(), C, normalize=False)
    counts = np.bincount(labels.numpy(), minlength=C)
    want = np_ref.dsb_weights(scales, counts, normalize)
    got = mem.weights()
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert got[3] == got.max() and got[4] == got.max()


def test_weights_are_ones_before_any_class_has_a_scale(gen):
    mem = SemanticScaleMemory(3, 4, 10)
    assert torch.equal(mem.weights(), torch.ones(3, dtype=torch.float64))
    mem.enqueue(torch.randn(3, 4, generator=gen), torch.tensor([0, 1, 2]))
    assert torch.equal(mem.scales(), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(mem.weights(), torch.ones(3, dtype=torch.float64))


def test_float32_scale_path_within_1e5(gen, np_ref):
    C, d, M = 3, 16, 120
    mem = SemanticScaleMemory(C, d, M, scale_dtype=torch.float32)
    emb, labels = _batch(gen, M, d, C, probs=[0.6, 0.3, 0.1])
    mem.enqueue(emb, labels)
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-5)


@pytest.mark.parametrize(
    "d, gram_size", [(16, None), (16, 2), (300, 2)], ids=["gram-form", "moment-form", "moment-form-d300"]
)
def test_float32_scale_of_identical_samples_is_zero(gen, np_ref, d, gram_size):
    """A class of identical samples spans nothing: float64 from scratch gives 0
    (within rounding, below eps) and so must float32, or the class would take
    all the weight (the log det of K + beta*I less n*log(beta) in float32 gave
    1e-6 to 6e-6 > eps)."""
    C, M = 3, 30
    labels = torch.arange(M) % C
    emb = torch.randn(M, d, generator=gen)
    emb[labels == 2] = torch.randn(d, generator=gen)
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1, scale_dtype=torch.float32, gram_size=gram_size)
    mem.enqueue(emb, labels)
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
    assert abs(want[2]) <= mem.eps
    scales = mem.scales()
    assert float(scales[2]) <= mem.eps
    np.testing.assert_allclose(scales[:2].numpy(), want[:2], rtol=1e-5)
    weights = mem.weights()  # no scale: the largest weight of the others, not all of it
    assert float(weights[2]) == float(weights[:2].max()) and float(weights[:2].min()) > 0.9


def _identical_class_history(case, gen):
    """(memory, batches): class 0 ends up holding copies of one vector after a
    history whose rounding the running statistics keep."""
    if case == "float32-gram-over-enqueues":  # Gram rows from differently shaped float32 products
        d, v = 33, torch.randn(1, 33, generator=gen)
        mem = SemanticScaleMemory(2, d, 40, warmup_epochs=1, scale_dtype=torch.float32)
        return mem, [(torch.cat([v.expand(2, d), torch.randn(2, d, generator=gen)]), torch.tensor([0, 0, 1, 1]))
                     for _ in range(12)]
    if case.startswith("unnormalised"):  # cancellation error grows with the squared norm
        d = 48
        v = torch.randn(1, d, generator=gen)
        v = v / v.norm() * 3000.0
        mem = SemanticScaleMemory(2, d, 60, warmup_epochs=1, l2_normalize=False, gram_size=8 if "gram" in case else 40)
        return mem, [(torch.cat([v.expand(3, d), torch.randn(3, d, generator=gen)]), torch.tensor([0, 0, 0, 1, 1, 1]))
                     for _ in range(12)]
    # a moment-form class that fills most of the memory for a while, empties, and comes back as 3 copies
    d, M, B = 48, 400, 40
    mem = SemanticScaleMemory(2, d, M, warmup_epochs=1)
    mostly_0 = torch.zeros(B, dtype=torch.long)
    mostly_0[:2] = 1
    batches = [(torch.randn(B, d, generator=gen), mostly_0) for _ in range(150)]
    batches += [(torch.randn(B, d, generator=gen), torch.ones(B, dtype=torch.long)) for _ in range(M // B + 1)]
    last, labels = torch.randn(B, d, generator=gen), torch.ones(B, dtype=torch.long)
    last[:3], labels[:3] = torch.randn(d, generator=gen), 0
    return mem, batches + [(last, labels)]


@pytest.mark.parametrize(
    "case", ["float32-gram-over-enqueues", "unnormalised-gram", "unnormalised-moments", "moment-class-emptied-refilled"]
)
def test_a_class_of_identical_samples_gets_no_scale_whatever_its_history(gen, np_ref, case):
    """The running statistics centre by cancellation: their rounding left such a
    class S ~ 1e-12 to 3e-7 > eps, and it took nearly all the weight
    ([2.0, 8e-8]). A scale that small is recomputed from the centred rows."""
    mem, batches = _identical_class_history(case, gen)
    for emb, labels in batches:
        mem.enqueue(emb, labels)
        scales = mem.scales()
        z, y = mem.contents()
        if int(mem.class_counts[0]) >= 2 and bool((z[y == 0] == z[y == 0][0]).all()):
            assert float(scales[0]) <= mem.eps
            assert torch.equal(mem.weights(), torch.ones(2, dtype=torch.float64))  # the largest weight, 1
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), 2, normalize=False)
    assert want[1] > 1 and abs(want[0]) <= mem.eps and bool((z[y == 0] == z[y == 0][0]).all())
    np.testing.assert_allclose(float(mem.scales()[1]), want[1], rtol=1e-5)


@pytest.mark.parametrize("l2_normalize, scale_dtype", [(False, torch.float64), (True, torch.float32)])
def test_a_class_of_exactly_two_identical_samples_gets_no_scale(gen, l2_normalize, scale_dtype):
    """Two copies are the fewest samples with a scale: a moment-form class
    (promoted by a batch of 4) later holding 2 copies of one vector kept
    S ~ 6e-8 > eps from its running statistics unless recomputed, and took all
    the weight ([2.0, 0.0])."""
    d, M = 48, 6
    norm = 1.0 if l2_normalize else 3000.0
    mem = SemanticScaleMemory(2, d, M, warmup_epochs=1, l2_normalize=l2_normalize, scale_dtype=scale_dtype,
                              gram_size=2)
    for step in range(12):
        if step % 2 == 0:
            emb, labels = torch.randn(M, d, generator=gen) * norm / d**0.5, torch.tensor([0, 0, 0, 0, 1, 1])
        else:
            v = torch.randn(1, d, generator=gen)
            emb = torch.cat([(v / v.norm() * norm).expand(2, d), torch.randn(4, d, generator=gen) * norm / d**0.5])
            labels = torch.tensor([0, 0, 1, 1, 1, 1])
        mem.enqueue(emb, labels)
        scales = mem.scales()
        if step % 2:
            assert int(mem.class_counts[0]) == 2 and bool(mem.moment_index[0] >= 0)
            assert float(scales[0]) <= mem.eps
            assert torch.equal(mem.weights(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("gram_size", [2, 40], ids=lambda v: f"gram_size={v}")
def test_unnormalised_class_of_one_direction_keeps_its_small_scale(gen, np_ref, gram_size):
    """l2_normalize=False: two samples along one direction, of norms 10 and
    10.001, have a small scale of their own (S ~ 1.4e-6, which the memory
    recomputes from the stored rows, being below 1e-4), not the 0 their
    directions alone would give."""
    d = 8
    v = torch.randn(1, d, generator=gen)
    v = 10.0 * v / v.norm()
    mem = SemanticScaleMemory(2, d, 6, warmup_epochs=1, l2_normalize=False, gram_size=gram_size)
    mem.enqueue(torch.cat([v, 1.0001 * v, torch.randn(3, d, generator=gen)]), torch.tensor([0, 0, 1, 1, 1]))
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), 2, normalize=False)
    assert 1e-7 < want[0] < 1e-4
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-6)


def test_float32_index_addressed_class_overwritten_by_one_sample_gets_no_scale():
    """An index-addressed Gram-form class of 128 samples (low-rank updates on
    CPU) rewritten, three at a time, with one vector: float32 products' rounding,
    carried by the float64 low-rank updates, left S = 1.1e-9 > eps and the class
    took all the weight ([2.0, 4.5e-10]). float32 Gram classes keep no cache."""
    def run(scale_dtype, d=10, M=200, big=128, k=3):
        torch.manual_seed(0)
        labels = torch.tensor([0] * big + [1] * (M - big))
        mem = SemanticScaleMemory(2, d, M, warmup_epochs=1, gram_size=150, scale_dtype=scale_dtype)
        for _ in range(2):  # the second exact refresh keeps the inverses
            mem.enqueue(torch.randn(M, d), labels, torch.arange(M))
            mem.scales()
        for identical in (False, True):
            v = torch.randn(1, d) if identical else None
            for start in range(0, big, k):
                idx = torch.arange(start, min(start + k, big))
                mem.enqueue(v.expand(len(idx), d) if identical else torch.randn(len(idx), d), labels[idx], idx)
                mem.scales()
        return mem

    float64 = run(torch.float64)
    assert bool(float64.cache_valid[0]) and float(float64.scales()[0]) <= float64.eps  # the low-rank path ran
    mem = run(torch.float32)
    assert not bool(mem.cache_valid[0])
    assert float(mem.scales()[0]) <= mem.eps
    assert mem.weights().tolist() == [1.0, 1.0]
    # nor when a checkpoint that kept one (an older release's, or a float64
    # memory's) is loaded into a float32 memory
    loaded = SemanticScaleMemory(2, 10, 200, warmup_epochs=1, gram_size=150, scale_dtype=torch.float32)
    loaded.load_state_dict(float64.state_dict())
    assert not bool(loaded.cache_valid[0])


@pytest.mark.slow
def test_scales_after_10000_updates_equal_from_scratch_float64(gen, np_ref):
    # gram_size=4: class 4 (every 20th sample) never holds more than 2 samples,
    # class 3 hovers around 4, classes 0-2 are large: every per-class form and
    # the switches between them are exercised.
    C, d, M, updates, gram_size = 5, 8, 40, 10_000, 4
    sizes = [1 + step % 3 for step in range(updates)]
    ends = np.cumsum(sizes)
    all_emb = torch.randn(int(ends[-1]), d, generator=gen)
    all_labels = _label_stream(gen, int(ends[-1]), [0.45, 0.3, 0.15, 0.1], rare_every=20)
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1, gram_size=gram_size)
    for step, (b, end) in enumerate(zip(sizes, ends), start=1):
        mem.enqueue(all_emb[end - b : end], all_labels[end - b : end])
        if step % 4 == 0:
            mem.scales()  # the refresh a stage-3 iteration does (refreshes are incremental)
        if step % 2500 == 0:
            scales = mem.scales()
            z, y = mem.contents()
            want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
            assert (want > 0).sum() >= C - 1  # the comparison covers real scales
            np.testing.assert_allclose(scales.numpy(), want, rtol=1e-9, atol=1e-12)
            # and the contents are the latest M samples (FIFO model: a slice)
            latest = slice(end - M, end)
            _assert_same_samples(mem, _unit64(all_emb[latest]), all_labels[latest].tolist())
            counts = np.bincount(y.numpy(), minlength=C)
            np.testing.assert_allclose(mem.weights().numpy(), np_ref.dsb_weights(want, counts), rtol=1e-9)
    assert mem.num_enqueued == int(ends[-1])


@pytest.mark.parametrize("gram_size", [2, 4, 40], ids=lambda v: f"gram_size={v}")
@pytest.mark.parametrize("indexed", [False, True], ids=["fifo", "indexed"])
def test_scales_equal_from_scratch_float64_in_every_form(gen, np_ref, gram_size, indexed):
    C, d, M = 4, 8, 40
    mem = SemanticScaleMemory(C, d, M, warmup_epochs=1, gram_size=gram_size)
    for step in range(60):
        b = 1 + step % 5
        emb = torch.randn(b, d, generator=gen)
        labels = _label_stream(gen, b, [0.6, 0.3, 0.1], rare_every=3)
        idx = torch.randperm(M, generator=gen)[:b] if indexed else None
        mem.enqueue(emb, labels, indices=idx)
        if step % 3 == 0:
            mem.scales()
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False)
    assert (want > 0).sum() >= C - 1
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-9, atol=1e-12)


def test_scales_refresh_only_what_changed_but_stay_exact(gen, np_ref):
    """Scales requested rarely (after many enqueues) or often agree with scratch."""
    C, d, M = 3, 4, 20
    mem = SemanticScaleMemory(C, d, M)
    for step in range(60):
        mem.enqueue(*_batch(gen, 3, d, C))
        if step % 7 == 0:
            mem.scales()
    z, y = mem.contents()
    np.testing.assert_allclose(
        mem.scales().numpy(), np_ref.class_scales(z.double().numpy(), y.numpy(), C, normalize=False), rtol=1e-9
    )


# ---------------------------------------------------------------- checkpoints
def _new_memory():
    return SemanticScaleMemory(4, 8, 64, warmup_epochs=2, gram_size=4)


def _grown_memory(gen):
    mem = _new_memory()
    initial = {k: v.shape for k, v in mem.state_dict().items()}
    for _ in range(20):
        mem.enqueue(torch.randn(5, 8, generator=gen), _label_stream(gen, 5, [0.85, 0.1, 0.05], rare_every=5))
    mem.scales()
    mem.enqueue(torch.randn(5, 8, generator=gen), torch.tensor([0, 0, 1, 3, 0]))  # leaves stale classes
    # precondition: some buffers outgrew their initial shape (the class 0 slot list)
    assert any(v.shape != initial[k] for k, v in mem.state_dict().items())
    return mem


def test_state_dict_round_trip_is_exact_after_capacity_growth(gen):
    mem = _grown_memory(gen)
    buf = io.BytesIO()
    torch.save(mem.state_dict(), buf)
    buf.seek(0)
    fresh = _new_memory()
    fresh.load_state_dict(torch.load(buf))
    _assert_state_equal(_state(mem), _state(fresh))
    assert (fresh.num_enqueued, fresh.stage, fresh.fill_level) == (mem.num_enqueued, mem.stage, mem.fill_level)
    for _ in range(30):
        batch = _batch(gen, 5, 8, 4, probs=[0.1, 0.1, 0.1, 0.7])  # class 3 grows past gram_size
        mem.enqueue(*batch)
        fresh.enqueue(*batch)
        assert torch.equal(mem.scales(), fresh.scales())
        assert torch.equal(mem.weights(), fresh.weights())
    _assert_state_equal(_state(mem), _state(fresh))


@pytest.mark.parametrize("built", [False, True], ids=["deferred-build", "statistics-kept"])
def test_a_class_past_twice_its_slot_capacity_in_one_batch(gen, np_ref, built):
    """10 classes share M = 100 slots: each slot list starts with 20 positions.
    One batch of 45 samples of class 0 needs more than twice that at once; the
    list must grow to the 45 needed (whether the statistics are built from the
    stored rows at the first scales() or kept since before the batch)."""
    mem = SemanticScaleMemory(10, 4, 100, warmup_epochs=1, gram_size=64)
    assert mem.class_slots.shape[1] == 20
    if built:
        mem.scales()
    labels = torch.cat([torch.zeros(45, dtype=torch.long), torch.arange(1, 10).repeat(2)])
    emb = torch.randn(len(labels), 4, generator=gen)
    mem.enqueue(emb, labels)
    z, y = mem.contents()
    want = np_ref.class_scales(z.double().numpy(), y.numpy(), 10, normalize=False)
    np.testing.assert_allclose(mem.scales().numpy(), want, rtol=1e-9, atol=1e-12)
    assert mem.class_slots.shape[1] >= 45 and int(mem.class_counts[0]) == 45


def test_every_piece_of_state_is_in_state_dict(gen):
    mem = _grown_memory(gen)
    fresh = _new_memory()
    fresh.load_state_dict(mem.state_dict())
    for a, b in zip(mem.contents(), fresh.contents()):
        assert torch.equal(a, b)
    # the counters live in the state_dict: a load resets them
    empty = _new_memory()
    mem.load_state_dict(empty.state_dict())
    assert mem.num_enqueued == 0 and mem.num_filled == 0 and mem.stage == 1
    assert mem.contents()[0].shape[0] == 0


def test_reset_empties_memory(gen):
    mem = _grown_memory(gen)
    mem.reset()
    fresh = _new_memory()
    assert mem.num_enqueued == 0 and mem.stage == 1 and mem.fill_level == 0.0
    assert torch.equal(mem.scales(), fresh.scales())
    batch = _batch(gen, 5, 8, 4)
    mem.enqueue(*batch)
    fresh.enqueue(*batch)
    assert mem.num_enqueued == 5
    # first in, first out from slot 0 again, as a fresh memory
    assert torch.equal(mem.label_memory, fresh.label_memory) and int(mem.queue_idx) == 5


# ------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_cuda_memory_matches_cpu(gen):
    cpu = SemanticScaleMemory(3, 4, 20)
    gpu = SemanticScaleMemory(3, 4, 20).cuda()
    for _ in range(8):
        emb, labels = _batch(gen, 4, 4, 3)
        cpu.enqueue(emb, labels)
        gpu.enqueue(emb.cuda(), labels.cuda())
    assert gpu.scales().device.type == "cuda"
    torch.testing.assert_close(gpu.scales().cpu(), cpu.scales(), rtol=1e-6, atol=1e-9)
