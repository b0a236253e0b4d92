"""Two-process scenarios for the distributed tests, and their one-process references.

Run as a script, this file is one rank of a gloo process group started from
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) by
:func:`launch`; it runs the named scenarios and saves what each recorded to
``<out>/rank<r>.pt``. The tests load both ranks' records and compare them with
each other and with one process fed the concatenated batches.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import time
import traceback
import warnings

import torch

from pml_dsb.distributed import free_port, local_rank_env

C, D, M, WARMUP = 5, 8, 24, 2  # classes, embedding size, memory size, warm-up epochs
UNEVEN = (5, 7)                 # per-rank batch sizes (global 12; M is no multiple of it)
STEPS = 7                       # stage 2 at 24 samples (2nd step), stage 3 at 48 (4th)
WORKER_TIMEOUT_S = 30           # every collective fails after this, instead of hanging


# ---------------------------------------------------------------- data, losses
def make_batches(seed, sizes, steps, num_classes=C, dim=D):
    """``steps`` lists of one (embeddings, labels) pair per rank, clustered by class."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, dim, generator=g)
    batches = []
    for _ in range(steps):
        step = []
        for size in sizes:
            labels = torch.randint(0, num_classes, (size,), generator=g)
            step.append((centres[labels] + torch.randn(size, dim, generator=g), labels))
        batches.append(step)
    return batches


def concat(step):
    return torch.cat([e for e, _ in step]), torch.cat([lab for _, lab in step])


def new_loss(**kwargs):
    """The same DSB-SoftTriple (same centres) on every rank and in the references."""
    from pml_dsb import DSBSoftTripleLoss

    kwargs.setdefault("memory_size", M)
    kwargs.setdefault("warmup_epochs", WARMUP)
    torch.manual_seed(0)
    return DSBSoftTripleLoss(C, D, centers_per_class=2, **kwargs)


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def read_scales(memory):
    """``memory.scales()`` as a gathering memory answers it: before stage 3 from
    its contents, nothing kept (a one-process reference then builds its
    statistics when the ranks do, and holds the same state bit for bit)."""
    from pml_dsb import class_semantic_scales

    if memory.stage < 3 and not bool(memory.statistics_built):
        return class_semantic_scales(*memory.contents(), memory.num_classes, normalize=False)
    return memory.scales()


def _step_record(rec, loss, value, emb):
    rec["loss"].append(value.detach().clone())
    rec["grad"].append(emb.grad.detach().clone())
    rec["stage"].append(loss.memory.stage)
    rec["enqueued"].append(loss.memory.num_enqueued)
    rec["scales"].append(read_scales(loss.memory))


def _new_record():
    return {"loss": [], "grad": [], "stage": [], "enqueued": [], "scales": []}


# ------------------------------------------------------------------ scenarios
def scenario_direct(rank, world):
    """The loss called on each rank's own (uneven) batch; the memory gathers."""
    loss, rec = new_loss(), _new_record()
    for step in make_batches(1, UNEVEN, STEPS):
        emb, labels = step[rank]
        emb = emb.clone().requires_grad_(True)
        value = loss(emb, labels)
        value.backward()
        _step_record(rec, loss, value, emb)
    rec["state"] = state_of(loss.memory)
    return rec


def reference_direct():
    """One process: the memory fed the concatenated batches; each rank's loss on its part."""
    ref = new_loss()
    part_loss = new_loss(memory=ref.memory, update_memory=False)
    recs = [_new_record() for _ in UNEVEN]
    for step in make_batches(1, UNEVEN, STEPS):
        ref.memory.enqueue(*concat(step))
        for rank, (emb, labels) in enumerate(step):
            emb = emb.clone().requires_grad_(True)
            value = part_loss(emb, labels)
            value.backward()
            _step_record(recs[rank], ref, value, emb)
    for rec in recs:
        rec["state"] = state_of(ref.memory)
    return recs


