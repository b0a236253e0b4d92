"""DSBWeightingMixin, weight_losses_by_class, dsb_class_weights, with_dsb_weighting,
checked on every DSB loss against its PML parent (exact, uniform weights) and a
hand-written weighted formula mean_i(w[y_i] * parent_element_loss_i) in stage 3,
with w from float64 numpy over the memory's contents."""
import copy
import csv
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dsb_loss_testlib import (
    CASES,
    FifoModel,
    checkpoint_resume,
    leaf,
    make_pair,
    param_grads,
    randomize_parameters,
    run_metric_loss_only,
    unit64,
    zero_grads,
)
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers, regularizers

from pml_dsb import (
    DSBNormalizedSoftmaxLoss,
    DSBSoftTripleLoss,
    DSBWeightingMixin,
    SemanticScaleMemory,
    dsb_class_weights,
    weight_losses_by_class,
    with_dsb_weighting,
)

C, D = 4, 8
RECORDS = [
    "dsb_stage", "dsb_num_enqueued", "dsb_fill_level", "dsb_mean_scale",
    "dsb_min_scale", "dsb_max_scale", "dsb_min_weight", "dsb_max_weight",
]
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _batch(gen, b, d=D, probs=PROBS):
    return torch.randn(b, d, generator=gen), torch.multinomial(probs, b, replacement=True, generator=gen)


def _assert_same_loss_and_grads(dsb, parent, got, want, e1, e2):
    """Loss, embedding gradients and parameter gradients of ``dsb`` equal ``parent``'s exactly
    (for float64 embeddings the parent re-types its parameters to float64, the
    DSB loss keeps its float32 ones: their gradients are the parent's, rounded)."""
    assert got.dtype == want.dtype and torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(e1.grad, e2.grad)
    for a, b in zip(param_grads(dsb), param_grads(parent)):
        assert a.dtype == torch.float32 and torch.equal(a, b.to(a.dtype))


