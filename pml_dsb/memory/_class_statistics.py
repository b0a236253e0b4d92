"""Per-class statistics of :class:`~pml_dsb.memory.SemanticScaleMemory` and
the scales computed from them.

A class that has never held more than ``gram_size`` samples keeps the Gram
matrix of its samples (Gram form: each new sample adds one row, m*d work; its
scale is a factorisation in the m x m space); a larger class keeps running
first and second moments (moment form: each sample adds or removes an outer
product; a d x d factorisation). Both are float64 and kept up to date at each
enqueue, so that no refresh re-reads a class's samples. A mixin: the buffers
it updates are registered by the memory.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..functional.semantic_scale import logdet_and_inverse_spd, logdet_spd, size_buckets

logger = logging.getLogger(__name__)

#: Most values gathered or produced at once by a batched statistics update
#: (bounds its temporaries: 4M values, 32 MiB in float64).
_CHUNK_VALUES = 1 << 22

#: Most stored values gathered at once for the Gram rows of new samples: a
#: block that stays in a core's cache (1 MiB in float64) until it is used.
_CACHED_VALUES = 1 << 17

#: Most values of the per-sample outer products that a moment update on CPU
#: builds at once (a batch's, at small d); larger updates go class by class.
_PER_SAMPLE_VALUES = 1 << 22


def _cpu_tuned(tensor: torch.Tensor) -> bool:
    """Whether the paths tuned for CPUs serve ``tensor``'s device: factorisations
    of each class's own block, per-class loops over cache-sized blocks, fine size
    buckets, low-rank updates from 128 rows on. Elsewhere (CUDA, other
    accelerators) the batched forms, whose padding costs less than more kernel
    launches and host synchronisations. The one switch between the two, so that
    tests can run the accelerator paths on CPU tensors."""
    return tensor.device.type == "cpu"


def _rank_within_groups(inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rank of each element among the elements of its group (stable order)."""
    order = torch.argsort(inverse, stable=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(inverse), device=inverse.device) - first[inverse[order]]
    return rank


