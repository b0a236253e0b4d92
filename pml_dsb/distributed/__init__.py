"""torch.distributed support: the memory's collective gather, DDP helpers, PML's wrapper for DSB losses.

See :mod:`pml_dsb.distributed.gather` for the collective contract (every rank
calls the loss each iteration).
"""
from .ddp import (
    DistributedContext,
    ShardedBatchSampler,
    all_gather_objects,
    any_rank,
    average_gradients,
    barrier,
    broadcast_object,
    current_context,
    destroy,
    distributed_sampler,
    free_port,
    get_rank,
    get_world_size,
    init_from_env,
    is_main_process,
    local_rank_env,
    wrap_model,
)
from .gather import (
    BatchRejectedError,
    GlobalBatch,
    check_batch_collectively,
    gather_batch,
    is_distributed,
    should_gather,
)
from .pml_wrapper import DistributedDSBLossWrapper

__all__ = [
    "BatchRejectedError",
    "GlobalBatch",
    "is_distributed",
    "should_gather",
    "check_batch_collectively",
    "gather_batch",
    "DistributedDSBLossWrapper",
    "DistributedContext",
    "init_from_env",
    "current_context",
    "destroy",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "distributed_sampler",
    "ShardedBatchSampler",
    "any_rank",
    "all_gather_objects",
    "wrap_model",
    "average_gradients",
    "broadcast_object",
    "barrier",
    "free_port",
    "local_rank_env",
]
