"""faiss access for the evaluation functions (private).

faiss is imported through :mod:`pml_dsb._optional` when a function first
needs it, never at import time. GPU faiss is used only when the input lives on
a CUDA device *and* the installed faiss has GPU support (``faiss-gpu``);
otherwise everything runs on CPU faiss.
"""
from __future__ import annotations

import logging
from types import ModuleType

from pml_dsb import _optional

logger = logging.getLogger(__name__)

# faiss' GPU k-selection handles at most this many neighbours (faiss >= 1.7.3).
GPU_MAX_K = 2048

_gpu_resources: dict[int, object] = {}
_warned_no_gpu = False


def faiss() -> ModuleType:
    return _optional.faiss()


def gpu_device(cuda_index: int | None) -> int | None:
    """The GPU to run faiss on for an input on ``cuda_index``, or None for CPU."""
    global _warned_no_gpu
    if cuda_index is None:
        return None
    fa = faiss()
    if not hasattr(fa, "StandardGpuResources") or fa.get_num_gpus() < 1:
        if not _warned_no_gpu:
            logger.info(
                "input is on CUDA but the installed faiss has no GPU support; "
                "using CPU faiss (install faiss-gpu for GPU search)"
            )
            _warned_no_gpu = True
        return None
    return cuda_index


def exact_ip_search(reference, device: int | None):
    """A function ``search(queries, k) -> (similarities, indices)`` that finds
    the k largest inner products with the rows of ``reference`` exactly.

    On CPU it calls ``faiss.knn`` (the kernel behind ``IndexFlatIP.search``)
    on ``reference`` in place, so the reference set is not copied; on GPU it
    copies the reference set into a ``GpuIndexFlatIP`` on ``device``.
    """
    fa = faiss()
    if device is None:
        def search(queries, k):
            return fa.knn(queries, reference, k, metric=fa.METRIC_INNER_PRODUCT)

        return search
    res = _gpu_resources.get(device)
    if res is None:
        res = _gpu_resources[device] = fa.StandardGpuResources()
    index = fa.index_cpu_to_gpu(res, device, fa.IndexFlatIP(reference.shape[1]))
    index.add(reference)
    return index.search