# ---------------------------------------------- uniform weights: parent exactly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_stages_1_and_2_equal_parent_exactly(case, dtype, gen):
    M, n, B = 16, 3, 6
    dsb, parent, _ = make_pair(case, gen, C, D, M, n)
    seen = set()
    while dsb.memory.num_enqueued + B < n * M:
        emb, labels = _batch(gen, B)
        e1, e2 = leaf(emb.to(dtype)), leaf(emb.to(dtype))
        got = dsb(e1, labels)
        want = parent(e2, labels)
        seen.add(dsb.memory.stage)
        assert dsb.memory.stage in (1, 2)
        _assert_same_loss_and_grads(dsb, parent, got, want, e1, e2)
        zero_grads(dsb, parent)
    assert seen == {1, 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_stage_3_with_equal_scales_equals_parent_exactly(case, dtype, classes, gen):
    M = 4 * classes
    dsb, parent, _ = make_pair(case, gen, classes, D, M, 1)
    v = torch.randn(4, D, generator=gen, dtype=dtype)
    emb = torch.cat([v] * classes)  # every class holds the same four vectors
    labels = torch.arange(classes).repeat_interleave(4)
    e1, e2 = leaf(emb), leaf(emb)
    got = dsb(e1, labels)
    assert dsb.memory.stage == 3
    assert torch.equal(dsb.memory.weights(), torch.ones(classes, dtype=torch.float64))  # precondition
    want = parent(e2, labels)
    _assert_same_loss_and_grads(dsb, parent, got, want, e1, e2)


# ------------------------------------------------- stage 3: weighted formula
@pytest.mark.parametrize("normalize", ["mean", None])
@pytest.mark.parametrize("case", list(CASES))
def test_stage_3_equals_hand_written_weighted_formula(case, normalize, gen, np_ref):
    M, n, B = 16, 1, 6
    dsb, _, element = make_pair(case, gen, C, D, M, n, normalize=normalize)
    model = FifoModel(M)
    checked = 0
    for _ in range(7):
        emb, labels = _batch(gen, B)
        e1, e2 = leaf(emb), leaf(emb)
        got = dsb(e1, labels)
        model.extend(emb, labels)
        assert dsb.memory.stage == model.stage(n)
        if model.stage(n) < 3:
            continue
        w = torch.tensor(model.weights(np_ref, C, normalize), dtype=torch.float32)
        assert w.max() / w.min() > 1.05  # the weights are not uniform: the check has teeth
        elem = element(e2, labels)["loss"]["losses"]
        assert elem.shape == (B,)
        want = (w[labels] * elem).mean()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.backward()
        want.backward()
        torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-6)
        for a, b in zip(param_grads(dsb), param_grads(element)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        zero_grads(dsb, element)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("case", list(CASES))
def test_weight_regularizer_loss_is_not_weighted(case, gen, np_ref):
    M, B = 12, 12
    reg_weight = 0.5
    dsb, _, element = make_pair(
        case, gen, C, D, M, 1,
        parent_kwargs=dict(weight_regularizer=regularizers.LpRegularizer(), weight_reg_weight=reg_weight),
    )
    emb, labels = _batch(gen, B)
    got = dsb(emb, labels)
    assert dsb.memory.stage == 3
    model = FifoModel(M)
    model.extend(emb, labels)
    w = torch.tensor(model.weights(np_ref, C), dtype=torch.float32)
    assert w.max() / w.min() > 1.05
    loss_dict = element(emb, labels)
    assert set(loss_dict) == {"loss", "weight_reg_loss"}
    (param,) = list(element.parameters())
    reg = regularizers.LpRegularizer()(param.t()) * reg_weight
    want = (w[labels] * loss_dict["loss"]["losses"]).mean() + reg
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- bad input
NAN = float("nan")


def _bad_calls(B=4, M=12):
    e = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    e_nan = e.clone()
    e_nan[1, 2] = NAN
    e_inf = e.clone()
    e_inf[0, 0] = float("inf")
    return {
        "labels-none": ((e,), {}, ValueError, ["labels"]),
        "label-too-large": ((e, torch.tensor([0, 1, 9, 3])), {}, ValueError, ["labels", "9"]),
        "label-negative": ((e, torch.tensor([0, -2, 1, 3])), {}, ValueError, ["labels", "-2"]),
        "label-float": ((e, y.float()), {}, TypeError, ["labels", "float32"]),
        "label-bool": ((e, y > 1), {}, TypeError, ["labels", "bool"]),
        "label-length": ((e, y[:3]), {}, ValueError, ["labels", "(3,)"]),
        "embedding-size": ((torch.randn(B, D + 2), y), {}, ValueError, ["embedding", str(D + 2)]),
        "embedding-list": ((e.tolist(), y), {}, TypeError, ["embeddings", "torch.Tensor", "list"]),
        "embedding-integer": ((e.long(), y), {}, TypeError, ["embeddings", "floating point", "int64"]),
        "embedding-nan": ((e_nan, y), {}, ValueError, ["embeddings", "NaN"]),
        "embedding-inf": ((e_inf, y), {}, ValueError, ["embeddings", "Inf"]),
        "empty-batch": ((torch.zeros(0, D), torch.zeros(0, dtype=torch.long)), {}, ValueError, ["embeddings", "empty"]),
        "batch-larger-than-memory": (
            (torch.randn(M + 1, D), torch.zeros(M + 1, dtype=torch.long)), {}, ValueError, [str(M + 1), "memory_size"],
        ),
        # a repeated index stores its last copy (a sampler drawing with replacement), but every row is read
        "sample-indices-repeated-nan-in-dropped-copy": (
            (e_nan, y), {"sample_indices": torch.tensor([1, 7, 2, 7])}, ValueError, ["embeddings", "NaN"]),
        "sample-indices-out-of-range": ((e, y), {"sample_indices": torch.tensor([1, M, 3, 2])}, ValueError, ["indices", str(M)]),
    }


def _used_loss(case, gen, M=12):
    """A DSB loss in stage 3 with cached scales and stale classes."""
    dsb, _, _ = make_pair(case, gen, C, D, M, 1)
    for _ in range(4):
        dsb(*_batch(gen, 5))
    dsb.memory.scales()
    dsb.memory.enqueue(*_batch(gen, 2))
    return dsb


@pytest.mark.parametrize("bad", list(_bad_calls()))
@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax", "arcface", "cosface"])
def test_bad_input_rejected_before_anything_changes(case, bad, gen):
    args, kwargs, exc, words = _bad_calls()[bad]
    dsb = _used_loss(case, gen)
    before = {k: v.clone() for k, v in dsb.state_dict().items()}
    records = {k: getattr(dsb, k) for k in RECORDS}
    with pytest.raises(exc) as info:
        dsb(*args, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"
    after = dsb.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape and torch.equal(before[k], after[k]), f"{k} changed"
    assert {k: getattr(dsb, k) for k in RECORDS} == records
    assert all(p.grad is None for p in dsb.parameters())


@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax", "arcface", "cosface"])
def test_float64_embeddings_beyond_float32_range_are_computed_as_the_parent_does(case, gen):
    """Such a batch once was cast to the float32 parameters, overflowed and was
    rejected; the parent computes it in float64, and so does the DSB loss, whose
    memory stores its L2-normalised (finite) rows."""
    dsb, parent, _ = make_pair(case, gen, C, D, 12, 2)
    emb, labels = _batch(gen, 4)
    emb = emb.double()
    emb[2, 1] = 1e39
    e1, e2 = leaf(emb), leaf(emb)
    _assert_same_loss_and_grads(dsb, parent, dsb(e1, labels), parent(e2, labels), e1, e2)
    stored, _ = dsb.memory.contents()
    np.testing.assert_allclose(stored.double().numpy(), unit64(emb), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax"])
def test_a_loss_cast_to_float64_trains_in_float64(case, gen, np_ref):
    """``loss.double()`` re-types the loss's parameters and reaches its memory,
    whose buffers keep their dtypes (it once failed at the first enqueue)."""
    M, B = 12, 6
    dsb, parent, _ = make_pair(case, gen, C, D, M, 1)
    dtypes = {k: v.dtype for k, v in dsb.memory.state_dict().items()}
    dsb.double()
    parent.double()
    assert all(p.dtype == torch.float64 for p in dsb.parameters())
    assert {k: v.dtype for k, v in dsb.memory.state_dict().items()} == dtypes
    model = FifoModel(M)
    for _ in range(4):
        emb, labels = _batch(gen, B)
        emb = emb.double()
        got, want = dsb(emb, labels), parent(emb, labels)
        model.extend(emb, labels)
        assert got.dtype == torch.float64
        if dsb.memory.stage < 3:
            assert torch.equal(got, want)
    assert dsb.memory.stage == 3
    # the model keeps float64 rows, the memory float32 ones
    np.testing.assert_allclose(dsb.memory.weights().numpy(), model.weights(np_ref, C), rtol=1e-6)


# ------------------------------------------------------ recordable attributes
@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax", "arcface", "cosface"])
def test_recordable_attributes(case, gen, np_ref):
    M, B = 16, 6
    names = RECORDS
    dsb, _, _ = make_pair(case, gen, C, D, M, 2)
    assert set(names) <= set(dsb._record_these)
    assert dsb.embedding_size == D
    model = FifoModel(M)
    unscaled_seen = 0
    for step in range(9):
        # the last two batches leave class 3 with at most one sample in memory: no scale
        emb, labels = _batch(gen, B, probs=PROBS if step < 6 else torch.tensor([0.4, 0.3, 0.3, 0.0]))
        dsb(emb, labels)
        model.extend(emb, labels)
        assert dsb.dsb_stage == model.stage(2)
        assert dsb.dsb_num_enqueued == model.enqueued
        assert dsb.dsb_fill_level == pytest.approx(len(model.labels) / M)
        stats = [getattr(dsb, n) for n in names[3:]]
        if model.stage(2) < 3:
            assert all(math.isnan(v) for v in stats)  # NaN: columns from the first logged iteration
            continue
        s = model.scales(np_ref, C)
        w = model.weights(np_ref, C)
        has = s[(np.bincount(model.labels, minlength=C) >= 2) & (s > 1e-12)]  # S = 0: no scale yet
        unscaled_seen += len(has) < C
        np.testing.assert_allclose(stats, [has.mean(), has.min(), has.max(), w.min(), w.max()], rtol=1e-6)
    assert model.stage(2) == 3 and unscaled_seen


@pytest.mark.parametrize("eps", [1e-12, 0.0])
@pytest.mark.parametrize("cls", [DSBSoftTripleLoss, DSBNormalizedSoftmaxLoss], ids=["soft_triple", "norm_softmax"])
def test_recorded_scales_leave_out_a_class_of_identical_samples(cls, eps, gen, np_ref):
    """A class of two identical samples has S = 0, "no scale yet" (DEFINITIONS):
    the recorded mean/min/max scale are over the other classes, and its weight
    is the largest of theirs. Also with eps = 0: a scale of 0 is at eps, not above it."""
    dsb = cls(num_classes=3, embedding_size=D, memory=SemanticScaleMemory(3, D, 8, warmup_epochs=1, eps=eps))
    same = torch.randn(1, D, generator=gen)
    emb = torch.cat([same, same, torch.randn(6, D, generator=gen)])
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    dsb(emb, labels)
    assert dsb.dsb_stage == 3
    s = np_ref.class_scales(emb.numpy(), labels.numpy(), 3)
    assert s[0] == pytest.approx(0.0, abs=1e-12)
    w = np_ref.dsb_weights(s, [2, 3, 3])
    np.testing.assert_allclose([dsb.dsb_mean_scale, dsb.dsb_min_scale, dsb.dsb_max_scale],
                               [s[1:].mean(), s[1:].min(), s[1:].max()], rtol=1e-6)
    np.testing.assert_allclose([dsb.dsb_min_weight, dsb.dsb_max_weight], [w.min(), w.max()], rtol=1e-6)
    assert w[0] == w.max()


def test_records_of_stage_3_return_to_nan_when_a_restored_memory_is_below_it(gen):
    """A memory restored from an earlier checkpoint may start below stage 3: the
    five stage-3 figures are then NaN again, not the last stage-3 values."""
    dsb = DSBSoftTripleLoss(C, D, centers_per_class=2, memory_size=8, warmup_epochs=1)
    fresh = {k: v.clone() for k, v in dsb.memory.state_dict().items()}
    emb, labels = torch.randn(8, D, generator=gen), torch.arange(8) % C
    dsb(emb, labels)
    assert dsb.dsb_stage == 3 and all(math.isfinite(getattr(dsb, n)) for n in RECORDS[3:])  # precondition
    dsb.memory.load_state_dict(fresh)
    dsb(emb[:4], labels[:4])
    assert (dsb.dsb_stage, dsb.dsb_num_enqueued) == (1, 4)
    assert [n for n in RECORDS[3:] if not math.isnan(getattr(dsb, n))] == []


def test_a_memory_subclass_weights_and_a_loss_subclass_records_are_their_own(gen):
    """A memory passed as memory= may override weights(): the loss weights by
    them (as dsb_class_weights does). A loss subclass may watch its records
    (a property setter): they are set through setattr."""

    class CappedMemory(SemanticScaleMemory):
        def weights(self, scales=None):
            return super().weights(scales).clamp(max=1.5)

    class Watched(DSBNormalizedSoftmaxLoss):
        seen = []

        @property
        def dsb_max_weight(self):
            return self.__dict__.get("_max_weight", math.nan)

        @dsb_max_weight.setter
        def dsb_max_weight(self, value):
            self.seen.append(value)
            self.__dict__["_max_weight"] = value

    memory = CappedMemory(3, D, 8, warmup_epochs=1)
    loss = Watched(num_classes=3, embedding_size=D, memory=memory)
    parent = pml_losses.NormalizedSoftmaxLoss(num_classes=3, embedding_size=D,
                                              reducer=reducers.DoNothingReducer())
    parent.load_state_dict({"W": loss.W.detach()})
    emb, labels = torch.randn(8, D, generator=gen), torch.tensor([0, 1, 1, 1, 2, 2, 2, 2])
    emb[4:] = emb[4] + 0.01 * emb[4:]  # class 2 tight: the largest weight, near 2
    got = loss(emb, labels)
    weights = memory.weights()
    assert float(weights.max()) == 1.5 and float(SemanticScaleMemory.weights(memory).max()) > 1.5
    want = (parent(emb, labels)["loss"]["losses"] * weights[labels].float()).mean()
    torch.testing.assert_close(got, want)
    assert loss.dsb_max_weight == 1.5 and Watched.seen[-1] == 1.5


def test_record_keeper_logs_dsb_stats(gen):
    record_keeper = pytest.importorskip("record_keeper")

    class Writer:
        def __init__(self):
            self.rows = {}

        def append(self, group, series, value, iteration):
            self.rows[(group, series)] = value

    dsb, _, _ = make_pair("soft_triple", gen, C, D, 8, 1)
    dsb(*_batch(gen, 8))
    writer = Writer()
    keeper = record_keeper.RecordKeeper(record_writer=writer, attributes_to_search_for=["_record_these", "_record_these_stats"])
    keeper.update_records({"metric_loss": dsb}, 1)
    logged = {series: value for (_, series), value in writer.rows.items()}
    assert logged["dsb_stage"] == 3 and logged["dsb_num_enqueued"] == 8
    assert logged["dsb_max_weight"] == pytest.approx(float(dsb.memory.weights().max()))


@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax"])
def test_pml_hook_container_logs_dsb_stats_and_not_the_memory(case, gen, tmp_path):
    """PML's own logging preset (record-keeper, CSV and tensorboard) through
    stages 1 to 3: the DSB figures are logged each iteration, the memory's
    buffers are not (record-keeper logs every tensor of every dict attribute
    of a loss's modules; the memory's would cost its whole state per logged
    iteration, and its empty pools made it raise)."""
    pytest.importorskip("record_keeper")
    pytest.importorskip("tensorboard")
    from pytorch_metric_learning.utils import logging_presets

    keeper, writer, _ = logging_presets.get_record_keeper(str(tmp_path / "csv"), str(tmp_path / "tensorboard"))
    hooks = logging_presets.get_hook_container(keeper, log_freq=1)
    loss, stages, _, _ = run_metric_loss_only(case, gen, iterations=6, end_of_iteration_hook=hooks.end_of_iteration_hook)
    # 16 samples per iteration, M = 32, warm-up 2 epochs: stage 3 from 64 samples on
    assert stages == [1, 2, 2, 3, 3, 3]
    (group,) = [g for g in writer.records if g == f"metric_loss_{type(loss).__name__}"]
    logged = {name: list(series.values()) for name, series in writer.records[group].items()}
    assert logged["dsb_stage"] == stages
    assert logged["dsb_num_enqueued"] == [16, 32, 48, 64, 80, 96]
    # NaN before stage 3, so that every column exists from the first row on
    assert [math.isnan(v) for v in logged["dsb_mean_scale"]] == [True] * 3 + [False] * 3
    assert logged["dsb_max_weight"][-1] == pytest.approx(float(loss.memory.weights().max()))
    buffers = {name for name, _ in loss.memory.named_buffers()}
    for name, series in writer.records.items():
        assert not buffers & set(series), f"memory buffers logged in {name}"
    keeper.save_records()  # the CSV and database writers take what was logged
    # record-keeper writes a CSV's header with its first row: the stage-3 columns
    # were missing from it, and their values fell under no header
    with open(tmp_path / "csv" / f"{group}.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(None not in row for row in rows)
    assert float(rows[-1]["dsb_max_weight"]) == pytest.approx(logged["dsb_max_weight"][-1])


# ------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax", "arcface", "cosface"])
def test_autocast_bf16_keeps_float32_parameters_and_scales(case, gen, np_ref):
    M, B = 12, 6
    dsb, _, _ = make_pair(case, gen, C, D, M, 1)
    shadow = SemanticScaleMemory(C, D, M, warmup_epochs=1)
    lin = torch.nn.Linear(5, D)
    params = {name: (p.data_ptr(), p.dtype) for name, p in dsb.named_parameters()}
    model = FifoModel(M)
    for _ in range(4):
        x = torch.randn(B, 5, generator=gen)
        labels = torch.multinomial(PROBS, B, replacement=True, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = lin(x)
            assert emb.dtype == torch.bfloat16
            out = dsb(emb, labels)
        out.backward()
        assert torch.isfinite(out)
        shadow.enqueue(emb.detach().float(), labels)  # the float32 computation, no autocast
        if shadow.stage == 3:
            shadow.scales()  # refreshed when the loss refreshes, so the two agree bit for bit
        model.extend(emb.detach().float(), labels)
        for name, p in dsb.named_parameters():
            assert (p.data_ptr(), p.dtype) == params[name] and p.dtype == torch.float32
            assert p.grad is not None and p.grad.dtype == torch.float32
        assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert dsb.memory.stage == 3
    assert dsb.memory.embedding_memory.dtype == torch.float32
    assert torch.equal(dsb.memory.scales(), shadow.scales())
    np.testing.assert_allclose(dsb.memory.scales().numpy(), model.scales(np_ref, C), rtol=1e-6)


@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax"])
def test_autocast_bf16_with_a_weight_regularizer_adds_the_float32_regularizer(case, gen):
    """The DSB loss keeps float32 parameters: under autocast, PML's RegularFace
    filled a bf16 product with float32's lowest value and raised an overflow."""
    dsb_cls, _, kwargs = CASES[case]
    emb, labels = _batch(gen, 6)
    plain = dsb_cls(C, D, memory_size=12, warmup_epochs=1, **kwargs)
    randomize_parameters(plain, gen)
    regularized = dsb_cls(C, D, memory_size=12, warmup_epochs=1, weight_regularizer=regularizers.RegularFaceRegularizer(),
                          weight_reg_weight=0.5, **kwargs)
    regularized.load_state_dict(plain.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, base = regularized(emb.bfloat16(), labels), plain(emb.bfloat16(), labels)
    weights = (regularized.fc if case == "soft_triple" else regularized.W).detach().t()  # as the parent passes them
    want = base + 0.5 * regularizers.RegularFaceRegularizer()(weights)  # float32, no autocast
    assert torch.isfinite(got)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["LargeMarginSoftmaxLoss", "SphereFaceLoss"])
def test_autocast_bf16_equals_the_parent_on_the_upcast_embeddings_for_losses_that_cast_their_tensors(name, gen):
    """The parent's cast_types makes its integer n_range and cos_powers floating;
    kept int64, a bf16 cosine ** cos_powers stayed bf16 under autocast (the
    parent's went float32) and the losses differed (20.7526 vs 20.7535)."""
    parent_cls = getattr(pml_losses, name)
    parent = parent_cls(C, D)
    randomize_parameters(parent, gen)
    dsb = with_dsb_weighting(parent_cls)(C, D, memory_size=100)
    state = dsb.state_dict()
    state.update(parent.state_dict())
    dsb.load_state_dict(state)
    x, labels = _batch(gen, 8)
    lin = torch.nn.Linear(D, D)
    lin2 = copy.deepcopy(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = dsb(lin(x), labels), parent(lin2(x).float(), labels)
    assert dsb.memory.stage == 1
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(lin.weight.grad, lin2.weight.grad)
    assert torch.equal(dsb.W.grad, parent.W.grad.to(dsb.W.dtype))


def test_class_weights_that_overflow_a_half_precision_cast_are_refused(gen):
    """Raw 1/S of a tight class (normalize=None) beyond float16's 65504 became inf:
    CrossEntropyLoss(weight=...) then gave NaN, a float16 DSB loss inf."""
    mem = SemanticScaleMemory(C, D, 8, warmup_epochs=1, normalize=None)
    base, labels = torch.randn(C, D, generator=gen), torch.arange(8) % C
    spread = torch.tensor([1e-3, 1.0, 1.0, 1.0])[labels, None]  # class 0 barely spread: S ~ 1e-5
    mem.enqueue(base[labels] + spread * torch.randn(8, D, generator=gen), labels)
    assert mem.stage == 3 and float(mem.weights().max()) > 65504  # precondition
    with pytest.raises(ValueError, match="overflow torch.float16"):
        dsb_class_weights(mem, dtype=torch.float16)
    assert torch.isfinite(dsb_class_weights(mem, dtype=torch.float32)).all()
    entry = {"loss": {"losses": torch.ones(8).half(), "indices": torch.arange(8), "reduction_type": "element"}}
    with pytest.raises(ValueError, match="overflow torch.float16"):
        weight_losses_by_class(entry, labels, mem.weights())


def test_class_weights_up_to_the_largest_finite_value_of_the_losses_dtype_are_accepted():
    """float16's largest finite value, 65504, casts exactly: a weight equal to it
    does not overflow (the float64 products are the reference); one above it does."""
    labels = torch.tensor([0, 1, 1])
    largest = torch.finfo(torch.float16).max
    for weights in (torch.tensor([largest, 0.5], dtype=torch.float64), torch.tensor([largest, 0.5])):
        entry = {"loss": {"losses": torch.ones(3, dtype=torch.float16), "indices": torch.arange(3),
                          "reduction_type": "element"}}
        got = weight_losses_by_class(entry, labels, weights)["loss"]["losses"]
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert torch.equal(got.double(), torch.tensor([largest, 0.5, 0.5], dtype=torch.float64))
    above = torch.tensor([math.nextafter(largest, math.inf), 0.5], dtype=torch.float64)
    entry = {"loss": {"losses": torch.ones(3, dtype=torch.float16), "indices": torch.arange(3),
                      "reduction_type": "element"}}
    with pytest.raises(ValueError, match="overflow torch.float16"):
        weight_losses_by_class(entry, labels, above)


# ------------------------------------------------------ memory construction
def test_shared_memory_and_update_memory_false(gen, np_ref):
    mem = SemanticScaleMemory(C, D, 16, warmup_epochs=1)
    a = CASES["soft_triple"][0](C, D, memory=mem, centers_per_class=2)
    b = CASES["norm_softmax"][0](C, D, memory=mem, update_memory=False)
    assert a.memory is mem and b.memory is mem
    for _ in range(3):
        emb, labels = _batch(gen, 6)
        a(emb, labels)
        b(emb, labels)
    assert mem.num_enqueued == 18
    assert b.dsb_stage == 3 and b.dsb_num_enqueued == 18


def test_sample_indices_make_the_memory_index_addressed(gen):
    M = 10
    dsb = CASES["norm_softmax"][0](C, D, memory_size=M, warmup_epochs=1)
    latest = {}
    for _ in range(6):
        idx = torch.randperm(M, generator=gen)[:4]
        emb, labels = _batch(gen, 4)
        dsb(emb, labels, sample_indices=idx)
        for i, e, l in zip(idx.tolist(), unit64(emb), labels.tolist()):
            latest[i] = (e, l)
    stored, stored_labels = dsb.memory.contents()
    assert len(stored_labels) == len(latest)
    want = sorted((l, tuple(np.round(e, 5))) for e, l in latest.values())
    got = sorted((int(l), tuple(np.round(e, 5))) for e, l in zip(stored.double().numpy(), stored_labels))
    assert got == want


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(), ValueError, ["memory_size"]),
        (dict(memory_size=0), ValueError, ["memory_size", "0"]),
        (dict(memory=object()), TypeError, ["memory", "object"]),
        (dict(memory=SemanticScaleMemory(C + 1, D, 10)), ValueError, ["num_classes", str(C + 1)]),
        (dict(memory=SemanticScaleMemory(C, D + 1, 10)), ValueError, ["embedding_size", str(D + 1)]),
        (dict(memory=SemanticScaleMemory(C, D, 10), memory_size=11), ValueError, ["memory_size", "11"]),
        (dict(memory_size=10, normalize="median"), ValueError, ["normalize", "median"]),
        (dict(memory=SemanticScaleMemory(C, D, 10), warmup_epochs=1), ValueError, ["warmup_epochs=1", "5"]),
        (dict(memory=SemanticScaleMemory(C, D, 10), normalize=None), ValueError, ["normalize=None", "'mean'"]),
        (dict(memory=SemanticScaleMemory(C, D, 10, normalize=None), normalize="mean"), ValueError, ["normalize", "None"]),
    ],
    ids=["no-memory-size", "M=0", "not-a-memory", "memory-classes", "memory-size-d", "memory-size-conflict", "normalize",
         "memory-warmup-conflict", "memory-normalize-conflict", "memory-normalize-none-conflict"],
)
def test_bad_constructor_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        CASES["norm_softmax"][0](C, D, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_memory_options_default_to_the_memory_and_may_repeat_its_own():
    memory = SemanticScaleMemory(C, D, 10, warmup_epochs=2, normalize=None)
    for kwargs in ({}, dict(memory_size=10, warmup_epochs=2, normalize=None)):
        loss = CASES["norm_softmax"][0](C, D, memory=memory, **kwargs)
        assert loss.memory is memory and (memory.warmup_epochs, memory.normalize) == (2, None)
    fresh = CASES["norm_softmax"][0](C, D, memory_size=10)
    assert (fresh.memory.warmup_epochs, fresh.memory.normalize) == (5, "mean")  # DEFINITIONS' defaults
    fresh = CASES["norm_softmax"][0](C, D, memory_size=10, warmup_epochs=0, normalize=None)
    assert (fresh.memory.warmup_epochs, fresh.memory.normalize) == (0, None)


@pytest.mark.parametrize("case", ["soft_triple", "norm_softmax"])
def test_num_classes_below_two_rejected(case):
    with pytest.raises(ValueError, match="num_classes"):
        CASES[case][0](1, D, memory_size=10)


# ---------------------------------------------------------- with_dsb_weighting
def test_with_dsb_weighting_builds_a_subclass():
    cls = with_dsb_weighting(pml_losses.CosFaceLoss)
    assert cls.__name__ == "DSBCosFaceLoss"
    assert issubclass(cls, DSBWeightingMixin) and issubclass(cls, pml_losses.CosFaceLoss)
    assert cls.__mro__[1] is DSBWeightingMixin
    with pytest.raises(TypeError, match="loss_class"):
        with_dsb_weighting(pml_losses.CosFaceLoss(C, D))


class _UserDSBArcFace(with_dsb_weighting(pml_losses.ArcFaceLoss)):
    """A user's subclass of a built class: pickled by its own module and name."""


@pytest.mark.parametrize("how", ["pickle", "torch.save", "subclass"])
def test_with_dsb_weighting_losses_pickle_whole_and_resume_identically(how, gen):
    import io
    import pickle

    cls = _UserDSBArcFace if how == "subclass" else with_dsb_weighting(pml_losses.ArcFaceLoss)
    assert with_dsb_weighting(pml_losses.ArcFaceLoss) is with_dsb_weighting(pml_losses.ArcFaceLoss)
    loss = cls(C, D, memory_size=12, warmup_epochs=1)
    randomize_parameters(loss, gen)
    for _ in range(4):  # past 2M enqueued samples: weighted (stage 3)
        loss(*_batch(gen, 6))
    assert loss.memory.stage == 3
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(loss, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
    else:
        restored = pickle.loads(pickle.dumps(loss))
    assert type(restored) is cls and restored.memory is not loss.memory
    for _ in range(3):
        batch = _batch(gen, 6)
        assert torch.equal(restored(*batch), loss(*batch))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), loss.state_dict().values()))


# PML losses that are not classification losses: pair, triplet and
# per-sample losses without num_classes, and proxy losses indexed by class
OTHER_LOSSES = {
    "triplet": (pml_losses.TripletMarginLoss, {"margin": 0.3}),
    "contrastive": (pml_losses.ContrastiveLoss, {"neg_margin": 0.8}),
    "multi_similarity": (pml_losses.MultiSimilarityLoss, {}),
    "subcenter_arcface": (pml_losses.SubCenterArcFaceLoss, {"sub_centers": 2}),
    "proxy_anchor": (pml_losses.ProxyAnchorLoss, {}),
    "large_margin_softmax": (pml_losses.LargeMarginSoftmaxLoss, {}),
    "margin": (pml_losses.MarginLoss, {"margin": 0.3}),  # num_classes not given: PML's one beta
    # one learned beta, as in PML; its regulariser comes already reduced, unweighted
    "margin_learn_beta": (pml_losses.MarginLoss, {"learn_beta": True, "nu": 0.1}),
    "nca": (pml_losses.NCALoss, {}),  # element losses of some samples only
    "proxy_nca": (pml_losses.ProxyNCALoss, {}),  # integer proxy_labels
    # (N, 1) or (P, 1) columns of losses: weights must scale rows, not broadcast
    "circle": (pml_losses.CircleLoss, {}),
    "lifted_structure": (pml_losses.LiftedStructureLoss, {}),
    "generalized_lifted_structure": (pml_losses.GeneralizedLiftedStructureLoss, {}),
    "tuplet_margin": (pml_losses.TupletMarginLoss, {}),
    "angular": (pml_losses.AngularLoss, {}),
}


def _other_pair(name, gen, M, n, reducer=None):
    parent_cls, kwargs = OTHER_LOSSES[name]
    if reducer is not None:
        kwargs = {**kwargs, "reducer": reducer}
    takes = {"subcenter_arcface": 2, "proxy_anchor": 2, "large_margin_softmax": 2, "proxy_nca": 2}
    given = dict(list({"num_classes": C, "embedding_size": D}.items())[: takes.get(name, 0)])
    parent = parent_cls(**given, **kwargs)
    randomize_parameters(parent, gen)
    dsb = with_dsb_weighting(parent_cls)(C, D, memory_size=M, warmup_epochs=n, **kwargs)
    dsb.load_state_dict({**dsb.state_dict(), **parent.state_dict()})
    return dsb, parent


@pytest.mark.parametrize("name", list(OTHER_LOSSES))
def test_other_pml_losses_keep_their_arguments_and_equal_the_parent_before_stage_3(name, gen):
    """num_classes and embedding_size go to the memory, and to the parent only
    where it takes them: passed by position they once became a triplet loss's
    margin and swap."""
    dsb, parent = _other_pair(name, gen, 16, 2)
    for key, value in OTHER_LOSSES[name][1].items():
        assert getattr(dsb, key) == value
    if name == "subcenter_arcface":
        assert dsb.num_classes == C and dsb.W.shape == parent.W.shape
    for _ in range(4):  # 24 of 32 samples: stages 1 and 2
        emb, labels = _batch(gen, 6)
        e1, e2 = leaf(emb), leaf(emb)
        _assert_same_loss_and_grads(dsb, parent, dsb(e1, labels), parent(e2, labels), e1, e2)
        zero_grads(dsb, parent)
    assert dsb.memory.stage == 2


@pytest.mark.parametrize("name", list(OTHER_LOSSES))
def test_other_pml_losses_are_weighted_by_anchor_or_class_in_stage_3(name, gen):
    dsb, parent = _other_pair(name, gen, 8, 1, reducer=reducers.DoNothingReducer())
    emb, labels = _batch(gen, 8, probs=torch.tensor([0.4, 0.3, 0.2, 0.1]))
    got = dsb(emb, labels)
    assert dsb.memory.stage == 3
    w = dsb.memory.weights().float()
    assert not torch.allclose(w, torch.ones_like(w))  # precondition: weights that tell
    want = parent(emb, labels)
    by_class = name in ("proxy_anchor", "proxy_anchor_subclass")  # one loss per proxy: its class's weight
    for key, entry in want.items():
        if entry["reduction_type"] == "already_reduced":
            continue
        index = entry["indices"] if entry["reduction_type"] == "element" else entry["indices"][0]
        factor = w[index] if by_class else w[labels[index]]
        factor = factor.reshape(-1, *[1] * (entry["losses"].dim() - 1))  # one weight per row
        assert got[key]["losses"].shape == entry["losses"].shape
        torch.testing.assert_close(got[key]["losses"], entry["losses"] * factor, rtol=1e-6, atol=0)


def test_margin_loss_per_class_betas_on_request_and_their_regulariser_stays_unweighted(gen):
    """PML's MarginLoss(learn_beta=True) learns one beta unless given num_classes;
    the DSB form keeps that default, and a subclass naming num_classes gets one
    beta per class. The beta regulariser is then per anchor: never weighted."""
    single = with_dsb_weighting(pml_losses.MarginLoss)(C, D, memory_size=8, learn_beta=True)
    assert single.beta.shape == pml_losses.MarginLoss(learn_beta=True).beta.shape == (1,)

    class PerClassBetas(DSBWeightingMixin, pml_losses.MarginLoss):
        dsb_parent_gets = ("num_classes",)

    kwargs = {"learn_beta": True, "nu": 0.1, "reducer": reducers.DoNothingReducer()}
    dsb = PerClassBetas(C, D, memory_size=8, warmup_epochs=1, **kwargs)
    parent = pml_losses.MarginLoss(num_classes=C, **kwargs)
    randomize_parameters(parent, gen)
    dsb.load_state_dict({**dsb.state_dict(), **parent.state_dict()})
    assert dsb.beta.shape == (C,)
    emb, labels = _batch(gen, 8, probs=torch.tensor([0.4, 0.3, 0.2, 0.1]))
    got, want = dsb(emb, labels), parent(emb, labels)
    w = dsb.memory.weights().float()
    assert dsb.memory.stage == 3 and not torch.allclose(w, torch.ones_like(w))
    margin, reg = want["margin_loss"], want["beta_reg_loss"]
    assert reg["reduction_type"] == "element" and reg["losses"].numel() > 0  # precondition: a loss to weight
    torch.testing.assert_close(got["margin_loss"]["losses"], margin["losses"] * w[labels[margin["indices"][0]]])
    assert torch.equal(got["beta_reg_loss"]["losses"], reg["losses"])


@pytest.mark.parametrize("emb_dtype, loss_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_ref_emb_is_cast_with_the_embeddings(emb_dtype, loss_dtype, gen):
    """A parent with parameters computes distances between embeddings and
    ref_emb: both take the widest dtype (before, only the embeddings did and
    the distance raised a dtype mismatch)."""
    dsb = with_dsb_weighting(pml_losses.MarginLoss)(C, D, memory_size=64, learn_beta=True).to(loss_dtype)
    parent = pml_losses.MarginLoss(learn_beta=True).to(loss_dtype)
    (emb, labels), (ref, ref_labels) = _batch(gen, 8), _batch(gen, 8)
    e1, e2 = leaf(emb.to(emb_dtype)), leaf(emb.to(emb_dtype).to(loss_dtype))
    got = dsb(e1, labels, None, ref.to(emb_dtype), ref_labels)
    want = parent(e2, labels, None, ref.to(emb_dtype).to(loss_dtype), ref_labels)
    assert dsb.memory.stage == 1 and got.dtype == loss_dtype
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(e1.grad, e2.grad.to(emb_dtype))
    # PML's CrossBatchMemory passes its queue as ref_emb, cast to the batch's dtype
    from pml_dsb import DSBCrossBatchMemory

    wrapper = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.MarginLoss)(C, D, memory_size=64, learn_beta=True),
                                  embedding_size=D, memory_size=32).to(loss_dtype)
    for _ in range(2):
        emb, labels = _batch(gen, 8)
        assert torch.isfinite(wrapper(emb.to(emb_dtype), labels))


@pytest.mark.parametrize(
    "parent_cls, emb_dtype, label_dtype",
    [(pml_losses.NTXentLoss, torch.float32, torch.int32), (pml_losses.SupConLoss, torch.float32, torch.int32),
     (pml_losses.MarginLoss, torch.float16, torch.int64)],
)
def test_ref_that_is_the_batch_itself_stays_the_batch_after_the_casts(parent_cls, emb_dtype, label_dtype, gen):
    """PML reads ``ref_emb is embeddings`` / ``ref_labels is labels`` as "no
    reference set" (a sample is then not its own positive pair). The int64 cast
    of the labels and the dtype cast of the embeddings made new tensors: NTXent
    gave 1.856 for the parent's 2.916 (int32 labels), a float16 batch 'a
    reference set' that the loss did not support."""
    kwargs = {"learn_beta": True} if parent_cls is pml_losses.MarginLoss else {}
    dsb = with_dsb_weighting(parent_cls)(C, D, memory_size=64, **kwargs)
    parent = parent_cls(**kwargs)
    emb, labels = _batch(gen, 8)
    emb, labels = emb.to(emb_dtype), labels.to(label_dtype)
    e1, e2 = leaf(emb), leaf(emb.float())  # the parent with learn_beta computes in float32 (its beta's dtype)
    got = dsb(e1, labels, None, e1, labels)
    long_labels = labels.long()
    want = parent(e2, long_labels, None, e2, long_labels)
    assert dsb.memory.stage == 1 and torch.equal(got, want)
    # and equal to the call without a reference set
    assert torch.equal(got, parent(e2, long_labels))
    got.backward()
    want.backward()
    assert torch.equal(e1.grad, e2.grad.to(emb_dtype))


def test_a_parent_naming_optional_sizes_gets_the_dsb_losss_own():
    """Optional num_classes / embedding_size of a user's parent take the DSB
    loss's values, not the parent's defaults (a silent 100-way softmax)."""

    class MyProxyLoss(pml_losses.BaseMetricLossFunction):
        def __init__(self, num_classes=100, embedding_size=128, **kwargs):
            super().__init__(**kwargs)
            self.W = torch.nn.Parameter(torch.randn(embedding_size, num_classes))

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            losses = F.cross_entropy(embeddings @ self.W, labels, reduction="none")
            return {"loss": {"losses": losses, "indices": torch.arange(len(labels)), "reduction_type": "element"}}

    loss = with_dsb_weighting(MyProxyLoss)(C, D, memory_size=8)
    assert loss.W.shape == (D, C)


def test_sizes_reach_the_parameters_they_name_whatever_their_place():
    """Extra positional arguments go after the sizes only where the parent's
    positional parameters begin with them; MarginLoss's optional num_classes
    alone is withheld, not a subclass's required one."""

    class Optional_(pml_losses.BaseMetricLossFunction):
        def __init__(self, margin=0.1, num_classes=100, embedding_size=128, **kwargs):
            super().__init__(**kwargs)
            self.margin, self.sizes = margin, (num_classes, embedding_size)

    class Reversed(pml_losses.BaseMetricLossFunction):
        def __init__(self, embedding_size, num_classes, scale=1.0, **kwargs):
            super().__init__(**kwargs)
            self.scale, self.sizes = scale, (num_classes, embedding_size)

    class PerClassMargin(pml_losses.MarginLoss):
        def __init__(self, num_classes, margin=0.2, **kwargs):
            super().__init__(margin=margin, learn_beta=True, num_classes=num_classes, **kwargs)

    opt = with_dsb_weighting(Optional_)(C, D, 0.3, memory_size=8)
    assert (opt.margin, opt.sizes) == (0.3, (C, D))
    rev = with_dsb_weighting(Reversed)(C, D, 2.0, memory_size=8)
    assert (rev.scale, rev.sizes) == (2.0, (C, D))
    assert with_dsb_weighting(PerClassMargin)(C, D, 0.5, memory_size=8).beta.shape == (C,)
    assert with_dsb_weighting(pml_losses.MarginLoss)(C, D, 0.5, memory_size=8).margin == 0.5


def test_smooth_ap_losses_are_weighted_under_the_key_the_parent_returns(gen):
    """SmoothAPLoss names its loss "loss" in _sub_loss_names() but returns "ap_loss"."""
    kwargs = {"reducer": reducers.DoNothingReducer()}
    dsb = with_dsb_weighting(pml_losses.SmoothAPLoss)(C, D, memory_size=8, warmup_epochs=1, **kwargs)
    parent = pml_losses.SmoothAPLoss(**kwargs)
    emb = torch.randn(8, D, generator=gen)
    dsb(emb, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))  # fills the memory: stage 3 from the next call
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    got, want = dsb(emb, labels), parent(emb, labels)
    w = dsb.memory.weights().float()
    assert dsb.memory.stage == 3 and not torch.allclose(w[labels], torch.ones(8))
    entry = want["ap_loss"]
    assert entry["reduction_type"] == "element"
    factor = w[labels[entry["indices"]]].reshape(-1, *[1] * (entry["losses"].dim() - 1))
    torch.testing.assert_close(got["ap_loss"]["losses"], entry["losses"] * factor)


