"""Low-rank updates of the class matrices of an index-addressed
:class:`~pml_dsb.memory.SemanticScaleMemory`.

Once a class's count stops changing (each sample overwrites its own slot), its
matrix changes by a low-rank term per batch: rank 2 per replaced sample in the
Gram form, 2r + 1 for r samples in the moment form. After one exact refresh at
an unchanged count the class keeps the inverse and log det of its matrix, and
each enqueue updates both with the Woodbury identity and the matrix
determinant lemma, O(r n^2) for an n x n matrix instead of an O(n^3)
factorisation. A mixin: the caches it updates are registered by the memory.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _class_statistics
from ._class_statistics import _rank_within_groups


class LowRankCaches:
    """The cached inverses and log dets of an index-addressed memory's classes,
    and their Woodbury updates."""

    #: Smallest class matrix kept for low-rank updates; smaller ones are
    #: refactorised at every refresh even in an index-addressed memory. None
    #: (default): 128 on CPU, where below that the dozens of small tensor
    #: operations of a low-rank update cost more than a Cholesky factorisation;
    #: never on other devices, where the batched factorisation measured faster
    #: at every benchmark shape (benchmarks/bench_dsb_step.py). Tests set it.
    low_rank_min_size: Optional[int] = None

    def _low_rank_min_size(self) -> float:
        if self.low_rank_min_size is not None:
            return self.low_rank_min_size
        return 128 if _class_statistics._cpu_tuned(self.gram) else math.inf

    #: A class's update is applied in low rank only while its rank k (2 per
    #: replaced sample, +1 in the moment form) stays below this share of its
    #: matrix size n; above it an exact refresh is cheaper (e.g. for a batch
    #: holding hundreds of one class's samples, from a class-sorted sampler).
    #: On CPU at n = 512 (enqueue + refresh, one thread) a rank-257 update
    #: took 20 ms against 24 ms refreshed exactly, a rank-385 one 36 against
    #: 29 ms. None: no limit. Tests set it.
    low_rank_max_share: Optional[float] = 0.6

    def _ensure_inverse_pool(self, name: str, rows: int) -> None:
        pool = getattr(self, name)
        if pool.shape[0] < rows:
            extra = pool.new_zeros(rows - pool.shape[0], *pool.shape[1:])
            setattr(self, name, torch.cat([pool, extra]))

    def _store_cache(self, classes: torch.Tensor, logdet: torch.Tensor) -> None:
        self.cache_logdet[classes] = logdet
        self.cache_valid[classes] = True
        self.cache_updates[classes] = 0

    def _plan_low_rank(
        self,
        old_labels: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        counts_before: torch.Tensor,
        large_before: torch.Tensor,
    ) -> Optional[dict]:
        """Pick the touched classes whose cached inverse can absorb this enqueue.

        Called after the bookkeeping and before the statistics change: keeps
        what the update needs from before (moment sums, Gram rows). Classes
        whose count or form changed, or that are due an exact refresh, lose
        their cache.
        """
        if not bool(self.cache_valid.any()):  # FIFO memories never keep caches
            return None
        touched = torch.unique(torch.cat([old_labels, labels]))
        cached = touched[self.cache_valid[touched]]
        if cached.numel() == 0:
            return None
        counts = self.class_counts[cached]
        large = self.moment_index[cached] >= 0
        ok = (counts == counts_before[cached]) & (large == large_before[cached])
        ok &= self.cache_updates[cached] < self.exact_refresh_every
        if bool((~large).any()):
            # the Gram path keeps positions 0..m-1: with an unchanged count the
            # new samples then took exactly the freed positions
            ok[~large] &= self._class_width(cached[~large]) == counts[~large]
        if self.low_rank_max_share is not None:
            replaced = torch.bincount(labels, minlength=self.num_classes)[cached]
            rank = torch.where(large, 2 * replaced + 1, 2 * replaced)
            ok &= rank < self.low_rank_max_share * torch.where(large, self.embedding_size, counts)
        self.cache_valid[cached[~ok]] = False
        cached, large = cached[ok], large[ok]
        if cached.numel() == 0:
            return None
        member = torch.zeros(self.num_classes, dtype=torch.bool, device=cached.device)
        member[cached[~large]] = True
        gram_new = member[labels]  # new samples of low-rank Gram classes
        large_classes = cached[large]
        return {
            "small": cached[~large],
            "large": large_classes,
            "sum_before": self.moment_sum[self.moment_index[large_classes]].clone(),
            "gram_new": gram_new,
            "rows_before": self.gram[labels[gram_new], positions[gram_new]].clone(),
        }

    def _apply_low_rank(
        self, plan: dict, removed: tuple, emb: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Woodbury + determinant-lemma update of the planned classes' caches,
        after the statistics took this enqueue's samples."""
        d = self.embedding_size
        if plan["large"].numel():
            classes = plan["large"]
            index = self.moment_index[classes]
            m = self.class_counts[classes].to(torch.float64)
            old_labels, _, old_emb, _ = removed
            new_z, new_real = _pad_groups(classes, labels, emb.to(torch.float64), self.num_classes)
            old_z, old_real = _pad_groups(classes, old_labels, old_emb.to(torch.float64), self.num_classes)
            # about the old mean mu = s/m (no terms of size m that cancel): the scatter
            # S changes by sum_new (z-mu)(z-mu)^T - sum_old (z-mu)(z-mu)^T - m dmu dmu^T
            mean = (plan["sum_before"] / m.unsqueeze(1)).unsqueeze(1)
            shift = (self.moment_sum[index] - plan["sum_before"]) / m.unsqueeze(1)
            new_z = (new_z - mean) * new_real.unsqueeze(2)
            old_z = (old_z - mean) * old_real.unsqueeze(2)
            u = torch.cat([new_z, old_z, shift.unsqueeze(1)], 1).transpose(1, 2)
            core = torch.diag_embed(
                torch.cat([new_real.to(torch.float64), -old_real.to(torch.float64), -m.unsqueeze(1)], 1)
            )
            if d >= 256:
                # big d x d inverses: each pool row in place, no gathered copy
                inverses = [self.moment_inverse[row] for row in index.tolist()]
                real = torch.cat([new_real, old_real, torch.ones_like(new_real[:, :1])], 1)
                change, ok = _low_rank_logdet_update_each(inverses, u, core, real)
            else:
                inverse = self.moment_inverse.index_select(0, index)
                change, ok = _low_rank_logdet_update(inverse, u, core)
                self.moment_inverse[index] = inverse
            self._finish_low_rank(classes, change, ok, torch.full_like(m, float(d)))
        if plan["small"].numel():
            sel = plan["gram_new"]
            delta = self.gram[labels[sel], positions[sel]] - plan["rows_before"]  # (k, gram_size)
            classes = plan["small"]
            m_all = self.class_counts[classes]
            for bucket in self._buckets(m_all):
                self._gram_low_rank(classes[bucket], m_all[bucket], labels[sel], positions[sel], delta)

    def _gram_low_rank(
        self,
        classes: torch.Tensor,
        counts: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        delta: torch.Tensor,
    ) -> None:
        """Low-rank update of Gram-form classes of similar size, from the
        changes ``delta`` of the Gram rows at the new samples' ``positions``."""
        # positions 0..m-1 hold the class; replacing the rows P of the Gram matrix K
        # by K + D changes K by E D + D^T E^T - E D_PP E^T, and the centred
        # H K H by [HE, HD^T] [[-D_PP, I], [I, 0]] [HE, HD^T]^T (rank 2 per sample)
        width = int(counts.max())
        member = torch.zeros(self.num_classes, dtype=torch.bool, device=classes.device)
        member[classes] = True
        mine = member[labels]
        deltas, real = _pad_groups(classes, labels[mine], delta[mine, :width], self.num_classes)
        pos, _ = _pad_groups(classes, labels[mine], positions[mine].unsqueeze(1), self.num_classes)
        pos = pos.squeeze(2)  # (t, k), 0 where not real
        t, k = pos.shape
        m = counts.to(torch.float64)
        realf = real.to(torch.float64)
        valid = (torch.arange(width, device=m.device) < counts.unsqueeze(1)).to(torch.float64)  # (t, width)
        d_pp = torch.gather(deltas, 2, pos.unsqueeze(1).expand(t, k, k)) * realf.unsqueeze(2) * realf.unsqueeze(1)
        he = F.one_hot(pos, width).to(torch.float64).transpose(1, 2) - (valid / m.unsqueeze(1)).unsqueeze(2)
        he = he * realf.unsqueeze(1)
        hd = deltas.transpose(1, 2) - valid.unsqueeze(2) * (deltas.sum(2) / m.unsqueeze(1)).unsqueeze(1)
        u = torch.cat([he, hd], 2)
        eye = torch.diag_embed(realf)
        core = torch.cat([torch.cat([-d_pp, eye], 2), torch.cat([eye, torch.zeros_like(eye)], 2)], 1)
        # each class's n x n inverse in place, at its own n: no gathered, padded copy
        rows = self.gram_inverse_index[classes].tolist()
        inverses = [self.gram_inverse[row, :n, :n] for row, n in zip(rows, counts.tolist())]
        change, ok = _low_rank_logdet_update_each(inverses, u, core, torch.cat([real, real], 1))
        self._finish_low_rank(classes, change, ok, m)

    def _finish_low_rank(
        self, classes: torch.Tensor, change: torch.Tensor, ok: torch.Tensor, n: torch.Tensor
    ) -> None:
        """New scales from the updated log dets; classes that failed go back to an exact refresh."""
        m = self.class_counts[classes].to(torch.float64)
        logdet = self.cache_logdet[classes] + change
        bits = (logdet - n * torch.log(m / self.embedding_size)) / (2.0 * math.log(2.0))
        good, bad = classes[ok], classes[~ok]
        self.cache_logdet[good] = logdet[ok]
        self.cached_scales[good] = self._exact_if_near_zero(good, bits[ok])
        self.stale[good] = False
        self.cache_updates[good] += 1
        self.cache_valid[bad] = False


