"""One process: bad batches never enter the memory (issue 5, part 3), the
memory stays float32 and its scales full precision under autocast (part 4),
the ``distributed`` setting, and the distributed helpers without a process group.
"""
import datetime
import os
import warnings

import pytest
import torch
from pytorch_metric_learning.losses import SoftTripleLoss

from pml_dsb import DSBNormalizedSoftmaxLoss, DSBSoftTripleLoss, SemanticScaleMemory
from pml_dsb.distributed import (
    BatchRejectedError,
    DistributedDSBLossWrapper,
    ShardedBatchSampler,
    all_gather_objects,
    any_rank,
    average_gradients,
    broadcast_object,
    distributed_sampler,
    gather_batch,
    get_rank,
    get_world_size,
    init_from_env,
    is_main_process,
    should_gather,
    wrap_model,
)

C, D, M = 4, 6, 20


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def _batch(gen, size=8, dim=D, num_classes=C):
    return torch.randn(size, dim, generator=gen), torch.randint(0, num_classes, (size,), generator=gen)


def _filled_memory(gen, batches=6, **kwargs):
    """A memory past its warm-up (stage 3), wrapped around several times."""
    mem = SemanticScaleMemory(C, D, M, warmup_epochs=1, **kwargs)
    for _ in range(batches):
        mem.enqueue(*_batch(gen))
    mem.scales()
    assert mem.stage == 3
    return mem


# ------------------------------------------------------------------ faults
@pytest.mark.parametrize("bad", ["nan_one_value", "nan_row", "inf", "minus_inf", "all_nan"])
def test_non_finite_batch_never_enters_the_memory(gen, bad):
    mem = _filled_memory(gen)
    before = _state(mem)
    emb, labels = _batch(gen)
    if bad == "nan_one_value":
        emb[3, 2] = float("nan")
    elif bad == "nan_row":
        emb[0] = float("nan")
    elif bad == "inf":
        emb[5, 0] = float("inf")
    elif bad == "minus_inf":
        emb[7, 5] = -float("inf")
    else:
        emb[:] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mem.enqueue(emb, labels)
    _assert_same_state(before, _state(mem))
    # the next good batch is accepted and counted
    mem.enqueue(*_batch(gen))
    assert mem.num_enqueued == 7 * 8


def test_dsb_loss_raises_on_a_diverged_batch_and_training_continues(gen):
    torch.manual_seed(0)
    loss = DSBSoftTripleLoss(C, D, centers_per_class=2, memory_size=M, warmup_epochs=1)
    model = torch.nn.Linear(5, D)
    opt = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.1)
    for _ in range(4):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, C, (8,), generator=gen)
        loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    memory_before, loss_params = _state(loss.memory), [p.clone() for p in loss.parameters()]
    with torch.no_grad():  # a diverging step: the model now outputs NaN
        poisoned = model.weight.clone()
        model.weight[0, 0] = float("nan")
    x, y = torch.randn(8, 5, generator=gen), torch.randint(0, C, (8,), generator=gen)
    with pytest.raises(ValueError, match="NaN or Inf in 8 of 8 rows; the memory was not changed"):
        loss(model(x), y)
    _assert_same_state(memory_before, _state(loss.memory))
    for p, q in zip(loss.parameters(), loss_params):
        assert torch.equal(p, q)
    with torch.no_grad():  # the caller restores a good state and goes on
        poisoned[0, 0] = 0.1
        model.weight.copy_(poisoned)
    value = loss(model(x), y)
    value.backward()
    assert torch.isfinite(value) and loss.memory.num_enqueued == 5 * 8


