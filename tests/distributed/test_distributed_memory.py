"""Two gloo processes on 127.0.0.1 (spawned by the fixture, killed after a time limit).

Every scenario of ``distributed_testlib`` runs once, in one pair of processes;
each test below checks one scenario's records against the other rank and
against one process fed the concatenated batches.
"""
import numpy as np
import pytest
import torch
from torch.testing import assert_close

import distributed_testlib as lib

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return lib.launch(tmp_path_factory.mktemp("two_ranks"), list(lib.SCENARIOS))


def records(ranks, name):
    recs = [r[name] for r in ranks]
    for rank, rec in enumerate(recs):
        assert "error" not in rec, f"rank {rank} failed in {name}:\n{rec['error']}"
    return recs


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_uneven_direct_calls_give_identical_memories_equal_to_one_process(ranks):
    r0, r1 = records(ranks, "direct")
    assert_same_state(r0["state"], r1["state"])
    assert r0["stage"] == r1["stage"] == [1, 2, 2, 3, 3, 3, 3]
    assert r0["enqueued"] == r1["enqueued"] == [12 * (t + 1) for t in range(lib.STEPS)]  # global samples
    for s0, s1 in zip(r0["scales"], r1["scales"]):
        assert torch.equal(s0, s1)
    ref = lib.reference_direct()
    assert_same_state(r0["state"], ref[0]["state"])
    for t in range(lib.STEPS):
        assert torch.equal(r0["scales"][t], ref[0]["scales"][t])


def test_each_rank_loss_is_the_one_process_loss_on_its_part_with_global_weights(ranks):
    recs, refs = records(ranks, "direct"), lib.reference_direct()
    for rec, ref in zip(recs, refs):
        assert rec["stage"] == ref["stage"]
        for t in range(lib.STEPS):
            assert_close(rec["loss"][t], ref["loss"][t], rtol=1e-6, atol=0)
            assert_close(rec["grad"][t], ref["grad"][t], rtol=1e-6, atol=1e-9)
    # stage 3 really weights: the two ranks' parts get different mean weights
    assert recs[0]["scales"][-1].std() > 0


def test_bad_batch_on_any_rank_raises_everywhere_and_changes_nothing(ranks):
    r0, r1 = records(ranks, "faults")
    for t in range(lib.FAULT_STEPS):
        e0, e1 = r0["errors"][t], r1["errors"][t]
        if t not in lib.FAULTS:
            assert e0 is None and e1 is None, (t, e0, e1)
            continue
        assert e0 is not None and e1 is not None, (t, e0, e1)
        assert e0[0] == e1[0] == "BatchRejectedError"
        assert e0[1] == e1[1]  # the same message on every rank
        assert e0[2] == e1[2]
        assert r0["unchanged"][t] and r1["unchanged"][t]
    # the message names the rank and the local reason
    assert "rank 1: ValueError: embeddings contain NaN or Inf in 1 of 7 rows" in r0["errors"][1][1]
    assert r0["errors"][1][2] == [1] and r1["errors"][1][3] == "ValueError" and r0["errors"][1][3] is None
    assert "rank 0: ValueError: labels must lie in [0, num_classes=5)" in r1["errors"][2][1]
    # rank 0 passed indices to a first-in-first-out memory (its own check refuses them)
    assert "rank 0: ValueError: the memory was filled first in, first out" in r1["errors"][3][1]
    assert r0["errors"][4][2] == [0, 1] and "rank 0: TypeError" in r0["errors"][4][1]
    assert r0["errors"][4][3] == "TypeError" and r1["errors"][4][3] == "ValueError"
    assert "rank 1: ValueError: labels are required" in r0["errors"][5][1]
    assert "rank 0: TypeError: embeddings must be floating point" in r1["errors"][6][1]
    assert r0["errors"][7][2] == r1["errors"][7][2] == [1]  # the parent loss refused ref_emb on rank 1
    assert r0["errors"][8][2] == r1["errors"][8][2] == [0]  # PML's shape check, before compute_loss