def _pad_groups(classes: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, num_classes: int):
    """Rows of each class of ``classes`` (by ``labels``) as a zero-padded
    (len(classes), k, ...) block, with a (len(classes), k) mask of real rows.
    Rows whose label is not in ``classes`` are left out."""
    local = torch.full((num_classes,), -1, dtype=torch.long, device=classes.device)
    local[classes] = torch.arange(len(classes), device=classes.device)
    where = local[labels]
    keep = where >= 0
    where, rows = where[keep], rows[keep]
    counts = torch.bincount(where, minlength=len(classes))
    k = max(int(counts.max()), 1) if len(classes) else 1
    rank = _rank_within_groups(where, counts)
    out = rows.new_zeros(len(classes), k, *rows.shape[1:])
    real = torch.zeros(len(classes), k, dtype=torch.bool, device=rows.device)
    out[where, rank] = rows
    real[where, rank] = True
    return out, real


def _low_rank_logdet_update(inverse: torch.Tensor, u: torch.Tensor, core: torch.Tensor):
    """For A' = A + U C U^T with ``inverse`` = A^-1 (t, n, n): replace ``inverse``
    by A'^-1 in place (Woodbury) and return log det A' - log det A (determinant
    lemma: det(I + C U^T A^-1 U)) and a mask of the updates whose determinant
    ratio came out positive and finite (a necessary condition only: A' with
    two negative eigenvalues would pass; the periodic exact refresh bounds drift)."""
    w = inverse @ u  # (t, n, k)
    change, ok, x = _woodbury_core(u, w, core)
    inverse.baddbmm_(w @ x, w.transpose(1, 2), alpha=-1.0)
    return change, ok


