"""ShardedIndex: one passage index split across torch.distributed ranks (gloo on CPU, NCCL on GPU); each rank
holds a slice with global labels, search = local top-k, all-gather, merge (identical to one index over all)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ._util import check_ids_arg, check_k, check_labels, check_matrix
from .flat import FlatIndex

_MSG_BYTES = 1024  # how much of a failing rank's error message the other ranks get to show


class ShardedIndex:
    """An index whose rows are spread over the ranks of a process group. Every method except `local`,
    `local_len`, `dim` and `to` is a collective: all ranks of the group must call it, in the same order.

    Each add() call numbers its rows rank-major: rank 0's slice, then rank 1's, and so on. Default labels follow
    that order, continuing after the largest label so far, so label order is the order of one FlatIndex built by
    adding each call's slices in rank order. The merge breaks equal scores toward the lower label, so with default
    labels (or any labels increasing in that order) results are identical to that single FlatIndex, ties
    included (a FlatIndex breaks ties toward the earlier row), and NaN scores rank as -inf as they do there.

    A failure on any rank -- bad input, or the local index refusing or failing its part of an add() or a search()
    -- raises on every rank instead of leaving the others waiting in a collective: the failed rank raises its own
    error, the others one naming the failed rank(s) and its message. add() is then undone on every rank.

    Args:
        dim: vector dimension. dtype, sketch: storage dtype and int8 sketch (see FlatIndex) of the default local
            FlatIndex.
        group: the process group (default: the world). local: an existing local index (FlatIndex or HNSWIndex,
            e.g. loaded from a shard file) holding this rank's slice with global labels; with HNSW the local
            top-k is approximate, the merge is the same.
    """

    def __init__(self, dim: int, dtype: str = "float32", *, sketch: bool = False, group=None, local=None):
        if sketch and local is not None:
            raise ValueError("sketch=True configures the default local FlatIndex; with local=..., give that index "
                             "its sketch (FlatIndex(..., sketch=True) or local.build_sketch())")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedIndex needs torch.distributed initialised (dist.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local = FlatIndex(dim, dtype, sketch=sketch) if local is None else local
        if self.local.dim != dim:
            raise ValueError(f"local index has dim {self.local.dim}, ShardedIndex was given {dim=}")
        # NCCL only moves CUDA tensors; gloo moves CPU ones.
        backend = dist.get_backend(group)
        self._comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        # The global count and next default label are agreed collectively so every rank knows them.
        local_n = len(self.local)
        local_next = self.local._labels.next_default() if len(self.local) else 0
        stats = self._gather(torch.tensor([local_n, local_next], dtype=torch.int64))
        self._count = int(stats[:, 0].sum())
        self._next_label = int(stats[:, 1].max())

    # ---- collectives ----
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """all_gather of a same-shape tensor from every rank -> [world, *t.shape] on the CPU."""
        t = t.to(self._comm).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out).cpu()

    def _gather_ragged(self, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """all_gather of tensors whose dim 0 differs by rank (sizes known to all): pad, gather, trim."""
        pad = max(sizes)
        buf = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype)
        buf[: t.shape[0]] = t.cpu()
        got = self._gather(buf)
        return [got[r, : sizes[r]] for r in range(self.world_size)]

    def _agree(self, err: BaseException | None, what: str) -> None:
        """Collective: raise on every rank when any rank's local step failed (so no rank is left waiting)."""
        self._check_ranks(self._gather(torch.tensor([int(err is not None)], dtype=torch.int64))[:, 0] != 0, err,
                          what)

    def _check_ranks(self, failed: torch.Tensor, err: BaseException | None, what: str) -> None:
        """Every rank calls this with the same flags failed [world] (gathered). If any is set, a second collective
        (only then) tells every rank the first failed rank's error, and every rank raises: a failed rank its own
        error, the others one naming the failed rank(s) and that error (a ValueError or TypeError when it was
        one, else a RuntimeError)."""
        if not bool(failed.any()):
            return
        text = b"" if err is None else f"{type(err).__name__}: {err}".encode()[:_MSG_BYTES]
        raw = torch.zeros(_MSG_BYTES + 1, dtype=torch.int64)  # [length, bytes...] (int64: any backend moves it)
        raw[0] = len(text)
        raw[1:1 + len(text)] = torch.tensor(list(text), dtype=torch.int64)
        got = self._gather(raw)
        if err is not None:
            raise err
        bad = failed.nonzero()[:, 0].tolist()
        msg = bytes(got[bad[0], 1:1 + int(got[bad[0], 0])].tolist()).decode(errors="replace")
        cls = {"ValueError": ValueError, "TypeError": TypeError}.get(msg.split(":", 1)[0], RuntimeError)
        raise cls(f"ShardedIndex.{what} failed on rank(s) {bad}; rank {bad[0]} raised {msg}")

    # ---- properties ----
    @property
    def dim(self) -> int:
        return self.local.dim

    def __len__(self) -> int:
        """The global number of rows (all ranks)."""
        return self._count

    @property
    def local_len(self) -> int:
        return len(self.local)

    def to(self, device) -> ShardedIndex:
        """Move this rank's slice (not a collective)."""
        self.local.to(device)
        return self

    def __repr__(self) -> str:
        return f"ShardedIndex(rank={self.rank}/{self.world_size}, len={len(self)}, local={self.local!r})"

    # ---- building ----
    def add(self, embeddings, ids=None) -> None:
        """Collective: every rank appends its own slice embeddings [N_r, D] (N_r may be 0). ids: this rank's
        labels [N_r] (distinct across all ranks and not yet present), or None on every rank for the default
        rank-major numbering."""
        err = None
        try:
            x = check_matrix(embeddings, "embeddings", self.dim)
            m = x.shape[0]
            lab = None if ids is None else check_labels(ids, m)
        except (TypeError, ValueError) as e:
            err, m, lab = e, 0, None
        info = self._gather(torch.tensor([m, int(ids is not None), int(err is None)], dtype=torch.int64))
        self._check_ranks(info[:, 2] == 0, err, "add")
        sizes = info[:, 0].tolist()
        if info[:, 1].min() != info[:, 1].max():
            raise ValueError("ShardedIndex.add: pass ids on every rank or on none (got ids on rank(s) "
                             f"{info[:, 1].nonzero()[:, 0].tolist()})")
        if lab is None:
            start = self._next_label + sum(sizes[: self.rank])
            lab = torch.arange(start, start + m, dtype=torch.int64)
            next_label = self._next_label + sum(sizes)
        else:
            everything = torch.cat(self._gather_ragged(lab, sizes))
            err = None
            if everything.numel() > 1:
                s = torch.sort(everything).values
                dup = (s[1:] == s[:-1]).nonzero()
                if dup.numel():
                    err = ValueError(f"ids contains label {s[dup[0, 0]].item()} more than once across ranks")
            if err is None and len(self.local) and everything.numel():
                present = self.local._labels.contains(everything.to(self.local._labels.device)).cpu()
                if bool(present.any()):
                    err = ValueError(f"ids contains label {everything[present.nonzero()[0, 0]].item()}, which "
                                     f"is already in the index (on rank {self.rank})")
            # Every rank saw the same gathered ids, so the duplicate check agrees; the "already present" check is
            # local, so agree on it explicitly.
            self._agree(err, "add")
            next_label = max(self._next_label, int(everything.max()) + 1 if everything.numel() else 0)
        # The local add can still fail (e.g. a float16 FlatIndex refuses values beyond its range, an HNSWIndex is
        # interrupted). Its outcome is agreed like the checks above; when any rank failed, the ranks whose add went
        # through undo it, so every rank raises and none holds different rows (an HNSW graph may keep
        # deleted points: see HNSWIndex.add).
        err = None
        snap = self.local._snapshot() if m else None
        if m:
            try:
                self.local.add(x, lab)
            except BaseException as e:  # noqa: BLE001 - re-raised by _check_ranks once every rank has heard of it
                err = e
                self.local._rollback(snap)  # in case the local index left part of it behind
        failed = self._gather(torch.tensor([int(err is not None)], dtype=torch.int64))[:, 0] != 0
        if bool(failed.any()) and err is None and m:
            self.local._rollback(snap)
        self._check_ranks(failed, err, "add")
        self._count += sum(sizes)
        self._next_label = next_label

    # ---- querying ----
    def _local_topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's best kl = min(k, local_len) per query, padded to k with (-inf, -1): [Q, k] each, on the
        CPU, and kl (the pads are columns kl.. of every row)."""
        nq = q.shape[0]
        scores = torch.full((nq, k), float("-inf"), dtype=torch.float32)
        ids = torch.full((nq, k), -1, dtype=torch.int64)
        kl = min(k, len(self.local))
        if kl and nq:
            s, i = self.local.search(q, kl)
            scores[:, :kl] = s.cpu()
            ids[:, :kl] = i.cpu()
        return scores, ids, kl

    def search(self, queries, k: int, *, same_queries: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective top-k over all ranks' rows: queries [Q_r, D] -> (scores [Q_r, k] fp32, ids [Q_r, k] int64
        global labels) on the local index's device, for this rank's own queries. Ties -> lower label; NaN scores
        rank as -inf (as in FlatIndex). When the local search fails on any rank, every rank raises.

        Default: ranks may pass different queries (as in data-parallel training); they are all-gathered and every
        rank searches all of them locally. same_queries=True promises every rank passes the same queries (no
        query gather, Q times less local work)."""
        err, nq = None, 0
        try:
            q = check_matrix(queries, "queries", self.dim).to(torch.float32)
            nq = q.shape[0]
            k = check_k(k, len(self))
        except (TypeError, ValueError) as e:
            err = e
        info = self._gather(torch.tensor([nq, int(err is None)], dtype=torch.int64))
        self._check_ranks(info[:, 1] == 0, err, "search")
        sizes = info[:, 0].tolist()
        if same_queries:
            if min(sizes) != max(sizes):
                raise ValueError(f"same_queries=True but ranks passed different numbers of queries: {sizes}")
            all_q, mine = q, slice(0, nq)
        else:
            all_q = torch.cat(self._gather_ragged(q.cpu(), sizes))
            off = sum(sizes[: self.rank])
            mine = slice(off, off + nq)
        na = all_q.shape[0]
        try:
            scores, ids, kl = self._local_topk(all_q, k)
        except BaseException as e:  # noqa: BLE001 - re-raised by _check_ranks once every rank has heard of it
            err = e
            scores, ids, kl = torch.zeros(na, k), torch.zeros(na, k, dtype=torch.int64), 0
        # The ids travel with [kl, failed] in one gather, so agreeing on failures costs no extra collective.
        all_s = self._gather(scores)  # [world, Qall, k]
        got = self._gather(torch.cat([ids.reshape(-1), torch.tensor([kl, int(err is not None)])]))
        self._check_ranks(got[:, -1] != 0, err, "search")
        all_i = got[:, :-2].reshape(self.world_size, na, k)
        pad = torch.arange(k)[None, :] >= got[:, -2:-1]  # [world, k]: rank r's columns kl_r.. are padding
        # [world, Qall, k] -> [Qall, world * k]. Order by label, then pads last, then a stable sort by score: equal
        # scores stay in label order, and padding never precedes a real row, even one scoring -inf (there are
        # sum_r min(k, local_len_r) >= k real rows, as k <= len(self)).
        all_s = all_s.permute(1, 0, 2).reshape(na, -1)[mine]
        all_s = torch.where(torch.isnan(all_s), float("-inf"), all_s)
        all_i = all_i.permute(1, 0, 2).reshape(na, -1)[mine]
        pad = pad[None].expand(all_i.shape[0], -1, -1).reshape(all_i.shape[0], -1)
        order = torch.argsort(all_i, dim=1, stable=True)
        order = torch.gather(order, 1, torch.argsort(torch.gather(pad, 1, order).to(torch.uint8), dim=1,
                                                     stable=True))
        order = torch.gather(order, 1, torch.argsort(torch.gather(all_s, 1, order), dim=1, descending=True,
                                                     stable=True))[:, :k]
        out_s, out_i = torch.gather(all_s, 1, order), torch.gather(all_i, 1, order)
        dev = self.local.device
        return out_s.to(dev), out_i.to(dev)

    def reconstruct(self, ids) -> torch.Tensor:
        """Collective: this rank's labels `ids` (any shape S, held by any rank) -> fp32 [*S, D]."""
        err = None
        try:
            ids = check_ids_arg(ids, "cpu")
            n = ids.numel()
        except (TypeError, ValueError) as e:
            err, n = e, 0
        info = self._gather(torch.tensor([n, int(err is None)], dtype=torch.int64))
        self._check_ranks(info[:, 1] == 0, err, "reconstruct")
        sizes = info[:, 0].tolist()
        flat = ids.reshape(-1)
        everything = torch.cat(self._gather_ragged(flat, sizes))
        found = self.local._labels.contains(everything.to(self.local._labels.device)).cpu()
        vecs = torch.zeros(everything.shape[0], self.dim, dtype=torch.float32)
        if bool(found.any()):
            vecs[found] = self.local.reconstruct(everything[found]).cpu()
        # Each label lives on exactly one rank: summing the rank contributions assembles every vector.
        counts = found.to(torch.int64)
        vecs, counts = vecs.to(self._comm), counts.to(self._comm)
        dist.all_reduce(vecs, group=self.group)
        dist.all_reduce(counts, group=self.group)
        off = sum(sizes[: self.rank])
        mine_v, mine_c = vecs[off: off + n].cpu(), counts[off: off + n].cpu()
        if n and not bool((mine_c == 1).all()):
            raise ValueError(f"id {flat[mine_c != 1][0].item()} is not in the index")
        return mine_v.reshape(*ids.shape, self.dim).to(self.local.device)

    # ---- persistence ----
    @staticmethod
    def shard_path(directory, rank: int, world_size: int) -> Path:
        return Path(directory) / f"shard-{rank:05d}-of-{world_size:05d}.pyragidx"

    def save(self, directory) -> None:
        """Collective: each rank writes its slice to `directory`/shard-RRRRR-of-WWWWW.pyragidx (atomically);
        returns once every shard is written."""
        self.local.extra_meta = {**self.local.extra_meta, "shard_rank": self.rank, "world_size": self.world_size,
                                 "global_count": self._count, "next_label": self._next_label}
        os.makedirs(directory, exist_ok=True)
        err = None
        try:
            self.local.save(self.shard_path(directory, self.rank, self.world_size))
        except Exception as e:  # noqa: BLE001 - re-raised below after the other ranks hear of it
            err = e
        self._agree(err, "save")

    @classmethod
    def load(cls, directory, mmap: bool = True, *, group=None, verify: bool = True) -> ShardedIndex:
        """Collective: each rank opens its own shard from `directory` (saved with the same world size)."""
        from . import load_index

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        path = cls.shard_path(directory, rank, world)
        local = None
        err = None
        try:
            local = load_index(path, mmap=mmap, verify=verify)
            meta = local.extra_meta
            if meta.get("shard_rank") != rank or meta.get("world_size") != world:
                raise ValueError(f"{path}: shard of rank {meta.get('shard_rank')} of {meta.get('world_size')}, "
                                 f"opened by rank {rank} of {world}")
        except (OSError, ValueError) as e:
            err = e
        # Agree before the constructor's collective so a rank with a bad file cannot leave the others waiting.
        flags = [torch.tensor([int(err is not None)])]
        out = [torch.empty_like(flags[0]) for _ in range(world)]
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        out = [o.to(comm) for o in out]
        dist.all_gather(out, flags[0].to(comm), group=group)
        if err is not None:
            raise err
        bad = [r for r, o in enumerate(out) if int(o.item())]
        if bad:
            raise ValueError(f"ShardedIndex.load failed on rank(s) {bad}; see the error raised there")
        self = cls(local.dim, group=group, local=local)
        if self._count != meta.get("global_count"):
            raise ValueError(f"{directory}: shards hold {self._count} rows, saved index had {meta.get('global_count')}")
        self._next_label = max(self._next_label, int(meta.get("next_label", 0)))
        return self