@pytest.mark.parametrize("parent_cls", [pml_losses.HistogramLoss, pml_losses.PNPLoss])
def test_parents_with_already_reduced_losses_raise_at_the_first_call_memory_unchanged(parent_cls, gen):
    """Nothing per sample to weight: said at the first call, in stage 1, before
    the enqueue (not epochs later when stage 3 begins)."""
    loss = with_dsb_weighting(parent_cls)(C, D, memory_size=8, warmup_epochs=1)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    emb, labels = _batch(gen, 6)
    with pytest.raises(TypeError, match=r"cannot weight loss 'loss'.*reduction_type 'already_reduced'"):
        loss(emb, labels)
    assert loss.memory.num_enqueued == 0
    assert all(torch.equal(v, loss.state_dict()[k]) for k, v in before.items())


def test_column_losses_under_the_mean_reducer_equal_the_weighted_mean(gen):
    # MultiSimilarityLoss returns a (N, 1) column: the weighted loss is the mean
    # of w[y_i] * l_i, not mean(l) * mean(w) as a broadcast (N, N) product gave
    dsb, parent = _other_pair("multi_similarity", gen, 8, 1)
    emb, labels = _batch(gen, 8, probs=torch.tensor([0.4, 0.3, 0.2, 0.1]))
    e1 = leaf(emb.double())
    got = dsb(e1, labels)
    w = dsb.memory.weights()
    raw = parent.compute_loss(emb.double(), labels, None, emb.double(), labels)["loss"]
    want = (raw["losses"].reshape(-1) * w[labels[raw["indices"]]])
    want = want[want > 0].mean()  # MultiSimilarity's default reducer: AvgNonZeroReducer
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_a_mixin_subclass_of_proxy_anchor_weights_its_losses_by_class():
    class Mine(DSBWeightingMixin, pml_losses.ProxyAnchorLoss):
        pass

    class Told(DSBWeightingMixin, pml_losses.ProxyAnchorLoss):
        dsb_element_indices = "samples"  # a subclass's own choice stays

    class Inherits(Told):
        pass

    assert Mine.dsb_element_indices == "classes" and Told.dsb_element_indices == "samples"
    assert Inherits.dsb_element_indices == "samples"
    assert with_dsb_weighting(pml_losses.ProxyAnchorLoss).dsb_element_indices == "classes"
    assert with_dsb_weighting(pml_losses.ArcFaceLoss).dsb_element_indices == "samples"