# step -> {rank: fault}; steps not listed are good on every rank
FAULTS = {
    1: {1: "nan"},
    2: {0: "label_out_of_range"},
    3: {0: "indices_on_one_rank"},
    4: {0: "float_labels", 1: "inf"},
    # found by checks that once ran before the collective one, or by the parent
    # loss between the check and the enqueue: one rank raised alone and hung
    5: {1: "labels_none"},
    6: {0: "integer_embeddings"},
    7: {1: "ref_emb"},
    8: {0: "ref_shape"},  # refused by PML's own checks, before compute_loss
}
FAULT_STEPS = 10
INT32_LABELS = {9: 0}  # step -> rank passing int32 labels: a good batch (the parents need int64)


def _corrupt(fault, emb, labels):
    emb, labels, indices, extra = emb.clone(), labels.clone(), None, {}
    if fault == "labels_none":
        labels = None
    elif fault == "integer_embeddings":
        emb = emb.long()
    elif fault == "ref_emb":
        extra = {"ref_emb": emb.clone(), "ref_labels": labels.clone()}
    elif fault == "ref_shape":
        extra = {"ref_emb": emb[:4].clone(), "ref_labels": labels[:3].clone()}
    elif fault == "nan":
        emb[2, 3] = float("nan")
    elif fault == "inf":
        emb[0, 0] = float("inf")
    elif fault == "label_out_of_range":
        labels[1] = C
    elif fault == "float_labels":
        labels = labels.float()
    elif fault == "indices_on_one_rank":
        indices = torch.arange(len(labels))
    return emb, labels, indices, extra


def scenario_faults(rank, world):
    """Bad batches on one or both ranks: every rank raises, nothing changes, training goes on."""
    loss = new_loss()
    rec = {"errors": [], "unchanged": [], "enqueued": []}
    for t, step in enumerate(make_batches(2, UNEVEN, FAULT_STEPS)):
        emb, labels = step[rank]
        fault = FAULTS.get(t, {}).get(rank)
        emb, labels, indices, extra = _corrupt(fault, emb, labels) if fault else (emb, labels, None, {})
        if INT32_LABELS.get(t) == rank:
            labels = labels.int()
        before = state_of(loss.memory)
        try:
            emb = emb.requires_grad_(True) if emb.is_floating_point() else emb
            loss(emb, labels, sample_indices=indices, **extra).backward()
            rec["errors"].append(None)
        except ValueError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ is not None else None
            rec["errors"].append((type(err).__name__, str(err), getattr(err, "bad_ranks", None), cause))
        rec["unchanged"].append(same_state(before, state_of(loss.memory)))
        rec["enqueued"].append(loss.memory.num_enqueued)
    rec["state"] = state_of(loss.memory)
    rec["scales"] = read_scales(loss.memory)
    return rec


def reference_faults():
    ref = new_loss()
    for t, step in enumerate(make_batches(2, UNEVEN, FAULT_STEPS)):
        if t not in FAULTS:
            ref.memory.enqueue(*concat(step))
    return {"state": state_of(ref.memory), "scales": read_scales(ref.memory)}


INDEX_STEPS = (
    # per rank dataset indices; rank 1 repeats index 0 (DistributedSampler's padding)
    ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10, 0)),
    ((11, 12, 13, 14, 15), (6, 7, 8, 9, 1, 2, 3)),
)


def _index_batches():
    return make_batches(3, UNEVEN, len(INDEX_STEPS))


def scenario_indices(rank, world):
    """An index-addressed memory enqueued directly; a sample on both ranks is kept once."""
    from pml_dsb import SemanticScaleMemory

    mem = SemanticScaleMemory(C, D, memory_size=16, warmup_epochs=1)
    rec = {"enqueued": []}
    for step, ids in zip(_index_batches(), INDEX_STEPS):
        emb, labels = step[rank]
        mem.enqueue(emb, labels, torch.tensor(ids[rank]))
        rec["enqueued"].append(mem.num_enqueued)
    rec["state"] = state_of(mem)
    # each rank's batch fits a memory of 10, the global batch of 12 does not
    small = SemanticScaleMemory(C, D, memory_size=10, warmup_epochs=1)
    rec["too_large"] = []
    for call in (small.validate_batch, small.enqueue):
        try:
            call(*_index_batches()[0][rank])
            rec["too_large"].append(None)
        except ValueError as err:
            rec["too_large"].append(str(err))
    rec["too_large_enqueued"] = small.num_enqueued
    # 12 samples, 11 distinct indices: they fit a memory of 11 (through the loss too)
    fits = new_loss(memory_size=11, warmup_epochs=1)
    emb, labels = _index_batches()[0][rank]
    try:
        fits(emb, labels, sample_indices=torch.tensor(INDEX_STEPS[0][rank]))
        rec["distinct_fit"] = fits.memory.num_enqueued
    except ValueError as err:
        rec["distinct_fit"] = str(err)
    return rec