def test_training_continues_after_rejected_batches(ranks):
    r0, r1 = records(ranks, "faults")
    ref = lib.reference_faults()
    assert r0["enqueued"] == r1["enqueued"] == [12] * 9 + [24]  # int32 labels at step 9: a good batch
    assert_same_state(r0["state"], r1["state"])
    assert_same_state(r0["state"], ref["state"])
    assert torch.equal(r0["scales"], ref["scales"])


def test_index_addressed_memory_keeps_a_sample_repeated_across_ranks_once(ranks):
    r0, r1 = records(ranks, "indices")
    ref = lib.reference_indices()
    assert r0["enqueued"] == r1["enqueued"] == ref["enqueued"] == [11, 23]
    assert_same_state(r0["state"], r1["state"])
    assert_same_state(r0["state"], ref["state"])


def test_global_batch_larger_than_the_memory_is_refused_on_every_rank(ranks):
    r0, r1 = records(ranks, "indices")
    assert r0["too_large"] == r1["too_large"]
    assert r0["too_large"][0] == (
        "the global batch of 12 embeddings ([5, 7] per rank) is larger than memory_size=10"
    )
    assert r0["too_large"][1] == "batch of 12 embeddings is larger than memory_size=10"
    assert r0["too_large_enqueued"] == r1["too_large_enqueued"] == 0
    # a sample repeated across ranks counts once against memory_size (it once counted twice)
    assert r0["distinct_fit"] == r1["distinct_fit"] == 11


def test_ddp_loop_with_distributed_sampler_matches_one_process(ranks):
    r0, r1 = records(ranks, "ddp")
    assert r0["is_ddp"] == "DistributedDataParallel"
    assert_same_state(r0["state"], r1["state"])
    assert_same_state(r0["model"], r1["model"])
    for p0, p1 in zip(r0["loss_params"], r1["loss_params"]):
        assert torch.equal(p0, p1)  # the loss's own parameters stay in step
    ref = lib.reference_ddp()
    for t, value in enumerate(ref["loss"]):  # equal shards: the global mean is the mean of the ranks'
        assert_close((r0["loss"][t] + r1["loss"][t]) / 2, value, rtol=1e-5, atol=1e-6)
    for key in ref["model"]:
        assert_close(r0["model"][key], ref["model"][key], rtol=1e-5, atol=1e-6)
    for p, q in zip(r0["loss_params"], ref["loss_params"]):
        assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key in ("embedding_memory", "cached_scales"):
        assert_close(r0["state"][key], ref["state"][key], rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["state"]["label_memory"], ref["state"]["label_memory"])
    assert torch.equal(r0["state"]["enqueued_count"], ref["state"]["enqueued_count"])


def test_pml_distributed_loss_wrapper_with_distributed_false_enqueues_each_sample_once(ranks):
    r0, r1 = records(ranks, "pml_wrapper")
    ref = lib.reference_pml_wrapper()
    assert r0["enqueued"] == r1["enqueued"] == ref["enqueued"] == [12, 24, 36, 48, 60]
    assert r0["stage"] == r1["stage"] == ref["stage"]
    # M is a multiple of the global batch here, so both ranks hold the same samples
    # (PML puts each rank's own rows first: the order differs, not the contents)
    assert r0["contents"] == r1["contents"] == ref["contents"]
    for t in range(lib.PML_STEPS):
        assert_close(r0["scales"][t], ref["scales"][t], rtol=1e-12, atol=1e-12)
        assert_close(r1["scales"][t], ref["scales"][t], rtol=1e-12, atol=1e-12)
        # PML's wrapper returns world_size * the loss of the global batch
        assert_close(r0["loss"][t], 2 * ref["loss"][t], rtol=1e-6, atol=0)
        assert_close(r1["loss"][t], 2 * ref["loss"][t], rtol=1e-6, atol=0)


def test_pml_wrapper_with_a_gathering_memory_is_detected(ranks):
    r0, r1 = records(ranks, "pml_wrapper_auto")
    for rec in (r0, r1):
        assert any("DistributedLossWrapper" in w and "distributed=False" in w for w in rec["warnings"])
        assert rec["enqueued"] == 24  # what the warning is about: 12 samples counted twice