def test_float64_call_runs_forward_hooks_once(gen):
    dsb, _, _ = make_pair("norm_softmax", gen, C, D, 12, 1)
    fired = []
    dsb.register_forward_pre_hook(lambda *_: fired.append("pre"))
    dsb.register_forward_hook(lambda *_: fired.append("post"))
    emb, labels = _batch(gen, 4)
    dsb(emb.double(), labels)
    assert fired == ["pre", "post"] and dsb.memory.num_enqueued == 4
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in dsb.parameters())


def test_weight_losses_by_class_element_losses_of_some_samples_or_of_classes():
    labels = torch.tensor([0, 1, 1])
    w = torch.tensor([2.0, 4.0, 8.0, 16.0])
    # a loss for some samples only (FastAP, NCA, NPairs): each by its sample's label
    some = {"loss": {"losses": torch.ones(2), "indices": torch.tensor([0, 2]), "reduction_type": "element"}}
    assert torch.equal(weight_losses_by_class(some, labels, w)["loss"]["losses"], torch.tensor([2.0, 4.0]))
    # one loss per class (ProxyAnchor): indices past the batch are no samples
    per_class = {"loss": {"losses": torch.ones(4), "indices": torch.arange(4), "reduction_type": "element"}}
    with pytest.raises(ValueError, match="indexed by 4 values up to 3, not by samples of the batch of 3"):
        weight_losses_by_class(per_class, labels, w)
    out = weight_losses_by_class(per_class, labels, w, element_indices="classes")
    assert torch.equal(out["loss"]["losses"], w)
    with pytest.raises(ValueError, match="element_indices must be 'samples' or 'classes', got 'rows'"):
        weight_losses_by_class(per_class, labels, w, element_indices="rows")