# --------------------------------------------------------------- precision
@pytest.mark.parametrize("scale_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_class", [DSBSoftTripleLoss, DSBNormalizedSoftmaxLoss])
def test_bf16_autocast_stores_float32_and_scales_as_in_full_precision(gen, loss_class, scale_dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, D)
    memory = SemanticScaleMemory(C, D, M, warmup_epochs=1, scale_dtype=scale_dtype)
    loss = loss_class(C, D, memory=memory)
    reference = SemanticScaleMemory(C, D, M, warmup_epochs=1, scale_dtype=scale_dtype)
    for _ in range(6):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, C, (8,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model(x)
            assert emb.dtype == torch.bfloat16
            value = loss(emb, y)
        value.backward()
        assert torch.isfinite(value)
        # the same bf16 values, cast up, outside autocast
        reference.enqueue(emb.detach().float(), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = memory.scales()
        assert memory.embedding_memory.dtype == torch.float32
        assert inside.dtype == torch.float64
        assert torch.equal(inside, reference.scales())
        assert torch.equal(memory.embedding_memory, reference.embedding_memory)
    assert memory.stage == 3
    # and a from-scratch float64 computation over the memory's contents agrees
    from pml_dsb.functional import class_semantic_scales

    emb, labels = memory.contents()
    fresh = class_semantic_scales(emb.double(), labels, C, normalize=False)  # stored rows are unit already
    tol = 1e-5 if scale_dtype == torch.float32 else 1e-10
    torch.testing.assert_close(memory.scales(), fresh, rtol=tol, atol=tol)


def test_autocast_is_turned_off_inside_the_memory_with_the_api_of_torch_before_2_4(gen, monkeypatch):
    """Before torch 2.4 ``torch.is_autocast_enabled()`` took no argument and asked
    about CUDA only (CPU had ``is_autocast_cpu_enabled()``): the memory must still
    see CPU autocast and turn it off, so that float32 statistics are not bf16."""
    from pml_dsb.memory import semantic_scale_memory as module

    class TorchBefore24:  # torch as the memory module sees it, with the older queries
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def is_autocast_enabled():  # no argument: CUDA's state (still so on newer torch)
            return torch.is_autocast_enabled()

        @staticmethod
        def is_autocast_cpu_enabled():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # deprecated from torch 2.4 on
                return torch.is_autocast_cpu_enabled()

    monkeypatch.setattr(module, "torch", TorchBefore24())
    _autocast_enabled = module._autocast_enabled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (_autocast_enabled("cpu"), _autocast_enabled("cuda")) == (True, False)
    assert _autocast_enabled("cpu") is False
    memory = SemanticScaleMemory(C, D, M, warmup_epochs=1, scale_dtype=torch.float32)
    reference = SemanticScaleMemory(C, D, M, warmup_epochs=1, scale_dtype=torch.float32)
    for _ in range(4):
        emb, labels = torch.randn(8, D, generator=gen), torch.randint(0, C, (8,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            memory.enqueue(emb, labels)
            inside = memory.scales()
        reference.enqueue(emb, labels)
        assert torch.equal(inside, reference.scales())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_are_stored_as_float32(gen, dtype):
    emb, labels = _batch(gen)
    half = SemanticScaleMemory(C, D, M, warmup_epochs=0)
    full = SemanticScaleMemory(C, D, M, warmup_epochs=0)
    half.enqueue(emb.to(dtype), labels)
    full.enqueue(emb.to(dtype).float(), labels)
    assert half.embedding_memory.dtype == torch.float32
    assert torch.equal(half.embedding_memory, full.embedding_memory)
    assert torch.equal(half.scales(), full.scales())


# ------------------------------------------------------ distributed setting
def test_distributed_setting_is_validated_and_auto_is_off_without_a_process_group(gen):
    for bad in ("yes", 1, 0):
        with pytest.raises(ValueError, match="distributed must be None"):
            SemanticScaleMemory(C, D, M, distributed=bad)
    assert SemanticScaleMemory(C, D, M).distributed is None
    assert should_gather(None) is False and should_gather(False) is False
    with pytest.raises(ValueError, match="distributed must be None, True or False"):
        should_gather("auto")
    mem = SemanticScaleMemory(C, D, M, distributed=True)
    before = _state(mem)
    with pytest.raises(RuntimeError, match="distributed=True but torch.distributed is not initialised"):
        mem.enqueue(*_batch(gen))
    _assert_same_state(before, _state(mem))


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (destroyed afterwards)."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_gathering_path_with_one_rank_equals_the_local_path(gen, one_rank_group):
    assert should_gather(None) is False  # auto: one rank gathers nothing
    gathering = SemanticScaleMemory(C, D, M, warmup_epochs=1, distributed=True)
    local = SemanticScaleMemory(C, D, M, warmup_epochs=1, distributed=False)
    for _ in range(5):
        emb, labels = _batch(gen, size=int(torch.randint(1, 9, (1,), generator=gen)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one rank: no "all ranks passed the same batch" warning
            gathering.enqueue(emb.double(), labels.int())
        local.enqueue(emb.double(), labels.int())
    _assert_same_state(_state(gathering), _state(local))
    before = _state(gathering)
    emb, labels = _batch(gen)
    emb[1, 1] = float("nan")
    expected = r"rejected on 1 of 1 ranks \(rank 0: ValueError: embeddings contain NaN"
    with pytest.raises(BatchRejectedError, match=expected) as info:
        gathering.enqueue(emb, labels)
    assert info.value.bad_ranks == [0] and isinstance(info.value.__cause__, ValueError)
    with pytest.raises(BatchRejectedError, match="TypeError: labels must be an integer tensor"):
        gathering.validate_batch(emb.nan_to_num(), labels.float())
    _assert_same_state(before, _state(gathering))


def test_gather_batch_is_bit_exact_and_drops_repeated_indices(gen, one_rank_group):
    emb = torch.randn(5, 3, generator=gen)
    emb[0, 0] = -0.0
    labels = torch.tensor([2**40, 0, -1, 7, 3])
    batch = gather_batch(emb, labels)
    assert torch.equal(batch.embeddings.view(torch.int32), emb.view(torch.int32))
    assert torch.equal(batch.labels, labels) and batch.indices is None
    assert batch.sizes == [5] and batch.offset == 0
    batch = gather_batch(emb, labels, torch.tensor([4, 1, 4, 9, 1]))  # each index's last copy, in order
    assert batch.indices.tolist() == [4, 9, 1] and batch.labels.tolist() == [-1, 7, 3]
    assert torch.equal(batch.embeddings, emb[[2, 3, 4]])


def test_dsb_loss_wrapper_checks_its_loss_and_passes_through_on_one_process(gen):
    with pytest.raises(TypeError, match="DSB loss"):
        DistributedDSBLossWrapper(SoftTripleLoss(C, D))
    with pytest.raises(ValueError, match="distributed=True"):
        DistributedDSBLossWrapper(DSBSoftTripleLoss(C, D, memory=SemanticScaleMemory(C, D, M, distributed=True)))
    torch.manual_seed(0)
    loss = DSBSoftTripleLoss(C, D, centers_per_class=2, memory_size=M)
    torch.manual_seed(0)
    plain = DSBSoftTripleLoss(C, D, centers_per_class=2, memory_size=M)
    wrapped = DistributedDSBLossWrapper(loss)
    assert loss.memory.distributed is False
    emb, labels = _batch(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-distributed setting" warning from PML's wrapper
        assert torch.equal(wrapped(emb, labels), plain(emb, labels))
    # refused as with several ranks (enqueue_mask was ignored, indices_tuple passed on)
    before = {k: v.clone() for k, v in loss.memory.state_dict().items()}
    for extra in ({"enqueue_mask": torch.zeros(len(emb), dtype=torch.bool)},
                  {"indices_tuple": (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))}):
        with pytest.raises(ValueError, match=rf"does not support \['{next(iter(extra))}'\]"):
            wrapped(emb, labels, **extra)
    assert all(torch.equal(v, loss.memory.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------- helpers, one process
def test_ddp_helpers_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    # torchrun with one process: nothing initialised, its LOCAL_RANK kept
    ctx = init_from_env(env={"WORLD_SIZE": "1", "LOCAL_RANK": "3", "RANK": "0"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled) == (0, 1, 3, False)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 but \['RANK', 'MASTER_ADDR', 'MASTER_PORT'\] are not set"):
        init_from_env(env={"WORLD_SIZE": "2"})
    assert not torch.distributed.is_initialized()
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    assert distributed_sampler(list(range(6))) is None
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model) is model
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad.clone()
    average_gradients(model.parameters())
    assert torch.equal(model.weight.grad, grad)
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert any_rank(True) is True and any_rank(False) is False
    assert all_gather_objects(3) == [3]
    assert os.environ.get("WORLD_SIZE") is None


def test_sharded_batch_sampler_splits_every_batch_in_rank_order():
    batches = [list(range(10)), [10, 11, 12], [13, 14], [15]]
    shards = [list(ShardedBatchSampler(batches, rank=r, world_size=3)) for r in range(3)]
    assert shards[0] == [[0, 1, 2, 3], [10]]
    assert shards[1] == [[4, 5, 6], [11]]
    assert shards[2] == [[7, 8, 9], [12]]  # [13, 14] and [15]: fewer samples than ranks, skipped
    assert list(ShardedBatchSampler(batches)) == batches  # one process: the batches themselves
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\), got 2"):
        ShardedBatchSampler(batches, rank=2, world_size=2)


def test_gather_batch_with_widest_dtype_keeps_float64_rows_exact(gen, one_rank_group):
    emb = torch.randn(4, 3, generator=gen, dtype=torch.float64) / 3  # not representable in float32
    assert not torch.equal(emb.float().double(), emb)
    labels = torch.tensor([0, 1, 1, 2])
    wide = gather_batch(emb, labels, widest_dtype=True)
    assert wide.embeddings.dtype == torch.float64 and torch.equal(wide.embeddings, emb)
    narrow = gather_batch(emb, labels)  # the memory's float32 rows
    assert narrow.embeddings.dtype == torch.float32 and torch.equal(narrow.embeddings, emb.float())
    half = gather_batch(emb.half(), labels, widest_dtype=True)  # travels as float32, comes back as it was
    assert half.embeddings.dtype == torch.float16 and torch.equal(half.embeddings, emb.half())
    assert torch.equal(wide.labels, labels)