def test_dsb_loss_wrapper_is_exact_with_uneven_batches(ranks):
    recs, refs = records(ranks, "dsb_wrapper"), lib.reference_dsb_wrapper()
    assert recs[0]["memory_distributed"] is False
    assert_same_state(recs[0]["state"], recs[1]["state"])
    assert_same_state(recs[0]["state"], refs[0]["state"])
    for rec, ref in zip(recs, refs):
        assert rec["stage"] == ref["stage"] == [1, 2, 2, 3, 3, 3, 3]
        assert rec["enqueued"] == ref["enqueued"]
        for t in range(lib.STEPS):
            assert torch.equal(rec["scales"][t], ref["scales"][t])
            assert_close(rec["loss"][t], ref["loss"][t], rtol=1e-6, atol=0)
            assert_close(rec["grad"][t], ref["grad"][t], rtol=1e-5, atol=1e-8)
            # the loss's centres: the one-process gradient (PML's wrapper gives world_size times it)
            for got, want in zip(rec["param_grad"][t], ref["param_grad"][t]):
                assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_sharded_batches_reproduce_the_one_process_run_and_helpers_agree(ranks):
    r0, r1 = records(ranks, "helpers")
    for rec in (r0, r1):
        assert rec["any_one"] is True and rec["any_none"] is False
        assert rec["objects"] == [{"rank": 0}, {"rank": 1}]
        assert rec["broadcast"] == "from rank 0" and rec["broadcast_from_1"] == "from rank 1"
        # torch's own sampler with drop_last: 5 samples over 2 ranks leave 2 each
        assert rec["sampler_len"] == len(torch.utils.data.DistributedSampler(
            list(range(5)), num_replicas=2, rank=0, drop_last=True)) == 2
        summed, frozen, partial = rec["averaged"]
        assert torch.equal(summed, torch.full((3,), 1.5)) and frozen is None
        assert torch.equal(partial, torch.full((2,), 2.0))  # (0 + 4) / 2: rank 0 had none
    ref = lib.reference_helpers()
    # rank order concatenation of the slices is the one-process batch (the 2-sample one skipped)
    assert [a + b for a, b in zip(r0["slices"], r1["slices"])] == ref["batches"]
    assert [len(x) for x in r0["slices"]] == [5, 5, 5, 1, 5, 5, 5, 1]
    assert_same_state(r0["state"], r1["state"])
    assert_same_state(r0["state"], ref["state"])


def test_float64_and_float32_ranks_match_one_process(ranks):
    """Each rank sends its rows as the memory stores them (normalised, then
    float32), and the wrapper computes in the widest dtype on every rank: a
    float32 copy of float64 rows once rounded them first (a row of norm 1e300
    became inf and the batch was refused; one of 1e-300 became zero)."""
    r0, r1 = records(ranks, "wide")
    ref = lib.reference_wide()
    for key in ("direct_state", "wrapped_state"):
        assert_same_state(r0[key], r1[key])
        assert_same_state(r0[key], ref[key])
    assert r0["dtype"] == r1["dtype"] == ["torch.float64"] * lib.F64_STEPS
    for t in range(lib.F64_STEPS):
        assert torch.equal(r0["wrapped_loss"][t], r1["wrapped_loss"][t])
        assert_close(r0["wrapped_loss"][t], ref["wrapped_loss"][t], rtol=1e-12, atol=0)


def test_a_loss_that_does_not_enqueue_shares_its_parents_verdict(ranks):
    r0, r1 = records(ranks, "reader")
    assert r0["errors"] == r1["errors"] == [None, None, ("BatchRejectedError", [1]), None]
    assert r0["enqueued"] == r1["enqueued"] == [12, 24, 36, 48]