# ------------------------------------------------------ weight_losses_by_class
def test_weight_losses_by_class_matches_class_weighted_reducer(gen):
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    w = torch.tensor([0.5, 2.0, 1.25])
    losses = torch.rand(6, generator=gen)
    a1, p, a2, n = torch.tensor([0, 1, 3]), torch.tensor([4, 3, 1]), torch.tensor([5, 2, 0]), torch.tensor([1, 0, 3])
    entries = {
        "element": (losses, torch.arange(6)),
        "pos_pair": (losses[:3], (a1, p)),
        "neg_pair": (losses[3:], (a2, n)),
        "triplet": (losses[:3], (a1, p, n)),
    }
    emb = torch.zeros(6, 2)
    for kind, (l, idx) in entries.items():
        entry = {"loss": {"losses": l.clone(), "indices": idx, "reduction_type": kind}}
        weighted = weight_losses_by_class(entry, labels, w)["loss"]
        anchor = idx if kind == "element" else idx[0]
        torch.testing.assert_close(weighted["losses"], l * w[labels[anchor]], rtol=0, atol=0)
        mean_of_weighted = reducers.MeanReducer()({"loss": weighted}, emb, labels)
        pml = reducers.ClassWeightedReducer(w)({"loss": {"losses": l, "indices": idx, "reduction_type": kind}}, emb, labels)
        torch.testing.assert_close(mean_of_weighted, pml)


def test_weight_losses_by_class_names_zero_loss_and_already_reduced():
    labels = torch.tensor([0, 1])
    d = {
        "loss": {"losses": torch.ones(2), "indices": torch.arange(2), "reduction_type": "element"},
        "reg": {"losses": torch.tensor(3.0), "indices": None, "reduction_type": "already_reduced"},
    }
    out = weight_losses_by_class(d, labels, torch.tensor([2.0, 4.0]), names=["loss"])
    assert torch.equal(out["loss"]["losses"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["reg"]["losses"], torch.tensor(3.0))
    with pytest.raises(ValueError, match="already_reduced"):
        weight_losses_by_class(d, labels, torch.tensor([2.0, 4.0]))
    zero = {"loss": {"losses": 0, "indices": None, "reduction_type": "element"}}
    assert weight_losses_by_class(zero, labels, torch.tensor([2.0, 4.0]))["loss"]["losses"] == 0


# ------------------------------------------------------------ dsb_class_weights
def test_dsb_class_weights_for_cross_entropy(gen, np_ref):
    M, n = 12, 2
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=n)
    model = FifoModel(M)
    for _ in range(5):
        emb, labels = _batch(gen, 6)
        mem.enqueue(emb, labels)
        model.extend(emb, labels)
        w = dsb_class_weights(mem)
        assert w.dtype == torch.float32 and w.shape == (C,)
        if model.stage(n) < 3:
            assert torch.equal(w, torch.ones(C))
            continue
        np.testing.assert_allclose(w.numpy(), model.weights(np_ref, C), rtol=1e-6)
        logits = torch.randn(6, C, generator=gen)
        ce = F.cross_entropy(logits, labels, weight=w, reduction="none").mean()
        manual = (-w[labels] * torch.log_softmax(logits, 1)[torch.arange(6), labels]).mean()
        torch.testing.assert_close(ce, manual)
    assert model.stage(n) == 3
    assert dsb_class_weights(mem, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_in_stage_2_resumes_with_identical_losses(case, gen):
    uninterrupted, resumed, without_memory, stages, loss, loss2 = checkpoint_resume(case, gen)
    assert len(resumed) == 50 and stages[0] == 2 and stages[-1] == 3
    for i, (a, b) in enumerate(zip(uninterrupted, resumed)):
        assert torch.equal(a, b), f"iteration {i} after the checkpoint"
    a, b = loss.state_dict(), loss2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # control: resuming without the memory changes the stage-3 losses
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, without_memory))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")  # PML's progress bar
@pytest.mark.parametrize("case", list(CASES))
def test_metric_loss_only_trainer(case, gen):
    loss, stages, values, before = run_metric_loss_only(case, gen, iterations=5, batch_size=16)
    assert loss.memory.num_enqueued == 5 * 16
    assert stages == [1, 2, 2, 3, 3]  # M = 32, warmup_epochs = 2
    assert np.all(np.isfinite(values))
    assert any(not torch.equal(b, p) for b, p in zip(before, loss.parameters()))


# non-default parent arguments for each loss (the CASES use the defaults)
_NON_DEFAULT = {
    "soft_triple": dict(centers_per_class=2, la=15, gamma=0.2, margin=0.05),
    "norm_softmax": dict(temperature=0.2),
    "arcface": dict(margin=20.0, scale=16),
    "cosface": dict(margin=0.2, scale=16),
}


@pytest.mark.parametrize("case", list(_NON_DEFAULT))
def test_non_default_arguments_equal_parent_before_stage_3(case, gen):
    dsb, parent, _ = make_pair(case, gen, 4, 8, 16, 2, parent_kwargs=_NON_DEFAULT[case])
    for _ in range(4):  # 24 samples: stages 1 and 2
        emb, labels = torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        e1, e2 = leaf(emb), leaf(emb)
        got, want = dsb(e1, labels), parent(e2, labels)
        _assert_same_loss_and_grads(dsb, parent, got, want, e1, e2)
    assert dsb.memory.stage == 2


def test_a_call_without_gradients_reads_the_memory_and_leaves_it(gen, np_ref):
    """A validation loss (under no_grad or inference mode) is weighted by the
    memory as it stands and stores nothing; eval() mode alone still enqueues
    (PML's trainers put a loss listed in freeze_these in eval mode)."""
    dsb, _, flat = make_pair("norm_softmax", gen, C, D, 12, 1)
    for _ in range(3):  # 18 samples: stage 3
        dsb(*_batch(gen, 6))
    assert dsb.memory.stage == 3
    emb, labels = _batch(gen, 20)  # larger than the memory: fine, nothing is stored
    for context in (torch.no_grad, torch.inference_mode):
        before = {k: v.clone() for k, v in dsb.memory.state_dict().items()}
        with context():
            got = dsb(emb, labels)
        after = dsb.memory.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        w = dsb.memory.weights().float()
        raw = flat(emb, labels)["loss"]
        torch.testing.assert_close(got, (raw["losses"] * w[labels[raw["indices"]]]).mean(), rtol=1e-6, atol=0)
    dsb.eval()
    dsb(*_batch(gen, 6))
    assert dsb.memory.num_enqueued == 24