def _low_rank_logdet_update_each(inverses: list[torch.Tensor], u: torch.Tensor, core: torch.Tensor, real: torch.Tensor):
    """:func:`_low_rank_logdet_update` on matrices updated in place one by one
    (views into a pool; the i-th is n_i x n_i, with u[i] zero past row n_i):
    the n x n products matrix by matrix, the small k x k algebra batched.

    ``real`` (t, k): the columns of each U in use; the others must be zero in
    U and in C's rows and columns. Each matrix's products then take only its
    own columns, not the most changed class's k that the batch pads to (the
    products read and write each inverse whatever k: 0.94x the memory step at
    imagenetlt512, index-addressed, in benchmarks/bench_memory_ab.py)."""
    # the columns in use first (a permutation of U's columns and of C alike)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    u = torch.gather(u, 2, order.unsqueeze(1).expand_as(u))
    core = torch.gather(core, 1, order.unsqueeze(2).expand_as(core))
    core = torch.gather(core, 2, order.unsqueeze(1).expand_as(core))
    ranks = real.sum(1).tolist()
    w = torch.zeros_like(u)
    for i, (inverse, r) in enumerate(zip(inverses, ranks)):
        n = len(inverse)
        w[i, :n, :r] = torch.mm(inverse, u[i, :n, :r])
    change, ok, x = _woodbury_core(u, w, core)
    # x is zero in the unused rows and columns: W X W^T takes the used ones only
    wx = w @ x
    for i, (inverse, r) in enumerate(zip(inverses, ranks)):
        n = len(inverse)
        inverse.addmm_(wx[i, :n, :r], w[i, :n, :r].T, alpha=-1.0)
    return change, ok


def _woodbury_core(u: torch.Tensor, w: torch.Tensor, core: torch.Tensor):
    """The k x k part of :func:`_low_rank_logdet_update`, from ``w`` = A^-1 U:
    log det A' - log det A, the mask of usable updates, and X with
    A'^-1 = A^-1 - W X W^T."""
    k = u.shape[2]
    small = torch.eye(k, dtype=u.dtype, device=u.device) + core @ (u.transpose(1, 2) @ w)
    lu, pivots, info = torch.linalg.lu_factor_ex(small)
    diag = torch.diagonal(lu, dim1=1, dim2=2)
    swaps = (pivots != torch.arange(1, k + 1, device=pivots.device, dtype=pivots.dtype)).sum(1)
    positive = (torch.where(diag < 0, -1, 1).prod(1) * (1 - 2 * (swaps % 2))) > 0
    change = torch.log(diag.abs()).sum(1)
    ok = (info == 0) & positive & torch.isfinite(change)
    # (I + C G)^-1 C = (C^-1 + G)^-1: the Woodbury core, without inverting C
    x = torch.linalg.lu_solve(lu, pivots, core)
    x = 0.5 * (x + x.transpose(1, 2))  # symmetric in exact arithmetic: keep the update symmetric
    return change, ok, x