def test_dsb_wrapper_around_a_loss_that_only_reads(ranks):
    recs, ref = records(ranks, "dsb_wrapper_read"), lib.reference_dsb_wrapper_read()
    for rec in recs:
        assert len(rec["loss"]) == 2
        for got, want in zip(rec["loss"], ref["loss"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert_same_state(rec["state"], ref["state"])  # nothing enqueued, nothing kept by the reads


def test_errors_found_on_one_rank_raise_on_every_rank_at_once(ranks):
    r0, r1 = records(ranks, "one_rank_errors")
    assert r0["errors"] == r1["errors"] == ["BatchRejectedError"] * 3 + [None]
    assert r0["enqueued"] == r1["enqueued"] == [(0, 0)] * 3 + [(0, 8)]
    assert r0["queued"] == r1["queued"] == [0, 0, 0, 4]  # each rank's PML queue (local) took its 4 rows once


def test_gather_batch_without_a_check_rejects_malformed_batches_on_every_rank(ranks):
    r0, r1 = records(ranks, "gather_shapes")
    assert r0["errors"] == r1["errors"] == [("BatchRejectedError", [1])] * 3 + [None]
    for emb, labels, sizes in (r0["batches"][0], r1["batches"][0]):
        assert sizes == [4, 4] and labels.tolist() == [0] * 4 + [1] * 4
        assert torch.equal(emb, torch.cat([torch.full((4, lib.D), 1.0), torch.full((4, lib.D), 2.0)]))
    for rec in (r0, r1):
        assert rec["warned_other_rows"] == []
        assert len(rec["warned_same_rows"]) == 1 and "all 2 ranks passed the same batch" in rec["warned_same_rows"][0]
        assert rec["indices_on_one_rank"] == ("BatchRejectedError", [1])
    (rows0, got0), (rows1, got1) = r0["widest"], r1["widest"]
    assert rows0.dtype == torch.float16 and rows1.dtype == torch.float64  # precondition
    want = torch.cat([rows0.double(), rows1])
    assert got0.dtype == got1.dtype == torch.float64 and torch.equal(got0, want) and torch.equal(got1, want)


def test_scales_read_on_one_rank_before_stage_3_keep_the_memories_equal(ranks, np_ref):
    r0, r1 = records(ranks, "rank_local_read")
    assert len(r0["read"]) >= 2 and r1["read"] == [] and len(r0["scales"]) >= 2  # reads in stages 1 and 2
    assert_same_state(r0["state"], r1["state"])
    for a, b in zip(r0["scales"], r1["scales"]):
        assert torch.equal(a, b)
    # what rank 0 read: the scales of the memory's contents then, from scratch
    mem_steps = lib.make_batches(13, lib.UNEVEN, lib.STEPS)
    rows = torch.nn.functional.normalize(torch.cat([lib.concat(step)[0] for step in mem_steps[:1]]), dim=1)
    labels = lib.concat(mem_steps[0])[1]
    want = np_ref.class_scales(rows.double().numpy(), labels.numpy(), lib.C, normalize=False)
    np.testing.assert_allclose(r0["read"][0].numpy(), want, rtol=1e-6, atol=1e-12)


def test_scales_read_on_one_rank_at_any_stage_keep_the_memories_equal(ranks, np_ref):
    r0, r1 = records(ranks, "rank_local_read_late")
    assert r0["stage"][0] == 1 and r0["stage"][-1] == 3 and len(r0["scales"]) == len(r0["stage"])
    assert len(r1["scales"]) == 1  # rank 1 reads once, at the last step
    assert_same_state(r0["state"], r1["state"])
    assert_same_state(r0["wrapped_state"], r1["wrapped_state"])
    assert all(torch.equal(a, b) for a, b in zip(r0["loss"], r1["loss"]))
    for a, b in zip(r0["scales"][-1], r1["scales"][0]):
        assert torch.equal(a, b)
    rows, labels = r0["contents"]
    want = np_ref.class_scales(rows.double().numpy(), labels.numpy(), lib.C, normalize=False)
    np.testing.assert_allclose(r0["scales"][-1][0].numpy(), want, rtol=1e-6, atol=1e-12)


def test_ranks_that_disagree_on_enqueueing_raise_everywhere_and_change_nothing(ranks):
    r0, r1 = records(ranks, "enqueue_mismatch")
    rejected = ("BatchRejectedError", [0])  # rank 0 only reads: the rank named
    assert r0["errors"] == r1["errors"] == [None, None, rejected, rejected, None, None]
    assert r0["enqueued"] == r1["enqueued"] == [(12, 12), (12, 12), (24, 24)]