def test_cross_batch_memory_around_a_dsb_triplet_loss(gen):
    """PML's CrossBatchMemory refuses DSBTripletMarginLoss by its name;
    DSBCrossBatchMemory takes it. Before stage 3 it equals PML's wrapper around
    the parent; in stage 3 each triplet is weighted by its anchor's class."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    from pml_dsb import DSBCrossBatchMemory

    dsb_cls = with_dsb_weighting(pml_losses.TripletMarginLoss)
    with pytest.raises(Exception, match="CrossBatchMemory not supported for DSBTripletMarginLoss"):
        CrossBatchMemory(dsb_cls(C, D, memory_size=12), embedding_size=D, memory_size=16)
    with pytest.raises(TypeError, match="wraps a DSB loss"):
        DSBCrossBatchMemory(pml_losses.TripletMarginLoss(), embedding_size=D)
    # 0 failed at the first call, -3 and "4" inside torch
    for kwargs, words in ((dict(memory_size=0), "memory_size must be an int >= 1, got 0"),
                          (dict(memory_size=-3), "got -3"), (dict(embedding_size="4"), "embedding_size")):
        with pytest.raises(ValueError, match=re.escape(words)):
            DSBCrossBatchMemory(dsb_cls(C, D, memory_size=12), **{"embedding_size": D, **kwargs})
    ours = DSBCrossBatchMemory(dsb_cls(C, D, memory_size=12, warmup_epochs=1), embedding_size=D, memory_size=16)
    plain = CrossBatchMemory(pml_losses.TripletMarginLoss(), embedding_size=D, memory_size=16)
    flat = CrossBatchMemory(pml_losses.TripletMarginLoss(reducer=reducers.DoNothingReducer()),
                            embedding_size=D, memory_size=16)
    for step in range(4):  # 6 samples per step, M = 12, one warm-up epoch: stage 3 from the 2nd step
        emb, labels = _batch(gen, 6)
        e1, e2 = leaf(emb.double()), leaf(emb.double())
        got, raw = ours(e1, labels), flat(emb.double(), labels)["loss"]
        if ours.loss.memory.stage < 3:
            want = plain(e2, labels)
            assert torch.equal(got, want)
        else:
            plain(e2, labels)  # keeps PML's queue in step
            w = ours.loss.memory.weights()
            weighted = raw["losses"] * w[labels[raw["indices"][0]]]
            want = weighted[weighted > 0].mean()  # TripletMarginLoss's AvgNonZeroReducer
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert ours.loss.memory.stage == 3


def _states(wrapper):
    """PML's queue (its buffers and counters) and the DSB memory's state."""
    queue = [wrapper.embedding_memory.clone(), wrapper.label_memory.clone(), wrapper.queue_idx,
             wrapper.has_been_filled]
    return queue, {k: v.clone() for k, v in wrapper.loss.memory.state_dict().items()}


def _assert_same_states(a, b):
    (qa, ma), (qb, mb) = a, b
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(qa, qb))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_cross_batch_memory_queue_only_batches_and_bad_input(gen):
    """A mask that queues every row leaves no query: PML's zero loss and PML's
    queue, the DSB memory untouched. Bad rows (queued or not) and bad masks
    raise before PML's queue or the DSB memory changes."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    from pml_dsb import DSBCrossBatchMemory

    dsb_cls = with_dsb_weighting(pml_losses.TripletMarginLoss)
    ours = DSBCrossBatchMemory(dsb_cls(C, D, memory_size=12, warmup_epochs=1), embedding_size=D, memory_size=16)
    plain = CrossBatchMemory(pml_losses.TripletMarginLoss(), embedding_size=D, memory_size=16)
    for step in range(3):
        emb, labels = _batch(gen, 6)
        mask = torch.tensor([True, False] * 3) if step != 1 else torch.ones(6, dtype=torch.bool)
        dsb_before = {k: v.clone() for k, v in ours.loss.memory.state_dict().items()}
        e1, e2 = leaf(emb.double()), leaf(emb.double())
        got, want = ours(e1, labels, enqueue_mask=mask), plain(e2, labels, enqueue_mask=mask)
        assert torch.equal(got, want) and got.requires_grad
        assert torch.equal(ours.embedding_memory, plain.embedding_memory) and ours.queue_idx == plain.queue_idx
        dsb_after = ours.loss.memory.state_dict()
        unchanged = all(torch.equal(dsb_before[k], dsb_after[k]) for k in dsb_before)
        assert unchanged == (step == 1)  # queries are enqueued; a queue-only batch has none
    assert ours.loss.memory.num_enqueued == 6

    emb, labels = _batch(gen, 6)
    half = torch.tensor([True, False] * 3)
    nan_in_queued_row = emb.clone()
    nan_in_queued_row[0, 1] = float("nan")  # row 0 goes to PML's queue only
    bad = [
        ((nan_in_queued_row, labels), {"enqueue_mask": half}, ValueError, "NaN"),
        ((nan_in_queued_row, labels), {}, ValueError, "NaN"),
        ((emb, torch.full((6,), C)), {"enqueue_mask": half}, ValueError, "labels"),
        ((emb, labels), {"enqueue_mask": half.long()}, TypeError, "enqueue_mask must be a bool tensor"),
        ((emb, labels), {"enqueue_mask": half[:5]}, ValueError, r"enqueue_mask has shape \(5,\)"),
        # queries the DSB memory would refuse to store: too many for it (PML's queue takes 16)
        (_batch(gen, 14), {}, ValueError, "larger than memory_size=12"),
        ((emb, labels), {"sample_indices_announced": torch.arange(6)}, ValueError, "filled first in, first out"),
    ]
    for args, kwargs, error, match in bad:
        before = _states(ours)
        if "sample_indices_announced" in kwargs:
            ours.loss.expect_sample_indices(kwargs.pop("sample_indices_announced"))
        with pytest.raises(error, match=match):
            ours(*args, **kwargs)
        _assert_same_states(before, _states(ours))


def test_cross_batch_memory_queue_only_first_call_takes_the_batchs_dtype_as_pml_does(gen):
    """A first call that queues every row of a float64 batch: PML's queue turns
    float64 and keeps the rows exactly (they are not float32 values), and the
    next call's loss is PML's wrapper's."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    from pml_dsb import DSBCrossBatchMemory

    ours = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=64),
                               embedding_size=D, memory_size=16)
    plain = CrossBatchMemory(pml_losses.TripletMarginLoss(), embedding_size=D, memory_size=16)
    emb, labels = _batch(gen, 6)
    emb = emb.double() / 3
    assert not torch.equal(emb.float().double(), emb)  # precondition
    everything = torch.ones(6, dtype=torch.bool)
    assert torch.equal(ours(emb, labels, enqueue_mask=everything), plain(emb, labels, enqueue_mask=everything))
    assert ours.embedding_memory.dtype == plain.embedding_memory.dtype == torch.float64
    assert torch.equal(ours.embedding_memory, plain.embedding_memory) and torch.equal(ours.embedding_memory[:6], emb)
    emb, labels = _batch(gen, 6)
    assert torch.equal(ours(emb.double(), labels), plain(emb.double(), labels))


def test_cross_batch_memory_gives_announced_indices_to_its_queries(gen):
    """Indices announced for the whole batch (SampleIndicesGetter) address the
    queries' slots; once the DSB memory is index-addressed, a batch without
    indices raises before PML's queue changes."""
    from pml_dsb import DSBCrossBatchMemory

    loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=20, warmup_epochs=1)
    ours = DSBCrossBatchMemory(loss, embedding_size=D, memory_size=16)
    emb, labels = _batch(gen, 6)
    half = torch.tensor([True, False] * 3)
    indices = torch.tensor([3, 9, 4, 17, 0, 11])
    loss.expect_sample_indices(indices)
    ours(emb, labels, enqueue_mask=half)
    stored = loss.memory.embedding_memory[indices[~half]]
    torch.testing.assert_close(stored, F.normalize(emb[~half], dim=1))
    assert loss.memory.num_enqueued == 3 and int(ours.queue_idx) == 3
    before = _states(ours)
    with pytest.raises(ValueError, match="filled with dataset indices; this batch has none"):
        ours(*_batch(gen, 6))
    _assert_same_states(before, _states(ours))


@pytest.mark.parametrize("how", ["sample_indices", "announced", "cross_batch_memory"])
def test_repeated_sample_indices_store_each_samples_last_copy(gen, how):
    """A sampler drawing with replacement repeats dataset indices in a batch:
    the loss covers every row (stage 1: the parent's loss and gradients) and the
    memory takes each index's last copy, as a memory fed those rows alone."""
    from pml_dsb import DSBCrossBatchMemory

    emb, _ = _batch(gen, 6)
    idx = torch.tensor([3, 5, 3, 8, 5, 1])
    labels = torch.tensor([0, 1, 0, 2, 1, 3])  # a repeated index has its sample's label
    last = torch.tensor([2, 3, 4, 5])
    ref = SemanticScaleMemory(C, D, 12, warmup_epochs=2)
    ref.enqueue(emb[last], labels[last], idx[last])
    if how == "cross_batch_memory":
        loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=12, warmup_epochs=2)
        wrapper = DSBCrossBatchMemory(loss, embedding_size=D, memory_size=16)
        loss.expect_sample_indices(idx)
        wrapper(emb, labels)
        assert int(wrapper.queue_idx) == 6  # PML's queue takes every row
    else:
        loss, parent, _ = make_pair("norm_softmax", gen, C, D, 12, 2)
        e1, e2 = leaf(emb), leaf(emb)
        if how == "announced":
            loss.expect_sample_indices(idx)
            got = loss(e1, labels)
        else:
            got = loss(e1, labels, sample_indices=idx)
        _assert_same_loss_and_grads(loss, parent, got, parent(e2, labels), e1, e2)
    mine, want = loss.memory.state_dict(), ref.state_dict()
    assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want)


def test_a_two_row_batch_of_one_sample_twice_stores_its_last_copy(gen):
    """The smallest batch with a repeat: [3, 3] stores row 1 in slot 3 (it was
    refused as "indices contain duplicates" when only longer batches were
    looked at for repeats)."""
    loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=10, warmup_epochs=2)
    emb = torch.randn(2, D, generator=gen)
    loss(emb, torch.tensor([1, 1]), sample_indices=torch.tensor([3, 3]))
    assert loss.memory.label_memory.tolist() == [-1, -1, -1, 1] + [-1] * 6
    torch.testing.assert_close(loss.memory.embedding_memory[3], F.normalize(emb[1], dim=0))


