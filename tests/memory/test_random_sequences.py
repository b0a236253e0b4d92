"""Random sequences of memory operations against a float64 from-scratch
computation: first-in-first-out and index-addressed enqueues (mixed in one
memory), refreshes, checkpoint round trips into a fresh memory, and resets.
Labels are skewed so that classes grow past the Gram form, shrink again and
arrive empty with a batch larger than ``gram_size``; small ``gram_size`` and
``low_rank_min_size`` reach the low-rank caches, d = 256 the paths kept for
big d x d blocks."""
from unittest import mock

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pml_dsb import SemanticScaleMemory
from pml_dsb.memory import _class_statistics


def _reference(memory, np_ref):
    z, y = memory.contents()
    return np_ref.class_scales(z.double().numpy(), y.numpy(), memory.num_classes, normalize=False)


# index-addressed enqueues weigh most: the low-rank caches need runs of them
_KINDS = ["fifo", "fifo", "index", "index", "index", "index", "relabel", "scales", "reload", "reset"]


@st.composite
def _setups(draw):
    d = draw(st.sampled_from([4, 8, 8, 256]))
    classes = draw(st.integers(3, 6))
    size = draw(st.integers(8, 40))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(_KINDS),
                st.integers(1, min(size, 12)),  # batch size
                st.integers(0, classes - 1),  # the class most of the batch goes to
                st.floats(0.0, 1.0),  # share of the batch that goes to it
            ),
            min_size=1,
            max_size=40,
        )
    )
    return {
        "d": d,
        "classes": classes,
        "size": size,
        # past the slot lists' capacity (16 here) at times: the Gram clears stop there
        "gram_size": draw(st.one_of(st.integers(2, 8), st.just(20))),
        "max_share": draw(st.sampled_from([None, 0.6])),
        "seed": draw(st.integers(0, 2**16)),
        "start_full": draw(st.booleans()),
        # one addressing per memory (the memory refuses a switch); about 2 in 3 index-addressed
        "indexed": draw(st.sampled_from([True, True, False])),
        "steps": steps,
    }


def _assert_bookkeeping(memory):
    """Counts, and once the statistics are built the slot lists and
    positions, describe the stored labels."""
    labels = memory.label_memory
    filled = torch.nonzero(labels >= 0).flatten()
    counts = torch.bincount(labels[filled], minlength=memory.num_classes)
    assert torch.equal(memory.class_counts, counts)
    if not bool(memory.statistics_built):
        return
    # Gram form: z_i . z_j at occupied positions i, j, exactly 0 elsewhere
    z = memory.embedding_memory.double()
    for c in torch.nonzero(memory.moment_index < 0).flatten().tolist():
        slots = memory.class_slots[c, : memory.gram_size]
        slots = torch.cat([slots, slots.new_full((memory.gram_size - len(slots),), -1)])
        rows = z[slots.clamp(min=0)] * (slots >= 0).double().unsqueeze(1)
        torch.testing.assert_close(memory.gram[c], rows @ rows.T, rtol=1e-12, atol=1e-12)
        free = slots < 0
        assert not bool(memory.gram[c][free].any()) and not bool(memory.gram[c][:, free].any())
    assert torch.equal((memory.class_slots >= 0).sum(1), counts)
    assert torch.equal(memory.class_slots[labels[filled], memory.slot_position[filled]], filled)
    assert bool((memory.slot_position[labels < 0] == -1).all())


def _memory(setup):
    memory = SemanticScaleMemory(
        setup["classes"], setup["d"], setup["size"], warmup_epochs=1, gram_size=setup["gram_size"]
    )
    memory.low_rank_min_size = 2
    memory.low_rank_max_share = setup["max_share"]
    return memory


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=_setups())
def test_random_operation_sequences_match_a_from_scratch_computation(setup, np_ref):
    _run_sequence(setup, np_ref)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=_setups())
def test_the_accelerator_paths_on_cpu_match_a_from_scratch_computation(setup, np_ref):
    """The batched forms that CUDA tensors take (one padded product per bucket,
    at most 3 buckets, the d x d blocks of big d batched), run on CPU tensors:
    CI has no GPU, and these are the algorithms every GPU user runs."""
    with mock.patch.object(_class_statistics, "_cpu_tuned", lambda tensor: False):
        _run_sequence(setup, np_ref)


def _run_sequence(setup, np_ref):
    gen = torch.Generator().manual_seed(setup["seed"])
    memory = _memory(setup)
    # index-addressed enqueues keep each sample's label (class counts stay put:
    # the low-rank path) unless relabelled; first-in-first-out ones draw anew
    sample_label = torch.randint(0, setup["classes"], (setup["size"],), generator=gen)
    if setup["start_full"]:  # as after a first epoch: every slot holds its sample
        memory.enqueue(torch.randn(setup["size"], setup["d"], generator=gen), sample_label,
                       torch.arange(setup["size"]) if setup["indexed"] else None)
        memory.scales()
    for kind, batch, main, share in setup["steps"]:
        if kind in ("fifo", "index", "relabel"):
            if not setup["indexed"]:
                kind = "fifo"
            elif kind == "fifo":
                kind = "index"
            labels = torch.randint(0, setup["classes"], (batch,), generator=gen)
            labels[torch.rand(batch, generator=gen) < share] = main
            indices = None
            if kind != "fifo":
                indices = torch.randperm(setup["size"], generator=gen)[:batch]
                if kind == "index":
                    labels = sample_label[indices]
                sample_label[indices] = labels
            memory.enqueue(torch.randn(batch, setup["d"], generator=gen), labels, indices)
        elif kind == "reload":
            fresh = _memory(setup)
            fresh.load_state_dict(memory.state_dict())
            memory = fresh
        elif kind == "reset":
            memory.reset()
        # odd seeds refresh after every operation (as stage-3 training does), even
        # ones only at "scales" steps (several enqueues between two refreshes)
        _assert_bookkeeping(memory)
        if kind != "reset" and memory.num_enqueued and (kind == "scales" or setup["seed"] % 2):
            np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=1e-8, atol=1e-10)
    if memory.num_enqueued:
        np.testing.assert_allclose(memory.scales().numpy(), _reference(memory, np_ref), rtol=1e-8, atol=1e-10)
    assert memory.num_filled == len(memory.contents()[1])