class ClassStatistics:
    """The Gram-form and moment-form statistics of a :class:`SemanticScaleMemory`
    and the scales of stale classes computed from them."""

    # Gram form: gram[c, i, j] = z_i . z_j (float64) for the samples at positions
    # i, j of class c's slot list; rows and columns of free positions are zero,
    # and positions never reach class_slots' capacity (the clears rely on both).
    # Moment form: moment_sum[k] = sum z and moment_outer[k] = sum z z^T over
    # the samples of the class with moment_index == k.

    #: Most batches that classes of different sizes are split into for their
    #: Gram rows and factorisations (each batch padded to its largest class).
    #: None (default): on CPU, where padding costs arithmetic, sizes within a
    #: factor 1.5 share a batch however many batches that makes; on other
    #: devices, where each batch costs kernel launches and host
    #: synchronisations, the finest of the factors 1.5, 2, 4, 8 that needs at
    #: most 3 batches (on an H200 this kept the 1.5 of balanced CUB-sized
    #: classes and took long-tailed ones to 8: benchmarks/bench_dsb_step.py
    #: --device cuda). Tests set it.
    max_buckets: Optional[int] = None

    def _buckets(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        limit = self.max_buckets
        if limit is None and not _cpu_tuned(sizes):
            limit = 3
        return size_buckets(sizes, 1.5, limit)

    def _build_statistics(self) -> None:
        """Build every class's statistics from the stored samples, in one pass.

        Enqueues before the first :meth:`scales` call only fill the ring buffer:
        the unweighted stages need no scales. Positions follow slot order,
        classes of more than ``gram_size`` samples take the moment form, every
        class is marked stale, and no low-rank cache is kept yet.
        """
        dev, d = self.label_memory.device, self.embedding_size
        filled = torch.nonzero(self.label_memory >= 0).flatten()
        labels = self.label_memory[filled]
        order = torch.argsort(labels, stable=True)
        slots, labels = filled[order], labels[order]
        counts = torch.bincount(labels, minlength=self.num_classes)
        if len(labels) and int(counts.max()) > self.class_slots.shape[1]:
            self._grow_capacity(int(counts.max()))
        positions = torch.arange(len(slots), device=dev) - (torch.cumsum(counts, 0) - counts)[labels]
        self.class_slots.fill_(-1)
        self.slot_position.fill_(-1)
        self.class_slots[labels, positions] = slots
        self.slot_position[slots] = positions

        large = torch.nonzero(counts > self.gram_size).flatten()
        self.moment_index.fill_(-1)
        self.moment_index[large] = torch.arange(len(large), device=dev)
        self.moment_sum = torch.zeros(len(large), d, dtype=torch.float64, device=dev)
        self.moment_outer = torch.zeros(len(large), d, d, dtype=torch.float64, device=dev)
        self._add_stored_moments(large, counts[large])

        self.gram.zero_()
        small = torch.nonzero((counts > 0) & (counts <= self.gram_size)).flatten()
        for part, width in self._class_chunks(small, counts[small]):
            rows = self.class_slots[part, :width]
            z = self._gather_rows(rows) * (rows >= 0).to(self.scale_dtype).unsqueeze(2)
            # products in scale_dtype, as _add_gram_rows computes them
            self.gram[part, :width, :width] = (z @ z.transpose(1, 2)).to(torch.float64)

        for name in ("gram_inverse", "moment_inverse"):
            pool = getattr(self, name)
            setattr(self, name, pool.new_empty((0, *pool.shape[1:])))
        self.gram_inverse_index.fill_(-1)
        self.exact_count.fill_(-1)
        self.cache_valid.zero_()
        self.cache_updates.zero_()
        self.cache_logdet.zero_()
        self.stale.fill_(True)
        self.statistics_built.fill_(True)

    def _promote_large_classes(self, labels: torch.Tensor, grouped: Optional[tuple] = None) -> None:
        """Switch classes that would outgrow the Gram form to moments, for good
        (``grouped``: as :meth:`_allocate_positions` takes it)."""
        if grouped is None:
            grouped = torch.unique(labels, return_inverse=True, return_counts=True)
        classes, _, new_counts = grouped
        grow = (self.class_counts[classes] + new_counts > self.gram_size) & (self.moment_index[classes] < 0)
        promote = classes[grow]
        if promote.numel() == 0:
            return
        start = self.moment_sum.shape[0]
        d, dev = self.embedding_size, self.moment_sum.device
        self.moment_sum = torch.cat([self.moment_sum, torch.zeros(len(promote), d, dtype=torch.float64, device=dev)])
        self.moment_outer = torch.cat(
            [self.moment_outer, torch.zeros(len(promote), d, d, dtype=torch.float64, device=dev)]
        )
        self.moment_index[promote] = torch.arange(start, start + len(promote), device=dev)
        self.gram[promote] = 0.0
        self._add_stored_moments(promote, self._class_width(promote))
        logger.debug("classes %s switched to the moment form", promote.tolist())

    def _class_chunks(self, classes: torch.Tensor, widths: torch.Tensor):
        """``classes`` in (part, width) batches of similar ``widths`` (the
        positions their samples occupy), with a bounded number of stored values each."""
        for bucket in self._buckets(widths):
            part, width = classes[bucket], int(widths[bucket].max())
            if width == 0:  # nothing stored yet: a class promoted by its first batch
                continue
            step = max(1, _CHUNK_VALUES // (width * self.embedding_size))
            for start in range(0, len(part), step):
                yield part[start : start + step], width

    def _add_stored_moments(self, classes: torch.Tensor, widths: torch.Tensor) -> None:
        """Add the stored samples of moment-form ``classes`` to their (zeroed) moments."""
        for part, width in self._class_chunks(classes, widths):
            rows = self.class_slots[part, :width]
            filled = rows >= 0
            index = self.moment_index[part].unsqueeze(1).expand_as(rows)[filled]
            z = self.embedding_memory[rows[filled]]
            self._accumulate_moments(index, z, torch.ones(len(index), dtype=torch.float64, device=z.device))

    def _accumulate_moments(self, index: torch.Tensor, z: torch.Tensor, sign: torch.Tensor) -> None:
        """moment_sum[index] += sign * z and moment_outer[index] += sign * z z^T."""
        if index.numel() == 0:
            return
        z = z.to(torch.float64)
        signed = z * sign.unsqueeze(1)
        self.moment_sum.index_add_(0, index, signed)
        d, cpu = self.embedding_size, _cpu_tuned(z)
        if cpu and d < 256 and len(index) * d * d <= _PER_SAMPLE_VALUES:
            # a batch's samples on CPU (small d): each sample's outer product, summed
            # into its row by index_add_, half the time of the grouped, padded
            # products below at d = 64 (those win for the many samples per class
            # of a first build)
            self.moment_outer.index_add_(0, index, signed.unsqueeze(2) * z.unsqueeze(1))
            return
        rows, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
        if cpu:
            # big d x d blocks on CPU: update each row in place, no (rows, d, d)
            # temporary (elsewhere a kernel launch per class costs more)
            order = torch.argsort(inverse, stable=True)
            signed, z = signed[order], z[order]  # grouped by row: slices below, not gathers
            end = torch.cumsum(counts, 0).tolist()
            for row, start, stop in zip(rows.tolist(), [0, *end[:-1]], end):
                self.moment_outer[row].addmm_(signed[start:stop].T, z[start:stop])
            return
        width, rank = int(counts.max()), _rank_within_groups(inverse, counts)
        left = z.new_zeros(len(rows), width, d)
        right = torch.zeros_like(left)
        left[inverse, rank] = signed
        right[inverse, rank] = z
        step = max(1, _CHUNK_VALUES // (d * max(d, width)))  # bounds the (rows, d, d) products
        for start in range(0, len(rows), step):
            part = slice(start, start + step)
            self.moment_outer.index_add_(0, rows[part], left[part].transpose(1, 2) @ right[part])

    def _update_statistics(
        self,
        removed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        emb: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        refill: bool = False,
    ) -> None:
        """Account for removed samples (labels, positions, embeddings, was-large)
        and new ones. ``refill``: each removed sample's position is taken by a
        new sample of its class, whose row and column overwrite it (up to the
        widest class of its bucket; past that they are zero already)."""
        old_labels, old_positions, old_emb, old_large = removed
        dev = emb.device
        n_old, n_new = len(old_labels), len(labels)
        n_old_large = int(old_large.sum())
        # Gram form: clear the rows and columns of removed samples
        if not refill and n_old_large < n_old:
            small = ~old_large
            c, p = old_labels[small], old_positions[small]
            # positions never reach the slot lists' capacity: nothing to clear past it
            span = min(self.gram_size, self.class_slots.shape[1])
            self.gram[c, p, :span] = 0.0
            self.gram[c.unsqueeze(1), torch.arange(span, device=dev), p.unsqueeze(1)] = 0.0
        # moment form: one signed update for removed and added samples (boolean
        # masks only where some samples are of the Gram form)
        new_index = self.moment_index[labels]
        if old_labels is labels:  # a refill in place: the same classes out and in, forms unchanged
            new_large, n_new_large = old_large, n_old_large
        else:
            new_large = new_index >= 0
            n_new_large = int(new_large.sum())
        if old_labels is labels and n_old_large == n_old:
            old_index = new_index
        elif n_old_large == n_old:
            old_index = self.moment_index[old_labels]
        else:
            old_index = self.moment_index[old_labels[old_large]]
            old_emb = old_emb[old_large]
        if n_new_large < n_new:
            new_index, new_emb = new_index[new_large], emb[new_large]
        else:
            new_emb = emb
        sign = torch.ones(n_old_large + n_new_large, dtype=torch.float64, device=dev)
        sign[:n_old_large] = -1.0
        self._accumulate_moments(torch.cat([old_index, new_index]), torch.cat([old_emb, new_emb]), sign)
        # Gram form: one new row (and column) per added sample
        if n_new_large < n_new:
            self._add_gram_rows(labels[~new_large], positions[~new_large], emb[~new_large])

    def _add_gram_rows(self, labels: torch.Tensor, positions: torch.Tensor, emb: torch.Tensor) -> None:
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        rank = _rank_within_groups(inverse, counts)
        widths = self._class_width(classes)
        cpu = _cpu_tuned(emb)
        for bucket in self._buckets(widths):
            if cpu:  # most new samples first: each part below is padded to its own first class's
                bucket = bucket[torch.argsort(counts[bucket], descending=True, stable=True)]
            width, kmax = int(widths[bucket].max()), int(counts[bucket].max())
            # new samples of the bucket's classes, as (classes, kmax, d) blocks
            local = torch.full((len(classes),), -1, dtype=torch.long, device=emb.device)
            local[bucket] = torch.arange(len(bucket), device=emb.device)
            mine = local[inverse] >= 0
            # products in scale_dtype: float64 is exact for float32 inputs;
            # float32 is about twice as fast (accuracy: see scale_dtype)
            new = emb.new_zeros(len(bucket), kmax, emb.shape[1], dtype=self.scale_dtype)
            new[local[inverse[mine]], rank[mine]] = emb[mine].to(self.scale_dtype)
            slots = self.class_slots[classes[bucket], :width]
            products = new.new_empty(len(bucket), kmax, width)
            # on CPU a few classes at a time, so that each gathered block of stored
            # rows is multiplied while still in cache: at d = 512 a whole bucket's
            # block is ~15 MiB in float64, written out and read back from memory.
            # Elsewhere one product per bucket: each part costs kernel launches
            step = max(1, _CACHED_VALUES // (width * emb.shape[1])) if cpu else len(bucket)
            # rows that each part needs (rank < count): on CPU its first class's,
            # as the bucket is sorted; elsewhere one part, the bucket's most
            firsts = counts[bucket[::step]].tolist() if cpu else [kmax]
            for start, k in zip(range(0, len(bucket), step), firsts):
                part = slice(start, start + step)
                products[part, :k] = torch.bmm(new[part, :k], self._gather_rows(slots[part]).transpose(1, 2))
            rows = products[local[inverse[mine]], rank[mine]]  # (k, width)
            rows = rows.to(torch.float64) * (slots[local[inverse[mine]]] >= 0)
            c, p = labels[mine].unsqueeze(1), positions[mine].unsqueeze(1)
            cols = torch.arange(width, device=emb.device)
            self.gram[c, p, cols] = rows
            self.gram[c, cols, p] = rows

    def _gather_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Stored embeddings at a (k, width) block of slots (-1: any row, the
        caller masks it) as a (k, width, d) block in scale_dtype."""
        # index_select on the flat slots: row copies, ~3x faster on CPU than
        # advanced indexing with a 2-D index
        flat = self.embedding_memory.index_select(0, slots.clamp(min=0).flatten())
        return flat.view(*slots.shape, self.embedding_size).to(self.scale_dtype)

    def _class_width(self, classes: torch.Tensor) -> torch.Tensor:
        """1 + the last occupied position of each class's slot list (0 if empty)."""
        occupied = self.class_slots[classes, : self.gram_size] >= 0
        last = torch.where(occupied, torch.arange(occupied.shape[1], device=occupied.device) + 1, 0)
        return last.max(1).values

    def _compute_scales(self, classes: torch.Tensor) -> torch.Tensor:
        counts = self.class_counts[classes]
        ready = counts >= 2
        index = self.moment_index[classes]
        large = ready & (index >= 0)
        n_large = int(large.sum())
        low_rank_min = self._low_rank_min_size()
        # whether any class here could keep an inverse (see below), from Python
        # values alone: if not, no build masks (a FIFO memory, or d and gram_size
        # both below low_rank_min_size, as at CUB's d = 64 on CPU)
        may_build = self.l2_normalize and (
            (n_large and self.embedding_size >= low_rank_min)
            or (n_large < len(classes) and self.gram_size >= low_rank_min and self.scale_dtype == torch.float64)
        ) and bool(self.index_addressed)
        if not may_build and 0 < n_large == len(classes):  # every class large and ready, none cached
            out = self._moment_scales(classes, counts, None, index)
            self.exact_count[classes] = counts
            self.cache_valid[classes] = False
            return out
        out = torch.zeros(len(classes), dtype=torch.float64, device=classes.device)
        # keep an inverse for the low-rank path where it will pay: index-addressed
        # enqueues and a count unchanged since this class's last exact refresh.
        # Not for unnormalised rows: a class mixing norms 1 and 300 drifted to
        # 4e-2 relative error through the Woodbury updates (exact refreshes: 1e-12)
        if may_build:
            build = ready & (counts == self.exact_count[classes]) & self.index_addressed & self.l2_normalize
        else:
            build = torch.zeros_like(ready)
        if n_large:
            build_large = build[large] & (self.embedding_size >= self._low_rank_min_size())
            out[large] = self._moment_scales(classes[large], counts[large], build_large)
            build[large] = build_large
        small = torch.nonzero(ready & ~large).flatten()
        if small.numel():
            widths = self._class_width(classes[small])
            # the low-rank Gram path needs positions 0..m-1, and exact products: it
            # works in float64 on the stored Gram rows, where float32 products'
            # rounding is spread (a class of identical samples kept S ~ 1e-9 > eps
            # through its updates and took all the weight)
            build[small] = (
                build[small]
                & (widths == counts[small])
                & (widths >= self._low_rank_min_size())
                & (self.scale_dtype == torch.float64)
            )
            for bucket in self._buckets(widths):
                part = small[bucket]
                out[part] = self._gram_scales(classes[part], counts[part], widths[bucket], build[part])
        self.exact_count[classes] = counts
        self.cache_valid[classes[~build]] = False
        return out

    # Both forms factorise K + beta*I with beta = m/d instead of I + (d/m)*K:
    # log det(I_n + K/beta) = log det(K + beta*I_n) - n*log(beta), and adding
    # beta to a diagonal is cheaper than scaling a whole batch of matrices.
    def _gram_scales(
        self, classes: torch.Tensor, counts: torch.Tensor, widths: torch.Tensor, build: torch.Tensor
    ) -> torch.Tensor:
        width = int(widths.max())
        # index_select copies whole blocks: faster on CPU than advanced indexing
        gram = self.gram[:, :width, :width].index_select(0, classes)
        valid = (self.class_slots[classes, :width] >= 0).to(torch.float64)
        m = counts.to(torch.float64).unsqueeze(1)
        rows = gram.sum(2)
        total = rows.sum(1, keepdim=True)
        # centring K = G - (r v^T + v r^T)/m + (g/m^2) v v^T as one rank-2 update
        left = torch.stack([rows, valid], 2)
        right = torch.stack([-valid / m, -rows / m + total / m**2 * valid], 2)
        gram.baddbmm_(left, right.transpose(1, 2))
        # positions past a class's own width are empty (beta*I blocks): LAPACK
        # factorises each class's own block; batched GPU factorisations gain nothing
        sizes = widths if _cpu_tuned(gram) else None
        bits, logdet, inverse = self._logdet_bits(gram, m.squeeze(1), build, sizes)
        if inverse is not None:
            built, beta = classes[build], m.squeeze(1)[build] / self.embedding_size
            new = built[self.gram_inverse_index[built] < 0]
            if new.numel():  # rows for classes cached in the Gram form for the first time
                start = self.gram_inverse.shape[0]
                self._ensure_inverse_pool("gram_inverse", start + len(new))
                self.gram_inverse_index[new] = torch.arange(start, start + len(new), device=new.device)
            self.gram_inverse[self.gram_inverse_index[built], :width, :width] = inverse
            # the identity block of padded positions is not part of the class's matrix
            self._store_cache(built, logdet[build] - (width - m.squeeze(1)[build]) * torch.log(beta))
        return bits

    def _moment_scales(
        self,
        classes: torch.Tensor,
        counts: torch.Tensor,
        build: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Scales of moment-form ``classes``; ``build``: those that keep an inverse
        (None: none); ``index``: their ``moment_index`` if the caller has it."""
        if index is None:
            index = self.moment_index[classes]
        m = counts.to(torch.float64)
        mean_part = self.moment_sum[index] / m.sqrt().unsqueeze(1)
        if self.embedding_size >= 256 and _cpu_tuned(index):
            if build is None:
                build = torch.zeros(len(classes), dtype=torch.bool, device=classes.device)
            return self._moment_scales_one_by_one(classes, index, m, mean_part, build)
        scatter = self.moment_outer.index_select(0, index)
        scatter.baddbmm_(mean_part.unsqueeze(2), mean_part.unsqueeze(1), alpha=-1.0)
        bits, logdet, inverse = self._logdet_bits(scatter, m, build)
        if inverse is not None:
            self._ensure_inverse_pool("moment_inverse", self.moment_sum.shape[0])
            self.moment_inverse[index[build]] = inverse
            self._store_cache(classes[build], logdet[build])
        return bits

    def _moment_scales_one_by_one(
        self, classes: torch.Tensor, index: torch.Tensor, m: torch.Tensor, mean_part: torch.Tensor, build: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_moment_scales` for big d on CPU: each class's matrix is built
        in one reused d x d buffer and factorised while it is still in cache. A
        batch of hundreds of fresh 2 MiB blocks (at d = 512) is written out and
        read back from memory, page faults included: 470 against 250-340 ms for
        100 classes at d = 512, one thread."""
        d = self.embedding_size
        beta = m / d
        buffer = torch.empty(1, d, d, dtype=torch.float64, device=index.device)
        reduced = torch.empty(len(index), dtype=torch.float64, device=index.device)  # log det(I + K/beta)
        cached = build.tolist()
        if any(cached):
            self._ensure_inverse_pool("moment_inverse", self.moment_sum.shape[0])
            logdet = torch.empty_like(reduced)
        for i, (row, beta_i) in enumerate(zip(index.tolist(), beta.tolist())):
            torch.addr(self.moment_outer[row], mean_part[i], mean_part[i], alpha=-1.0, out=buffer[0])
            buffer[0].diagonal().add_(beta_i)
            if cached[i]:
                value, inverse = logdet_and_inverse_spd(buffer)
                self.moment_inverse[row] = inverse[0]
                logdet[i] = value[0]
                reduced[i] = value[0] - d * math.log(beta_i)
            else:
                reduced[i] = self._reduced_logdet(buffer, beta[i : i + 1])[0]
        if any(cached):
            self._store_cache(classes[build], logdet[build])
        return reduced / (2.0 * math.log(2.0))

    def _logdet_bits(
        self,
        matrix: torch.Tensor,
        m: torch.Tensor,
        build: Optional[torch.Tensor] = None,
        sizes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """S = 0.5*log2 det(I + K/beta) from K (changed in place), beta = m/d.

        Also returns, for the rows in ``build``, log det(K + beta*I) (other
        rows unset) and the float64 inverse of K + beta*I (both None if there
        are no such rows). ``sizes``: K
        is zero outside each matrix's leading block of that size, whose
        factorisation then suffices (a padded batch).
        """
        beta = m / self.embedding_size
        matrix.diagonal(dim1=1, dim2=2).add_(beta.unsqueeze(1))
        inverse = None
        if build is not None and bool(build.any()):
            n_log_beta = matrix.shape[-1] * torch.log(beta)
            logdet = torch.empty(len(matrix), dtype=torch.float64, device=matrix.device)
            reduced = torch.empty_like(logdet)
            logdet[build], inverse = logdet_and_inverse_spd(matrix[build])
            reduced[build] = logdet[build] - n_log_beta[build]
            rest = ~build
            if bool(rest.any()):
                reduced[rest] = self._reduced_logdet(matrix[rest], beta[rest], None if sizes is None else sizes[rest])
        else:
            reduced, logdet = self._reduced_logdet(matrix, beta, sizes), None
        return reduced / (2.0 * math.log(2.0)), logdet, inverse

    def _reduced_logdet(
        self, matrix: torch.Tensor, beta: torch.Tensor, sizes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """float64 log det(I + K/beta) from SPD float64 matrices K + beta*I
        (overwritten), factorised in scale_dtype; ``sizes``: each matrix is
        beta*I past its leading block of that size, and only that block is
        factorised.

        float32 factorises I + K/beta itself: the log det of K + beta*I less
        n*log(beta) would keep float32 rounding of n*|log beta| (a class of
        identical samples, K = 0, then got a scale of ~1e-6 > eps instead of 0
        and took all the weight). In float64 that rounding stays below eps
        (~3e-13 at d = 512), and factorising K + beta*I as it is saves a pass."""
        n = matrix.shape[-1] if sizes is None else sizes
        if self.scale_dtype == torch.float64:
            return logdet_spd(matrix, overwrite=True, sizes=sizes) - n * torch.log(beta)
        matrix /= beta.view(-1, 1, 1)
        try:
            reduced = logdet_spd(matrix.to(torch.float32), overwrite=True, sizes=sizes)
        except torch.linalg.LinAlgError:
            reduced = logdet_spd(matrix, overwrite=True, sizes=sizes)  # float32 rounding: redo in float64
        return reduced.to(torch.float64)