def test_a_wider_ref_emb_widens_the_loss():
    """float32 embeddings against a float64 ref_emb (no parameters): computed in
    float64 as the parent computes with both cast up (it was float32)."""
    g = torch.Generator().manual_seed(0)
    loss = with_dsb_weighting(pml_losses.ContrastiveLoss)(C, D, memory_size=64)
    emb, ref = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 3, 0, 1])
    got = loss(emb, labels, None, ref, ref_labels)
    want = pml_losses.ContrastiveLoss()(emb.double(), labels, None, ref, ref_labels)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_integer_tensors_of_the_parent_keep_their_dtype_as_in_the_parent():
    """ProxyNCALoss's proxy_labels are class ids: after a float64 call they stay
    int64, as in the parent, and the loss is the parent's."""
    g = torch.Generator().manual_seed(0)
    dsb = with_dsb_weighting(pml_losses.ProxyNCALoss)(C, D, memory_size=64)
    parent = pml_losses.ProxyNCALoss(C, D)
    with torch.no_grad():
        parent.proxies.copy_(dsb.proxies)
    emb, labels = torch.randn(6, D, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    got, want = dsb(emb, labels), parent(emb, labels)
    assert parent.proxy_labels.dtype == torch.int64  # precondition: the parent keeps them integer
    assert dsb.proxy_labels.dtype == torch.int64 and torch.equal(dsb.proxy_labels, parent.proxy_labels)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_parameters_on_another_device_than_the_embeddings_are_named():
    """PML's cast_types moves .data silently or fails deep inside; the DSB loss
    asks for loss.to(device) (the meta device stands in for a GPU)."""
    loss = with_dsb_weighting(pml_losses.NormalizedSoftmaxLoss)(C, D, memory_size=20)
    with pytest.raises(ValueError, match=r"DSBNormalizedSoftmaxLoss.W is on cpu but the embeddings are on meta: "
                                         r"move the loss first with loss.to\('meta'\)"):
        loss.cast_types(torch.float32, torch.device("meta"))
    assert loss.W.device.type == "cpu"


def test_cross_batch_memory_takes_a_loss_pickled_before_announced_indices(gen):
    from pml_dsb import DSBCrossBatchMemory

    loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=20)
    del loss._pending_sample_indices  # as in a loss pickled by an older release
    ours = DSBCrossBatchMemory(loss, embedding_size=D, memory_size=16)
    ours(*_batch(gen, 6))
    assert loss.memory.num_enqueued == 6


@pytest.mark.parametrize("bad", ["nan", "mask", "pml"])
def test_cross_batch_memory_announced_indices_serve_one_call_even_a_rejected_one(gen, bad):
    """Indices announced for a rejected batch must not address the next one."""
    from pml_dsb import DSBCrossBatchMemory

    loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=20, warmup_epochs=1)
    ours = DSBCrossBatchMemory(loss, embedding_size=D, memory_size=16)
    emb, labels = _batch(gen, 6)
    half = torch.tensor([True, False] * 3)
    args = {"nan": ((emb * float("nan"), labels), {"enqueue_mask": half}),
            "mask": ((emb, labels), {"enqueue_mask": half.long()}),
            # PML's own check, after the DSB checks passed
            "pml": ((emb, labels), {"enqueue_mask": half, "indices_tuple": (torch.tensor([0]),) * 3})}[bad]
    loss.expect_sample_indices(torch.arange(10, 16))
    with pytest.raises((ValueError, TypeError)):
        ours(*args[0], **args[1])
    ours(emb, labels, enqueue_mask=half)  # first in, first out: slots 0-2
    assert loss.memory.num_enqueued == 3 and not bool(loss.memory.index_addressed)
    torch.testing.assert_close(loss.memory.embedding_memory[:3], F.normalize(emb[~half], dim=1))


def test_cross_batch_memory_resumes_its_queue_from_a_state_dict(gen):
    """PML keeps the queue's position outside the state_dict: a restored queue
    restarted at slot 0, empty, and the next losses differed."""
    from pml_dsb import DSBCrossBatchMemory

    def make():
        torch.manual_seed(0)
        return DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=24, warmup_epochs=1),
                                   embedding_size=D, memory_size=16)

    batches = [_batch(gen, 6) for _ in range(8)]
    straight, first = make(), make()
    want = [straight(*b) for b in batches]
    for b in batches[:3]:  # 18 rows: PML's queue has wrapped, at slot 2
        first(*b)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert (resumed.queue_idx, resumed.has_been_filled) == (2, True)
    got = [resumed(*b) for b in batches[3:]]
    assert all(torch.equal(g, w) for g, w in zip(got, want[3:]))
    # a state saved before the position was: loads, and the queue restarts as it did then
    old = {k: v for k, v in first.state_dict().items() if not k.endswith("_extra_state")}
    restarted = make()
    for b in batches[:2]:  # a live queue, at slot 12: the old state puts it back at 0
        restarted(*b)
    restarted.load_state_dict(old)
    assert (restarted.queue_idx, restarted.has_been_filled) == (0, False)
    with pytest.raises(ValueError, match="does not fit this DSBCrossBatchMemory"):
        make().load_state_dict({**old, "_extra_state": {"queue_idx": 16, "has_been_filled": True}})


def test_cross_batch_memory_resumes_a_float64_queue_as_float64(gen):
    """PML's forward gives the queue each batch's dtype (float64 rows, int32
    labels); a checkpoint of such a queue loaded into a fresh wrapper was
    copied into its float32/int64 buffers, and the next losses differed."""
    from pml_dsb import DSBCrossBatchMemory

    def make():
        torch.manual_seed(0)
        return DSBCrossBatchMemory(with_dsb_weighting(pml_losses.ContrastiveLoss)(C, D, memory_size=24, warmup_epochs=1),
                                   embedding_size=D, memory_size=16)

    batches = [(e.double() + 1e-12 * torch.randn(e.shape, generator=gen, dtype=torch.float64), y.to(torch.int32))
               for e, y in (_batch(gen, 6) for _ in range(5))]
    straight, first = make(), make()
    want = [straight(*b) for b in batches]
    for b in batches[:2]:
        first(*b)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert (resumed.embedding_memory.dtype, resumed.label_memory.dtype) == (torch.float64, torch.int32)
    got = [resumed(*b) for b in batches[2:]]
    assert all(torch.equal(g, w) for g, w in zip(got, want[2:]))
    # a failed load leaves the queue's dtypes (and rows) as they were
    bad = {**first.state_dict(), "unexpected": torch.zeros(1)}
    fresh = make()
    with pytest.raises(RuntimeError, match="unexpected"):
        fresh.load_state_dict(bad)
    assert (fresh.embedding_memory.dtype, fresh.label_memory.dtype) == (torch.float32, torch.int64)


def test_cross_batch_memory_checks_pmls_own_conditions_first(gen):
    """A batch larger than PML's queue (PML: a bare AssertionError) and
    indices_tuple with enqueue_mask raise ValueError, both queues unchanged."""
    from pml_dsb import DSBCrossBatchMemory

    wrapper = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=64),
                                  embedding_size=D, memory_size=16)
    wrapper(*_batch(gen, 8))
    before = _states(wrapper)
    with pytest.raises(ValueError, match="batch of 17 embeddings is larger than the queue's memory_size=16"):
        wrapper(*_batch(gen, 17))
    emb, labels = _batch(gen, 6)
    with pytest.raises(ValueError, match="mutually exclusive"):
        wrapper(emb, labels, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])),
                enqueue_mask=torch.zeros(6, dtype=torch.bool))
    _assert_same_states(before, _states(wrapper))


def test_cross_batch_memory_refuses_a_mask_that_queues_more_than_the_queue_holds(gen):
    """PML checks only an unmasked batch's size: 6 masked rows into a queue of
    4 overwrote slots within one write and left PML's position at 2, unfilled."""
    from pml_dsb import DSBCrossBatchMemory

    wrapper = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=64),
                                  embedding_size=D, memory_size=4)
    wrapper(*_batch(gen, 3))
    before = _states(wrapper)
    emb, labels = _batch(gen, 8)
    mask = torch.tensor([True] * 6 + [False] * 2)
    with pytest.raises(ValueError, match="enqueue_mask queues 6 embeddings, more than the queue's memory_size=4"):
        wrapper(emb, labels, enqueue_mask=mask)
    _assert_same_states(before, _states(wrapper))
    wrapper(emb[2:], labels[2:], enqueue_mask=mask[2:])  # 4 rows: fits
    assert (wrapper.queue_idx, wrapper.has_been_filled) == (3, True)


def test_cross_batch_memory_takes_a_batch_as_large_as_its_queue(gen):
    """A batch of exactly memory_size rows fits the queue (PML takes it): the
    losses and the queue equal PML's CrossBatchMemory around the parent."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    from pml_dsb import DSBCrossBatchMemory

    ours = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=64),
                               embedding_size=D, memory_size=4)
    plain = CrossBatchMemory(pml_losses.TripletMarginLoss(), embedding_size=D, memory_size=4)
    for _ in range(2):
        emb, labels = _batch(gen, 4)
        assert torch.equal(ours(leaf(emb.double()), labels), plain(emb.double(), labels))
    assert (ours.queue_idx, ours.has_been_filled) == (plain.queue_idx, plain.has_been_filled) == (0, True)
    assert torch.equal(ours.embedding_memory, plain.embedding_memory)
    assert ours.loss.memory.num_enqueued == 8


def test_cross_batch_memory_under_no_grad_reads_the_dsb_memory_without_its_storing_checks(gen):
    """Under torch.no_grad() the DSB loss only reads its memory: a batch larger
    than the DSB memory (which a stored batch may not be) is taken, PML's queue
    takes it as PML's wrapper does, and the DSB memory stays empty."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    from pml_dsb import DSBCrossBatchMemory

    ours = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=4),
                               embedding_size=D, memory_size=16)
    plain = CrossBatchMemory(pml_losses.TripletMarginLoss(), embedding_size=D, memory_size=16)
    emb, labels = _batch(gen, 6)
    with torch.no_grad():
        got, want = ours(emb, labels), plain(emb, labels)
    assert torch.equal(got, want)
    assert ours.loss.memory.num_enqueued == 0 and ours.queue_idx == plain.queue_idx == 6
    assert torch.equal(ours.embedding_memory, plain.embedding_memory)


@pytest.mark.parametrize("which", ["dsb memory", "queue"])
def test_cross_batch_memory_loads_its_queue_and_memory_together_or_not_at_all(gen, which):
    """torch loads what fits and raises at the end: a checkpoint whose DSB
    memory (or queue) had another size replaced the queue (or the memory) and
    left the two out of step."""
    from pml_dsb import DSBCrossBatchMemory

    def make(dsb_size, queue_size):
        loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=dsb_size, warmup_epochs=1)
        return DSBCrossBatchMemory(loss, embedding_size=D, memory_size=queue_size)

    source = make(30, 8) if which == "dsb memory" else make(24, 12)
    target = make(24, 8)
    for _ in range(3):
        source(*_batch(gen, 6))
    target(*_batch(gen, 6))
    before = _states(target)
    with pytest.raises(RuntimeError, match="size mismatch"):
        target.load_state_dict(source.state_dict())
    _assert_same_states(before, _states(target))
    target(*_batch(gen, 6))  # still usable: both queues as they were, in step
    assert target.loss.memory.num_enqueued == 12 and target.queue_idx == 4