def reference_indices():
    """One process; it reads the scales after each enqueue in stage 3, where a
    memory held by several ranks keeps its statistics up to date itself."""
    from pml_dsb import SemanticScaleMemory

    mem = SemanticScaleMemory(C, D, memory_size=16, warmup_epochs=1)
    enqueued = []
    for step, ids in zip(_index_batches(), INDEX_STEPS):
        emb, labels = concat(step)
        ids = torch.tensor(ids[0] + ids[1])
        keep = torch.tensor([int(i) not in ids[k + 1:].tolist() for k, i in enumerate(ids)])  # last copies
        mem.enqueue(emb[keep], labels[keep], ids[keep])
        if mem.stage == 3:
            mem.scales()
        enqueued.append(mem.num_enqueued)
    return {"enqueued": enqueued, "state": state_of(mem)}


DDP_N, DDP_IN, DDP_BATCH, DDP_EPOCHS, DDP_M = 32, 6, 4, 2, 12


def _ddp_setup():
    from pml_dsb import DSBNormalizedSoftmaxLoss

    g = torch.Generator().manual_seed(4)
    x = torch.randn(DDP_N, DDP_IN, generator=g)
    y = torch.randint(0, C, (DDP_N,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(DDP_IN, D)
    torch.manual_seed(1)
    loss = DSBNormalizedSoftmaxLoss(C, D, memory_size=DDP_M, warmup_epochs=1)
    return torch.utils.data.TensorDataset(x, y), model, loss


def _ddp_optimizer(model, loss):
    return torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.5)


def scenario_ddp(rank, world):
    """A DistributedDataParallel loop with DistributedSampler; the loss called directly."""
    from pml_dsb.distributed import average_gradients, current_context, distributed_sampler, wrap_model

    dataset, model, loss = _ddp_setup()
    sampler = distributed_sampler(dataset, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=DDP_BATCH, sampler=sampler)
    ddp_model = wrap_model(model, current_context())
    opt = _ddp_optimizer(model, loss)
    rec = {"loss": [], "is_ddp": type(ddp_model).__name__}
    for epoch in range(DDP_EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            value = loss(ddp_model(x), y)
            value.backward()
            average_gradients(loss.parameters())
            opt.step()
            opt.zero_grad()
            rec["loss"].append(value.detach().clone())
    rec["model"], rec["loss_params"] = state_of(model), [p.detach().clone() for p in loss.parameters()]
    rec["state"] = state_of(loss.memory)
    return rec


def reference_ddp(world=2):
    from torch.utils.data.distributed import DistributedSampler

    dataset, model, loss = _ddp_setup()
    opt = _ddp_optimizer(model, loss)
    losses = []
    for epoch in range(DDP_EPOCHS):
        shards = []
        for rank in range(world):
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
            sampler.set_epoch(epoch)
            shards.append(list(torch.utils.data.DataLoader(dataset, batch_size=DDP_BATCH, sampler=sampler)))
        for parts in zip(*shards):
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            value = loss(model(x), y)
            value.backward()
            opt.step()
            opt.zero_grad()
            losses.append(value.detach().clone())
    return {
        "loss": losses,
        "model": state_of(model),
        "loss_params": [p.detach().clone() for p in loss.parameters()],
        "state": state_of(loss.memory),
    }


EVEN, PML_M, PML_STEPS = (6, 6), 24, 5


def scenario_pml_wrapper(rank, world):
    """PML's own DistributedLossWrapper, the memory built with distributed=False."""
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    loss = new_loss(memory_size=PML_M, warmup_epochs=1)
    loss.memory.distributed = False
    wrapped = DistributedLossWrapper(loss)
    rec = {"loss": [], "enqueued": [], "stage": [], "scales": []}
    for step in make_batches(5, EVEN, PML_STEPS):
        emb, labels = step[rank]
        value = wrapped(emb.clone().requires_grad_(True), labels)
        value.backward()
        rec["loss"].append(value.detach().clone())
        rec["enqueued"].append(loss.memory.num_enqueued)
        rec["stage"].append(loss.memory.stage)
        rec["scales"].append(read_scales(loss.memory))
    emb, labels = loss.memory.contents()
    rec["contents"] = sorted(zip(labels.tolist(), emb.tolist()))
    return rec


def scenario_pml_wrapper_auto(rank, world):
    """PML's wrapper with the default distributed=None: the memory would gather twice; it warns."""
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    loss = new_loss(memory_size=PML_M, warmup_epochs=1)
    wrapped = DistributedLossWrapper(loss)
    emb, labels = make_batches(5, EVEN, 1)[0][rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped(emb, labels)
    return {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "enqueued": loss.memory.num_enqueued,
    }


def reference_pml_wrapper():
    ref = new_loss(memory_size=PML_M, warmup_epochs=1)
    rec = {"loss": [], "enqueued": [], "stage": [], "scales": []}
    for step in make_batches(5, EVEN, PML_STEPS):
        rec["loss"].append(ref(*concat(step)).detach())
        rec["enqueued"].append(ref.memory.num_enqueued)
        rec["stage"].append(ref.memory.stage)
        rec["scales"].append(read_scales(ref.memory))
    emb, labels = ref.memory.contents()
    rec["contents"] = sorted(zip(labels.tolist(), emb.tolist()))
    return rec


def scenario_dsb_wrapper(rank, world):
    """pml_dsb's DistributedDSBLossWrapper: rank order, uneven sizes."""
    from pml_dsb.distributed import DistributedDSBLossWrapper

    loss = new_loss()
    wrapped = DistributedDSBLossWrapper(loss)
    rec = _new_record()
    for step in make_batches(1, UNEVEN, STEPS):
        emb, labels = step[rank]
        emb = emb.clone().requires_grad_(True)
        value = wrapped(emb, labels)
        value.backward()
        _step_record(rec, loss, value, emb)
        rec.setdefault("param_grad", []).append([p.grad.clone() for p in loss.parameters()])
        loss.zero_grad(set_to_none=True)
    rec["state"] = state_of(loss.memory)
    rec["memory_distributed"] = loss.memory.distributed
    return rec


def reference_dsb_wrapper(world=2):
    """One process: the loss on the concatenated batch, its parameters' gradients,
    and its rows' gradients times world (what DDP's average over ranks needs)."""
    ref = new_loss()
    recs = [_new_record() for _ in UNEVEN]
    for step in make_batches(1, UNEVEN, STEPS):
        emb, labels = concat(step)
        emb = emb.clone().requires_grad_(True)
        value = ref(emb, labels)
        value.backward()
        param_grad = [p.grad.clone() for p in ref.parameters()]
        ref.zero_grad(set_to_none=True)
        start = 0
        for rank, (part, _) in enumerate(step):
            rec = recs[rank]
            rec["loss"].append(value.detach().clone())
            rec["grad"].append(world * emb.grad[start : start + len(part)].clone())
            rec.setdefault("param_grad", []).append(param_grad)
            rec["stage"].append(ref.memory.stage)
            rec["enqueued"].append(ref.memory.num_enqueued)
            rec["scales"].append(read_scales(ref.memory))
            start += len(part)
    for rec in recs:
        rec["state"] = state_of(ref.memory)
    return recs


def _read_only_loss():
    """A loss that only reads a memory filled (locally, with dataset indices) into stage 3."""
    from pml_dsb import SemanticScaleMemory

    memory = SemanticScaleMemory(C, D, M, warmup_epochs=1, distributed=False)
    g = torch.Generator().manual_seed(11)
    memory.enqueue(torch.randn(M, D, generator=g), torch.arange(M) % C, torch.arange(M))
    return new_loss(memory=memory, memory_size=M, warmup_epochs=1, update_memory=False)


def scenario_dsb_wrapper_read(rank, world):
    """DistributedDSBLossWrapper around a loss that does not enqueue: an
    index-addressed memory's addressing, and its size, are not checked against
    batches it only reads (with gradients, and under no_grad past M rows)."""
    from pml_dsb.distributed import DistributedDSBLossWrapper

    loss = _read_only_loss()
    wrapped = DistributedDSBLossWrapper(loss)
    rec = {"loss": []}
    for emb, labels in (make_batches(3, UNEVEN, 1)[0][rank], make_batches(4, (M + 1, M + 1), 1)[0][rank]):
        emb = emb.clone().requires_grad_(True)
        if len(emb) > M:
            with torch.no_grad():
                rec["loss"].append(wrapped(emb, labels).detach())
        else:
            rec["loss"].append(wrapped(emb, labels).detach())
    rec["state"] = state_of(loss.memory)
    return rec


def reference_dsb_wrapper_read(world=2):
    ref = _read_only_loss()
    state = state_of(ref.memory)  # before its reads: those of the ranks keep nothing
    values = []
    for step in (make_batches(3, UNEVEN, 1)[0], make_batches(4, (M + 1, M + 1), 1)[0]):
        with torch.no_grad():
            values.append(ref(*concat(step)))
    return {"loss": values, "state": state}


SHARD_N, SHARD_BATCH = 29, 9  # 4 global batches: 9, 9, 9, 2 samples


def _shard_setup():
    g = torch.Generator().manual_seed(6)
    table = torch.randn(SHARD_N, D, generator=g)
    labels = torch.randint(0, C, (SHARD_N,), generator=g)
    batches = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(range(SHARD_N), generator=torch.Generator().manual_seed(7)),
        batch_size=SHARD_BATCH,
        drop_last=False,
    )
    return table, labels, batches


def scenario_helpers(rank, world):
    """ShardedBatchSampler feeding an index-addressed DSB loss; any_rank, all_gather_objects, broadcast_object."""
    from pml_dsb.distributed import (
        ShardedBatchSampler,
        all_gather_objects,
        any_rank,
        average_gradients,
        barrier,
        broadcast_object,
        distributed_sampler,
    )

    rec = {
        "any_one": any_rank(rank == 1),
        "any_none": any_rank(False),
        "objects": all_gather_objects({"rank": rank}),
        "broadcast": broadcast_object(f"from rank {rank}"),
        "broadcast_from_1": broadcast_object(f"from rank {rank}", src=1),
        "sampler_len": len(distributed_sampler(list(range(5)), drop_last=True)),
    }
    # average_gradients: a frozen parameter is left alone, a missing gradient counts as zero
    summed = torch.nn.Parameter(torch.zeros(3))
    summed.grad = torch.full((3,), float(rank + 1))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    partial = torch.nn.Parameter(torch.zeros(2))
    if rank == 1:
        partial.grad = torch.full((2,), 4.0)
    average_gradients([summed, frozen, partial])
    rec["averaged"] = (summed.grad.clone(), frozen.grad, partial.grad.clone())
    barrier()
    table, labels, batches = _shard_setup()
    loss = new_loss(memory_size=SHARD_N, warmup_epochs=1)
    rec["slices"] = []
    for epoch in range(2):
        for ids in ShardedBatchSampler(batches):
            ids = torch.tensor(ids)
            rec["slices"].append(ids.tolist())
            loss(table[ids], labels[ids], sample_indices=ids)
    rec["state"] = state_of(loss.memory)
    return rec


def reference_helpers():
    table, labels, batches = _shard_setup()
    loss = new_loss(memory_size=SHARD_N, warmup_epochs=1)
    seen = []
    for epoch in range(2):
        for ids in batches:
            if len(ids) < 2:
                continue  # fewer samples than ranks: skipped on every rank
            ids = torch.tensor(ids)
            seen.append(ids.tolist())
            loss(table[ids], labels[ids], sample_indices=ids)
    return {"batches": seen, "state": state_of(loss.memory)}


def scenario_reader(rank, world):
    """A second loss on the same memory that does not enqueue: its parent refuses
    rank 1's batch at step 2 (ref_emb), and every rank hears of it."""
    loss = new_loss()
    reader = new_loss(memory=loss.memory, update_memory=False)
    rec = {"errors": [], "enqueued": []}
    for t, step in enumerate(make_batches(9, UNEVEN, 4)):
        emb, labels = step[rank]
        loss(emb, labels)
        extra = {"ref_emb": emb.clone(), "ref_labels": labels.clone()} if (t, rank) == (2, 1) else {}
        try:
            reader(emb, labels, **extra)
            rec["errors"].append(None)
        except ValueError as err:
            rec["errors"].append((type(err).__name__, getattr(err, "bad_ranks", None)))
        rec["enqueued"].append(loss.memory.num_enqueued)
    return rec


def scenario_one_rank_errors(rank, world):
    """Errors found on one rank before any collective call: indices both passed
    and announced (rank 0), a batch larger than DSBCrossBatchMemory's queue and
    a bad enqueue_mask (rank 1). Every rank must raise at the same step (they
    once raised on one rank only, and the others' collectives then paired with
    the next step's: garbage rows, then an aborted process)."""
    from pytorch_metric_learning.losses import TripletMarginLoss

    from pml_dsb import DSBCrossBatchMemory, with_dsb_weighting

    loss = new_loss()
    torch.manual_seed(0)
    wrapper = DSBCrossBatchMemory(with_dsb_weighting(TripletMarginLoss)(C, D, memory_size=M), D, memory_size=5)
    rec = {"errors": [], "enqueued": [], "queued": []}
    steps = make_batches(12, UNEVEN, 4)  # UNEVEN: rank 1's batch is larger than rank 0's

    def attempt(call):
        try:
            call()
            rec["errors"].append(None)
        except ValueError as err:
            rec["errors"].append(type(err).__name__)
        rec["enqueued"].append((loss.memory.num_enqueued, wrapper.loss.memory.num_enqueued))
        rec["queued"].append(wrapper.queue_idx)

    emb, labels = steps[0][rank]
    offset = sum(len(steps[0][r][0]) for r in range(rank))
    if rank == 0:
        loss.expect_sample_indices(torch.arange(len(emb)) + offset)
    attempt(lambda: loss(emb, labels, sample_indices=torch.arange(len(emb)) + offset))
    emb, labels = steps[1][rank]
    attempt(lambda: wrapper(emb[: 4 + rank * 2], labels[: 4 + rank * 2]))  # 4 and 6 rows; the queue holds 5
    mask = torch.zeros(len(emb) - rank, dtype=torch.bool)  # one flag short on rank 1
    attempt(lambda: wrapper(emb, labels, enqueue_mask=mask))
    emb, labels = steps[3][rank]
    attempt(lambda: wrapper(emb[:4], labels[:4]))
    return rec


def scenario_gather_shapes(rank, world):
    """gather_batch without a check, rank 1's batch malformed in three ways
    (labels one short, 1-D rows, another width), then a good batch. The
    malformed ones once raised on rank 1 only: rank 0 then returned garbage rows
    paired with rank 1's next exchange, and gloo aborted rank 1."""
    from pml_dsb.distributed import gather_batch

    good = torch.full((4, D), float(rank + 1)), torch.full((4,), rank)
    faults = [
        (good[0], good[1][:3]),
        (good[0][:, 0], good[1]),
        (torch.ones(4, D + 1), good[1]),
    ]
    rec = {"errors": [], "batches": []}
    for emb, labels in [*faults, good]:
        if rank == 0:
            emb, labels = good
        try:
            out = gather_batch(emb, labels)
            rec["errors"].append(None)
            rec["batches"].append((out.embeddings, out.labels, out.sizes))
        except ValueError as err:
            rec["errors"].append((type(err).__name__, getattr(err, "bad_ranks", None)))
    # the same labels and sizes on both ranks but other rows: no "same batch"
    # warning (it is meant for an already gathered batch); identical rows warn
    for name, emb in (("warned_other_rows", good[0]), ("warned_same_rows", torch.ones(4, D))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gather_batch(emb, torch.zeros(4, dtype=torch.long))
        rec[name] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # dataset indices on rank 0 only: refused on every rank, rank 1 named
    try:
        gather_batch(good[0], good[1], torch.arange(4) if rank == 0 else None)
        rec["indices_on_one_rank"] = None
    except ValueError as err:
        rec["indices_on_one_rank"] = (type(err).__name__, getattr(err, "bad_ranks", None))
    # float16 rows on rank 0, float64 on rank 1: both come back in float64, exact
    rows = (torch.arange(4 * D, dtype=torch.float64).reshape(4, D) / 3 + rank).to(
        torch.float16 if rank == 0 else torch.float64)
    rec["widest"] = (rows, gather_batch(rows, good[1], widest_dtype=True).embeddings)
    return rec


def scenario_rank_local_read(rank, world):
    """scales() read on rank 0 alone during the warm-up (logging on the main
    process): it once built and kept the statistics there only, and the ranks'
    memories then differed (state_dicts, and scales by ~1e-15)."""
    from pml_dsb import SemanticScaleMemory

    mem = SemanticScaleMemory(C, D, M, warmup_epochs=WARMUP)
    rec = {"read": [], "scales": []}
    for t, step in enumerate(make_batches(13, UNEVEN, STEPS)):
        if rank == 0 and mem.stage < 3 and t > 0:
            rec["read"].append(mem.scales())
        mem.enqueue(*step[rank])
        if mem.stage == 3:
            rec["scales"].append(mem.scales())
    rec["state"] = state_of(mem)
    return rec


def scenario_rank_local_read_late(rank, world):
    """Rank 0 reads scales() at every step, rank 1 only at the last: a gathering
    memory fed by enqueue() (a DSB-CE loop) and a loss under
    DistributedDSBLossWrapper (whose memory does not gather itself). The reads
    on rank 0 alone once built (in the warm-up, under the wrapper) or refreshed
    (in stage 3) the statistics there first, and the ranks' memories differed."""
    from pml_dsb import SemanticScaleMemory
    from pml_dsb.distributed import DistributedDSBLossWrapper

    mem, loss = SemanticScaleMemory(C, D, M, warmup_epochs=WARMUP), new_loss()
    wrapped = DistributedDSBLossWrapper(loss)
    rec = {"scales": [], "loss": [], "stage": []}
    steps = make_batches(14, UNEVEN, STEPS + 3)
    for t, step in enumerate(steps):
        mem.enqueue(*step[rank])
        rec["loss"].append(wrapped(*step[rank]).detach().clone())
        rec["stage"].append(mem.stage)
        if rank == 0 or t == len(steps) - 1:
            rec["scales"].append((mem.scales(), loss.memory.scales()))
    rec["state"], rec["wrapped_state"] = state_of(mem), state_of(loss.memory)
    rec["contents"] = mem.contents()
    return rec


def scenario_enqueue_mismatch(rank, world):
    """Rank 0 calls the loss under torch.no_grad() at step 1 (it only reads),
    rank 1 with gradients (it enqueues): their next collective calls differed,
    and gloo aborted both. Now every rank raises, and no memory changes."""
    from pml_dsb.distributed import DistributedDSBLossWrapper

    direct, wrapped_loss = new_loss(), new_loss()
    wrapped = DistributedDSBLossWrapper(wrapped_loss)
    rec = {"errors": [], "enqueued": []}
    for t, step in enumerate(make_batches(15, UNEVEN, 3)):
        emb, labels = step[rank]
        for call in (direct, wrapped):
            try:
                with torch.no_grad() if (t, rank) == (1, 0) else contextlib.nullcontext():
                    call(emb, labels)
                rec["errors"].append(None)
            except ValueError as err:
                rec["errors"].append((type(err).__name__, getattr(err, "bad_ranks", None)))
        rec["enqueued"].append((direct.memory.num_enqueued, wrapped_loss.memory.num_enqueued))
    return rec


F64_STEPS = 5


def _wide_batches():
    """Per rank: rank 0 float64 rows with one of norm ~1e300 (finite in float64
    only), rank 1 float32 rows, and a row of norm ~1e-300 on rank 0."""
    steps = make_batches(8, UNEVEN, F64_STEPS)
    for step in steps:
        emb0 = step[0][0].double()
        emb0[0] *= 1e300
        emb0[1] *= 1e-300
        step[0] = (emb0, step[0][1])
    return steps


def scenario_wide(rank, world):
    """Float64 (beyond float32's range) and float32 ranks: the gathering memory
    called directly, and the DSB wrapper, against one process."""
    from pml_dsb.distributed import DistributedDSBLossWrapper

    direct, wrapped_loss = new_loss(), new_loss()
    wrapped = DistributedDSBLossWrapper(wrapped_loss)
    rec = {"direct_loss": [], "wrapped_loss": [], "dtype": []}
    for step in _wide_batches():
        emb, labels = step[rank]
        rec["direct_loss"].append(direct(emb, labels).detach().clone())
        value = wrapped(emb, labels)
        rec["wrapped_loss"].append(value.detach().clone())
        rec["dtype"].append(str(value.dtype))
    rec["direct_state"], rec["wrapped_state"] = state_of(direct.memory), state_of(wrapped_loss.memory)
    return rec


def reference_wide(world=2):
    memory_ref, wrapped_ref = new_loss(), new_loss()
    losses = []
    for step in _wide_batches():
        memory_ref(*concat(step))  # torch.cat: float64 for all rows
        losses.append(wrapped_ref(*concat(step)).detach())
    return {"direct_state": state_of(memory_ref.memory), "wrapped_state": state_of(wrapped_ref.memory),
            "wrapped_loss": losses}


SCENARIOS = {
    "helpers": scenario_helpers,
    "direct": scenario_direct,
    "faults": scenario_faults,
    "indices": scenario_indices,
    "ddp": scenario_ddp,
    "pml_wrapper": scenario_pml_wrapper,
    "pml_wrapper_auto": scenario_pml_wrapper_auto,
    "dsb_wrapper": scenario_dsb_wrapper,
    "one_rank_errors": scenario_one_rank_errors,
    "dsb_wrapper_read": scenario_dsb_wrapper_read,
    "wide": scenario_wide,
    "reader": scenario_reader,
    "gather_shapes": scenario_gather_shapes,
    "rank_local_read": scenario_rank_local_read,
    "rank_local_read_late": scenario_rank_local_read_late,
    "enqueue_mismatch": scenario_enqueue_mismatch,
}


# ------------------------------------------------------------------- launcher
def launch(out_dir, scenarios, world=2, timeout_s=150.0, attempts=2):
    """Run this file as ``world`` ranks; return each rank's records. Kills both on timeout."""
    log = ""
    for _ in range(attempts):
        port = free_port()
        procs = []
        for rank in range(world):
            env = local_rank_env(rank, world, port)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(out_dir), ",".join(scenarios)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout_s
        outputs, timed_out = [], False
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                timed_out = True
                for other in procs:
                    other.kill()
                outputs.append(proc.communicate()[0])
        log = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o}" for r, (p, o) in enumerate(zip(procs, outputs)))
        if timed_out:
            raise TimeoutError(f"the {world} ranks did not finish within {timeout_s} s\n{log}")
        if all(p.returncode == 0 for p in procs):
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
        if "address already in use" not in log.lower():
            break
    raise RuntimeError(f"a rank failed\n{log}")


def _worker_main(out_dir, names):
    import torch.distributed as dist

    from pml_dsb.distributed import destroy, init_from_env

    torch.set_num_threads(1)
    ctx = init_from_env(backend="gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S))
    results = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name](ctx.rank, ctx.world_size)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    dist.barrier()
    destroy()


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2].split(","))