def test_cross_batch_memory_failed_assign_load_leaves_the_callers_state_dict_alone(gen):
    """With assign=True torch makes the module's tensors the caller's: putting the
    old values back wrote them into the caller's state_dict."""
    from pml_dsb import DSBCrossBatchMemory

    def make():
        loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=24, warmup_epochs=1)
        return DSBCrossBatchMemory(loss, embedding_size=D, memory_size=8)

    source, target = make(), make()
    source(*_batch(gen, 6))
    target(*_batch(gen, 4))
    given = {**{k: v.clone() if torch.is_tensor(v) else v for k, v in source.state_dict().items()},
             "bogus": torch.zeros(1)}
    copy = {k: v.clone() if torch.is_tensor(v) else v for k, v in given.items()}
    before = _states(target)
    with pytest.raises(RuntimeError, match="bogus"):
        target.load_state_dict(given, strict=True, assign=True)
    assert all(torch.equal(given[k], copy[k]) for k in given if torch.is_tensor(given[k]))
    _assert_same_states(before, _states(target))
    mine = target.state_dict(keep_vars=True)
    assert not any(torch.is_tensor(t) and t.numel() and k in given and t.data_ptr() == given[k].data_ptr()
                   for k, t in mine.items())  # (empty tensors all have data_ptr 0)


def test_cross_batch_memory_checks_indices_tuple_before_its_queue_changes(gen):
    """indices_tuple out of range raised IndexError after PML's queue had taken
    the batch; a negative index silently counted from the end. Anchors index
    the batch, the other entries PML's queue once it holds the batch, as PML
    itself reads them (checked against PML's own wrapper)."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    from pml_dsb import DSBCrossBatchMemory

    def pair(memory_size=64):
        ours = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.ContrastiveLoss)(C, D, memory_size=memory_size),
                                   embedding_size=D, memory_size=16)
        return ours, CrossBatchMemory(pml_losses.ContrastiveLoss(), embedding_size=D, memory_size=16)

    ours, plain = pair()
    first = _batch(gen, 8)
    ours(*first), plain(*first)
    emb, labels = _batch(gen, 6)
    # the queue will hold 14 rows: a positive at 13 is fine, at 14 is not
    good = (torch.tensor([0, 5]), torch.tensor([13, 2]), torch.tensor([1, 3]))
    unfilled = _states(ours)
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] holds indices from 14 to 14; it indexes the queue, whose 14"):
        ours(emb, labels, (torch.tensor([0]), torch.tensor([14]), torch.tensor([1])))
    _assert_same_states(unfilled, _states(ours))
    torch.testing.assert_close(ours(emb, labels, good), plain(emb, labels, good), rtol=1e-6, atol=0)
    before = _states(ours)
    bad = [
        ((torch.tensor([6]), torch.tensor([0]), torch.tensor([1])), ValueError, r"indices_tuple\[0\] .* the batch, whose 6"),
        ((torch.tensor([0]), torch.tensor([20]), torch.tensor([1])), ValueError, r"indices_tuple\[1\] .* the queue, whose 16"),
        ((torch.tensor([0]), torch.tensor([-1]), torch.tensor([1])), ValueError, "from -1 to -1"),
        ((torch.tensor([0]), torch.tensor([1]), torch.tensor([7]), torch.tensor([2])), ValueError,
         r"indices_tuple\[2\] .* the batch"),
        ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), TypeError, "1-D integer tensors"),
        ((torch.tensor([0]), torch.tensor([1])), TypeError, "tuple of 3"),
        ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])), ValueError, r"differ in length: \[2, 1, 1\]"),
    ]
    for indices_tuple, error, match in bad:
        with pytest.raises(error, match=match):
            ours(*_batch(gen, 6), indices_tuple)
        _assert_same_states(before, _states(ours))


def test_cross_batch_memory_puts_its_queue_back_when_pml_raises_after_writing_it(gen):
    from pml_dsb import DSBCrossBatchMemory

    class FailingMiner(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("miner failed")

    wrapper = DSBCrossBatchMemory(with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=64),
                                  embedding_size=D, memory_size=16)
    for _ in range(3):  # 18 rows: the queue has wrapped around
        wrapper(*_batch(gen, 6))
    before = _states(wrapper)
    wrapper.miner = FailingMiner()
    for kwargs in ({}, {"enqueue_mask": torch.tensor([True, False] * 3)}):
        with pytest.raises(RuntimeError, match="miner failed"):
            wrapper(*_batch(gen, 6), **kwargs)
        _assert_same_states(before, _states(wrapper))


def test_cross_batch_memory_keeps_both_queues_in_step_when_the_loss_fails_after_storing(gen):
    """An error after the DSB memory took the batch (here the reducer's): PML's
    queue keeps it too, or a retried batch would be stored twice in one memory
    and once in the other."""
    from pytorch_metric_learning.reducers import MeanReducer

    from pml_dsb import DSBCrossBatchMemory

    class FailingReducer(MeanReducer):
        armed = False

        def forward(self, *args, **kwargs):
            if self.armed:
                raise RuntimeError("reducer failed")
            return super().forward(*args, **kwargs)

    loss = with_dsb_weighting(pml_losses.TripletMarginLoss)(C, D, memory_size=64, reducer=FailingReducer())
    wrapper = DSBCrossBatchMemory(loss, embedding_size=D, memory_size=16)
    for _ in range(2):
        wrapper(*_batch(gen, 6))
    queue_idx, stored = wrapper.queue_idx, wrapper.loss.memory.num_enqueued
    wrapper.loss.reducer.armed = True
    emb, labels = _batch(gen, 6)
    with pytest.raises(RuntimeError, match="reducer failed"):
        wrapper(emb, labels)
    assert wrapper.loss.memory.num_enqueued == stored + 6  # the DSB memory took the batch before the reducer ran
    rows = (queue_idx + torch.arange(6)) % 16
    assert wrapper.queue_idx == (queue_idx + 6) % 16 and torch.equal(wrapper.embedding_memory[rows], emb)


def test_torch_compile_runs_a_dsb_loss_as_it_is(gen):
    """Dynamo guarded on the memory's buffer mapping (not a dict, so that
    record-keeper skips it) and crashed; the DSB forward now stays eager under
    torch.compile: the same losses and memory as the uncompiled loss, into stage 3."""
    from pml_dsb import DSBNormalizedSoftmaxLoss

    torch.manual_seed(0)
    eager = DSBNormalizedSoftmaxLoss(C, D, memory_size=12, warmup_epochs=1)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    for _ in range(4):
        emb, labels = _batch(gen, 6)
        assert torch.equal(compiled(emb, labels), eager(emb, labels))
    assert twin.memory.stage == 3 and torch.equal(twin.memory.scales(), eager.memory.scales())


def test_public_helpers_refuse_what_they_would_misread(gen):
    d = {"loss": {"losses": torch.ones(3), "indices": torch.arange(3), "reduction_type": "element"}}
    w = torch.tensor([2.0, 0.5])
    cases = [
        # -1 took the last class's weight; a short weight vector raised IndexError
        (lambda: weight_losses_by_class(d, torch.tensor([0, -1, 1]), w), ValueError, "labels must lie in [0, 2)"),
        (lambda: weight_losses_by_class(d, torch.tensor([0, 2, 1]), w), ValueError, "class_weights has one weight"),
        (lambda: weight_losses_by_class(d, torch.tensor([0, 1, 1]), [2.0, 0.5]), TypeError, "class_weights must be"),
        (lambda: weight_losses_by_class(d, torch.tensor([0, 1, 1]), w, names="loss"), ValueError, "names must be"),
        (lambda: weight_losses_by_class(d, torch.tensor([0, 1, 1]), torch.tensor([float("nan"), 1.0])), ValueError,
         "class_weights must be finite"),
        (lambda: with_dsb_weighting(torch.nn.CrossEntropyLoss), TypeError, "use dsb_class_weights"),
        (lambda: with_dsb_weighting(pml_losses.NTXentLoss)(C, D, memory_size=8, update_memory="no"), TypeError,
         "update_memory must be True or False"),
    ]
    memory = SemanticScaleMemory(C, D, 8)
    cases += [
        (lambda: dsb_class_weights(memory, dtype=torch.long), TypeError, "dtype must be a floating torch.dtype"),
        (lambda: dsb_class_weights(with_dsb_weighting(pml_losses.NTXentLoss)(C, D, memory=memory)), TypeError,
         "a DSB loss's is at loss.memory"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc) as info:
            call()
        assert words in str(info.value)
    assert weight_losses_by_class(d, torch.tensor([0, 1, 1]), w)["loss"]["losses"].tolist() == [2.0, 0.5, 0.5]
    d["loss"]["losses"] = torch.ones(3)  # names from a generator: the check must not use it up (it once did)
    got = weight_losses_by_class(d, torch.tensor([0, 1, 1]), w, names=(n for n in ["loss"]))
    assert got["loss"]["losses"].tolist() == [2.0, 0.5, 0.5]
    # numpy's bools are bools
    assert with_dsb_weighting(pml_losses.NTXentLoss)(C, D, memory_size=8, update_memory=np.False_).update_memory is False


@pytest.mark.parametrize("case", list(CASES))
def test_an_out_of_range_miner_tuple_is_refused_before_anything_changes(case, gen):
    # PML raised IndexError from inside its weighting; a negative index counted from the end
    dsb, _, _ = make_pair(case, gen, C, D, 16, 1)
    emb, labels = _batch(gen, 4)
    before = {k: v.clone() for k, v in dsb.state_dict().items()}
    for bad, words in (((torch.tensor([9]), torch.tensor([0]), torch.tensor([1])), "indices_tuple[0] holds indices from 9"),
                       ((torch.tensor([0]), torch.tensor([-1]), torch.tensor([1])), "indices_tuple[1] holds indices from -1"),
                       ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), "1-D integer tensors"),
                       ((torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([1])), "differ in length: [2, 2, 1]"),
                       ((torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 2]), torch.tensor([3])),
                        "differ in length: [1, 1, 2, 1]")):
        with pytest.raises((ValueError, TypeError), match=re.escape(words)):
            dsb(emb, labels, bad)
    # the tuple is named first, also when the call's indices are given twice as well
    dsb.expect_sample_indices(torch.arange(4))
    with pytest.raises(ValueError, match=re.escape("indices_tuple[0] holds indices from 9")):
        dsb(emb, labels, (torch.tensor([9]), torch.tensor([0]), torch.tensor([1])), sample_indices=torch.arange(4))
    after = dsb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
