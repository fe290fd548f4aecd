"""Context parallelism on ``torch.distributed`` (functional layer): one sequence split across
the ranks of a process group.

Two shard orders (``order``): ``"contiguous"``, rank ``r`` of ``P`` holds positions
``r * L / P`` to ``(r + 1) * L / P``; ``"balanced"``, the sequence is cut into ``2P`` equal
chunks and rank ``r`` holds chunks ``r`` and ``2P - 1 - r``, in that order. Under a causal
layout the contiguous order gives the last rank the most keys to attend (a causal dense
layout over two ranks: a quarter of the kept blocks on rank 0, three quarters on rank 1);
the balanced order evens the ranks' rows out (:func:`shard_work` counts them). It matters
for ``"kv_exchange"``, where each rank computes its own rows; under ``"all_to_all"`` every
rank computes the whole sequence for its heads whatever the order.

Two strategies, both exact:

* ``"all_to_all"``: an all-to-all turns sequence shards of every head into whole sequences
  of ``H / P`` heads; each rank runs attention on its heads (the layout's heads sliced to
  match) and a second all-to-all turns the output back. Any layout; ``H`` and ``H_kv``
  divisible by ``P``. Per rank it moves about ``(P - 1) / P`` of its q, k, v and output
  shards each way (and as much again in the backward).
* ``"kv_exchange"``: each rank keeps its queries and receives only the key/value blocks
  that its rows of the layout attend and that other ranks hold (for a window, the
  neighbours' edges and the global columns), then attends its shard's keys after them, so
  the causal diagonal stays where it is. A query block that attends keys on many blocks
  of few ranks (a global row) visits instead: its rows go to each rank holding keys it
  attends, which returns a partial output and log-sum-exp, and the owner merges them with
  its own by log-sum-exp (:func:`_key_plan` states the rule). Communication follows the
  layout's cross-shard blocks, not ``L``; gradients go back the way their values came and
  are summed at the owner. The unfused backend has no log-sum-exp: there every block
  fetches.

``"auto"`` picks the one whose busiest rank receives fewer bytes by the counts above
(``kv_exchange`` when ``H`` or ``H_kv`` is not divisible by ``P``). The layout is read on
the host (it is the same on every rank), once per layout tensor and again after an
in-place edit; each rank's part of it is one cached tensor, so its compiled index is
cached too. Shapes are compared across ranks before any other collective, so a mismatch
raises on every rank instead of hanging.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._errors import bad_argument, describe
from .index import _cached

STRATEGIES = ("auto", "all_to_all", "kv_exchange")
ORDERS = ("contiguous", "balanced")


def _group_size_rank(where, group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{where}: torch.distributed is not initialised. Fix: call "
            "torch.distributed.init_process_group(...) on every rank first (torchrun sets "
            "up the environment for it)."
        )
    return dist.get_world_size(group), dist.get_rank(group)


def shard_positions(n: int, P: int, rank: int, order: str = "contiguous") -> torch.Tensor:
    """The positions (of ``n``, along the sequence) that ``rank`` of ``P`` holds, in its
    shard's order (module docstring); ``n`` divisible by ``P`` (``2P`` when balanced)."""
    _check_order("shard_positions", order)
    if order == "contiguous":
        m = n // P
        return torch.arange(rank * m, (rank + 1) * m)
    m = n // (2 * P)
    first, second = rank, 2 * P - 1 - rank
    return torch.cat(
        [torch.arange(first * m, (first + 1) * m), torch.arange(second * m, (second + 1) * m)]
    )


def _check_order(where, order) -> None:
    if order not in ORDERS:
        raise bad_argument(where, "order", " or ".join(map(repr, ORDERS)), repr(order))


def _check_length(where, x, dim, P, order):
    _check_order(where, order)
    chunks = P if order == "contiguous" else 2 * P
    if x.shape[dim] % chunks:
        raise bad_argument(
            where,
            "x",
            f"a length along dim {dim} divisible by {chunks} ({order} shards over {P} ranks)",
            describe(x),
        )


def shard_sequence(
    x: torch.Tensor, group=None, dim: int = 2, order: str = "contiguous"
) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (the sequence), in the shard ``order``
    :func:`context_parallel_attention` is given (module docstring): contiguous, rank ``r``
    of ``P`` holds positions ``r * L / P`` to ``(r + 1) * L / P``; balanced, chunks ``r``
    and ``2P - 1 - r`` of ``2P``."""
    P, r = _group_size_rank("shard_sequence", group)
    _check_length("shard_sequence", x, dim, P, order)
    if order == "contiguous":
        return x.chunk(P, dim)[r].contiguous()
    return x.index_select(dim, shard_positions(x.shape[dim], P, r, order).to(x.device))


def shard_work(layout, P: int, order: str = "contiguous", causal: bool = False) -> list[int]:
    """Kept blocks in each rank's rows of ``layout`` (``[.., nb, nb]``; with ``causal``,
    blocks after the diagonal do not count): the attention work each rank does under
    ``"kv_exchange"`` with this shard ``order``."""
    _check_order("shard_work", order)
    grid = _host_grid("shard_work", layout)
    nb = grid.shape[-1]
    if causal:
        grid = grid & torch.ones(nb, nb, dtype=torch.bool).tril()
    rows = grid.reshape(-1, nb, nb).sum((0, 2))  # kept blocks per block row
    return [int(rows[shard_positions(nb, P, r, order)].sum()) for r in range(P)]


class _AllGather(torch.autograd.Function):
    """All-gather along ``dim``; the backward sums the gradient over ranks and keeps this
    rank's part."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank, P = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(P, ctx.dim)[rank], None, None


def unshard_sequence(
    x: torch.Tensor, group=None, dim: int = 2, order: str = "contiguous"
) -> torch.Tensor:
    """The whole sequence from every rank's shard in the shard ``order`` (differentiable)."""
    P, _ = _group_size_rank("unshard_sequence", group)
    _check_order("unshard_sequence", order)
    whole = _AllGather.apply(x, dim, group)  # the shards in rank order
    if order == "contiguous":
        return whole
    return whole.index_select(dim, _to_global(whole.shape[dim], P, order).to(x.device))


def _shard_order(n: int, P: int, order: str) -> torch.Tensor:
    """The position of each entry of the ranks' shards laid end to end, in rank order."""
    return torch.cat([shard_positions(n, P, r, order) for r in range(P)])


def _to_global(n: int, P: int, order: str) -> torch.Tensor:
    """Indices that put the ranks' shards laid end to end back in sequence order."""
    return torch.argsort(_shard_order(n, P, order))


class _AllToAll(torch.autograd.Function):
    """Split ``x`` in ``P`` along ``split``, send part ``p`` to rank ``p``, concatenate what
    arrives along ``cat`` (in rank order); the backward does the reverse."""

    @staticmethod
    def forward(ctx, x, split, cat, group):
        ctx.split, ctx.cat, ctx.group = split, cat, group
        return _all_to_all(x, split, cat, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.cat, ctx.split, ctx.group), None, None, None


def _all_to_all(x, split, cat, group):
    """``x`` (4-D; ``(split, cat)`` is ``(1, 2)`` or ``(2, 1)``) cut in ``P`` along
    ``split``, part ``p`` to rank ``p``, and what arrives from rank ``p`` placed at part
    ``p`` along ``cat``. Every ``x[b, j]`` of a part and every ``out[b, j]`` of what arrives
    is contiguous, so each travels as its own send and receive (one batch of point-to-point
    operations), straight from ``x`` and straight into place: only this rank's own part is
    copied."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    n = x.shape[split] // P
    shape = list(x.shape)
    shape[split], shape[cat] = n, shape[cat] * P
    out = x.new_empty(shape)
    ops = []
    for p in range(P):
        part = x.narrow(split, p * n, n)  # what rank p gets
        into = out.narrow(cat, p * x.shape[cat], x.shape[cat])  # where rank p's part goes
        if p == rank:
            into.copy_(part)
            continue
        peer = dist.get_global_rank(group, p) if group is not None else p
        for b, j in itertools.product(range(part.shape[0]), range(part.shape[1])):
            tag = b * part.shape[1] + j
            ops.append(dist.P2POp(dist.isend, part[b, j], peer, group, tag))
            ops.append(dist.P2POp(dist.irecv, into[b, j], peer, group, tag))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return out


def _ranges(sizes: list, device) -> list:
    """Consecutive index ranges of ``sizes[0]``, ``sizes[1]``, ... rows: where each
    sender's rows lie in a buffer of what arrived, in rank order."""
    ends = list(itertools.accumulate(sizes))
    return [torch.arange(e - n, e, device=device) for n, e in zip(sizes, ends)]


def _exchange_rows(x, send, sizes, group):
    """Rows ``send[p]`` of ``x [B, h, n, D]`` (dim 2) to rank ``p``; ``sizes[p]`` rows
    arrive from rank ``p``: ``[B, h, sum(sizes), D]`` in rank order. One uneven
    all-to-all over a rows-first buffer."""
    B, h, _, D = x.shape
    rows_first = x.permute(2, 0, 1, 3)
    out_rows = sum(sizes)
    send_buf = torch.cat([rows_first.index_select(0, r).reshape(-1) for r in send])
    recv_buf = x.new_empty(out_rows * B * h * D)
    dist.all_to_all_single(
        recv_buf,
        send_buf,
        output_split_sizes=[n * B * h * D for n in sizes],
        input_split_sizes=[len(r) * B * h * D for r in send],
        group=group,
    )
    return recv_buf.view(out_rows, B, h, D).permute(1, 2, 0, 3)


class _Exchange(torch.autograd.Function):
    """Send rows of this rank's shard to the ranks that need them (see
    :func:`_exchange_rows`); the backward sends the gradients of the received rows back,
    and the owner adds them into its rows (a row several ranks received sums their
    gradients)."""

    @staticmethod
    def forward(ctx, x, send, sizes, group):
        ctx.send, ctx.sizes, ctx.group, ctx.shape = send, sizes, group, x.shape
        return _exchange_rows(x, send, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        back = _ranges(ctx.sizes, grad.device)  # every received row, to its sender
        returned = _exchange_rows(grad.contiguous(), back, [len(r) for r in ctx.send], ctx.group)
        dx = grad.new_zeros(ctx.shape)
        dx.index_add_(2, torch.cat(ctx.send), returned)
        return dx, None, None, None


def _check_across_ranks(where, P, group, local: list) -> None:
    """Every rank's ``[passed its local checks, B, H, H_kv, S, D, layout heads, nb,
    layout checksum, shard order, block, causal, strategy, unfused backend, key padding
    mask given, rpe's batch and head sizes (0 without one), return_lse]``, compared
    before anything else is exchanged, so that every rank raises (the failing rank its own
    error, the others this one) instead of hanging in a collective another rank does not
    run."""
    # NCCL moves only CUDA tensors; gloo (and mixed backends) take host ones
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    mine = torch.tensor([float(x) for x in local], dtype=torch.float64, device=device)
    all_ranks = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(all_ranks, mine, group=group)
    failed = [r for r, t in enumerate(all_ranks) if t[0] == 0]
    if failed:
        if mine[0] == 0:
            return  # this rank raises its own error
        raise RuntimeError(f"{where}: rank(s) {failed} refused their inputs (see their error).")
    if any(not torch.equal(t, all_ranks[0]) for t in all_ranks):
        shapes = [t[1:6].long().tolist() for t in all_ranks]
        raise bad_argument(
            where,
            "q, k, v, layout",
            "shards of one shape, the same layout and the same block, causal, strategy, "
            "backend, masks (given or not), return_lse and the same shard order on every rank",
            f"per rank [B, H, H_kv, shard length, D]: {shapes} (the rest compared too)",
            "shard the sequence evenly (shard_sequence) and pass the same layout and "
            "arguments everywhere.",
        )


def _host_grid(where, layout) -> torch.Tensor:
    """The layout as a bool ``[B_l, H_l, nb, nb]`` tensor on the host."""
    from .patterns._checks import layout_tensor

    if isinstance(layout, torch.Tensor) and layout.dim() == 4:
        return layout_tensor(where, layout.flatten(0, 1)).view(layout.shape).cpu() != 0
    return layout_tensor(where, layout).unsqueeze(0).cpu() != 0


def _checksum(layout, grid) -> float:
    """A number that differs between layouts with high probability: the kept count of
    each row, weighted by its position (cached per layout tensor)."""

    def compute():
        rows = grid.sum(-1).flatten().double()
        weights = torch.arange(1, rows.numel() + 1, dtype=torch.float64).remainder(9973)
        return float((rows * weights).sum())

    return _cached(layout, ("cp-checksum",), compute)


def _bytes_all_to_all(B, H, Hkv, S, D, P) -> float:
    return 2 * (P - 1) / P * B * S * D * (2 * H + 2 * Hkv)  # q and out, k and v


@dataclass(frozen=True)
class _KeyPlan:
    """What ``"kv_exchange"`` moves, the same on every rank (read off the layout). Per rank
    ``r``: ``wide[r]``, its query blocks that visit the ranks holding their keys (global
    block numbers, in ``r``'s shard order); ``needed[r]``, the key blocks on other ranks
    that its other query blocks attend, ascending; ``visits[r][p]``, the wide blocks of
    ``r`` that attend keys rank ``p`` holds (none for ``p == r``), in ``r``'s shard order."""

    wide: list
    needed: list
    visits: list
    key: tuple  # what it was read for: (H, H_kv, can_visit), for the caches built on it

    @property
    def visiting(self) -> bool:
        return any(len(w) for w in self.wide)


def _places(own: list, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the ``nb`` blocks, the rank that holds it and its place in that rank's
    shard (``own``: each rank's blocks in its shard's order)."""
    owner = torch.empty(nb, dtype=torch.long)
    local_block = torch.empty(nb, dtype=torch.long)
    for p, blocks in enumerate(own):
        owner[blocks] = p
        local_block[blocks] = torch.arange(len(blocks))
    return owner, local_block


def _key_plan(grid, own, causal: bool, H: int, Hkv: int, can_visit: bool) -> _KeyPlan:
    """Which query blocks fetch the keys they attend and which visit the keys' ranks. A
    query block visits (its rows go to each rank holding keys it attends, that rank returns
    a partial output and log-sum-exp, merged by log-sum-exp) when that moves fewer bytes
    than its share of fetching: ``H x (ranks visited) < H_kv x (its share of the key
    blocks on other ranks)``, where a fetched block is shared by this rank's query blocks
    that attend it (a query row and its output against a key and a value row; the backward
    mirrors both). So a global row over ``P`` ranks visits ``P - 1`` ranks instead of
    fetching every other shard, a window row fetches its neighbour's edge, and the rows of
    a dense or causal layout fetch (each fetched block serves them all). ``can_visit=False``
    (a backend without the log-sum-exp) fetches for every block."""
    P, nb = len(own), grid.shape[-1]
    owner, _ = _places(own, nb)
    wide, needed, visits = [], [], []
    for r in range(P):
        n = len(own[r])
        # the kept (query, key) block pairs of my rows, in any head or sample
        row, col = grid[..., own[r], :].reshape(-1, n, nb).any(0).nonzero(as_tuple=True)
        if causal:
            keep = col <= own[r][row]
            row, col = row[keep], col[keep]
        on = torch.bincount(row * P + owner[col], minlength=n * P).view(n, P).T  # [P, n]
        on[r] = 0  # my own keys need no exchange
        remote = owner[col] != r
        sharing = torch.bincount(col[remote], minlength=nb)  # my query blocks on each key
        share = torch.zeros(n, dtype=torch.float64)
        share.index_add_(0, row[remote], 1.0 / sharing[col[remote]].double())
        visit = can_visit & (H * (on > 0).sum(0) < Hkv * share)
        fetched = ~visit[row] & remote
        wide.append(own[r][visit])
        needed.append(col[fetched].unique())
        visits.append([own[r][visit & (on[p] > 0)] for p in range(P)])
    return _KeyPlan(wide, needed, visits, (H, Hkv, can_visit))


def _bytes_kv_exchange(plan: _KeyPlan, block, B, H, Hkv, D, P) -> float:
    """Bytes (per element) the busiest rank receives under ``"kv_exchange"``, forward and
    backward: keys and values it fetches (their gradients go back), the queries that visit
    it, and the partial outputs and log-sum-exps its own visits return."""
    most = 0.0
    for r in range(P):
        fetched = len(plan.needed[r]) * 2 * Hkv * D
        visitors = sum(len(plan.visits[p][r]) for p in range(P)) * H * D
        returned = sum(len(v) for v in plan.visits[r]) * H * (D + 1)
        most = max(most, 2 * block * B * (fetched + visitors + returned))
    return most


@dataclass(frozen=True)
class _Shards:
    """Who holds what: ``P`` ranks, this ``rank``, the shard ``order`` and each rank's
    global blocks ``own`` in its shard's order."""

    P: int
    rank: int
    group: object
    order: str
    own: list


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block: int,
    group=None,
    strategy: str = "auto",
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_padding_mask_mode: str = "add",
    rpe: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    order: str = "contiguous",
):
    """Block-sparse attention over a sequence split across the ranks of ``group``.

    Args:
        q: this rank's shard ``[B, H, S, D]`` (``S = L / P``, the positions of ``order``;
            :func:`shard_sequence` cuts it); ``k``, ``v``: ``[B, H_kv, S, D]``.
        layout: the whole layout ``[H_l, L / block, L / block]`` (2-D, 3-D, or a layout per
            sample ``[B, H_l, ., .]``), the same on every rank; ``S`` a multiple of
            ``block``.
        block, causal, scale, backend: as in
            :func:`~blocksparse_attn.block_sparse_attention`.
        group: the process group (default: the world).
        strategy: ``"all_to_all"``, ``"kv_exchange"`` or ``"auto"`` (module docstring).
        key_padding_mask: this rank's shard ``[B, S]`` of the mask, in
            ``key_padding_mask_mode``.
        rpe: this rank's query rows ``[B or 1, H or 1, S, L]`` of the bias (columns in
            sequence order).
        return_lse: also return this rank's log-sum-exp ``[B, H, S]``.
        order: the shard order, ``"contiguous"`` or ``"balanced"`` (module docstring;
            each balanced chunk ``S / 2`` tokens of whole blocks), the same on every rank.

    Returns this rank's shard of the output ``[B, H, S, D]`` (and ``lse``). Gradients flow
    back through the collectives to every rank's shards.
    """
    from .functional import block_sparse_attention

    where = "context_parallel_attention"
    P, rank = _group_size_rank(where, group)
    # local checks first, then one collective that tells every rank whether all passed
    error, summary = None, [0.0] * 17  # as long as a full summary, for the all-gather
    try:
        if strategy not in STRATEGIES:
            raise bad_argument(
                where, "strategy", " or ".join(map(repr, STRATEGIES)), repr(strategy)
            )
        _check_order(where, order)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise bad_argument(where, name, "a 4-D shard [B, heads, S, D]", describe(t))
        grid = _cached(layout, ("cp-grid",), lambda: _host_grid(where, layout))
        B, H, S, D = q.shape
        summary = [B, H, k.shape[1], S, D, *grid.shape[1:3], _checksum(layout, grid)]
        summary += [ORDERS.index(order), block, causal, STRATEGIES.index(strategy)]
        # what decides which collectives run: the same everywhere, or a rank would wait
        bias = tuple(rpe.shape[:2]) if isinstance(rpe, torch.Tensor) else (0, 0)
        summary += [backend == "unfused", key_padding_mask is not None, *bias]
        summary.append(return_lse)
    except (ValueError, TypeError) as e:
        error = e
    _check_across_ranks(where, P, group, [error is None, *summary])
    if error is not None:
        raise error
    Hkv = k.shape[1]
    nb = grid.shape[-1]
    chunk = S if order == "contiguous" else S // 2
    if S % block or chunk % block or nb * block != P * S:
        raise bad_argument(
            where,
            "layout",
            f"{P} shards x {S} tokens = {P * S} tokens in blocks of {block} ({order} shards "
            "of whole blocks)",
            f"a layout of {nb} blocks ({nb * block} tokens) over shards of {S}",
        )
    divisible = H % P == 0 and Hkv % P == 0
    if strategy == "all_to_all" and not divisible:
        raise bad_argument(
            where,
            "strategy",
            f"'kv_exchange' or 'auto' when H ({H}) or H_kv ({Hkv}) is not divisible by the "
            f"{P} ranks",
            "'all_to_all'",
        )
    own = [shard_positions(nb, P, r, order) for r in range(P)]  # each rank's blocks
    can_visit = backend != "unfused"  # visits merge partial results by their log-sum-exp
    plan = _cached(
        layout,
        ("cp-plan", P, order, causal, H, Hkv, can_visit),
        lambda: _key_plan(grid, own, causal, H, Hkv, can_visit),
    )
    if strategy == "auto":
        exchanged = _bytes_kv_exchange(plan, block, B, H, Hkv, D, P)
        by_heads = _bytes_all_to_all(B, H, Hkv, S, D, P) if divisible else float("inf")
        strategy = "kv_exchange" if exchanged <= by_heads else "all_to_all"
    kw = dict(block=block, scale=scale, causal=causal, backend=backend, return_lse=return_lse)
    shards = _Shards(P, rank, group, order, own)
    masks = (key_padding_mask, key_padding_mask_mode, rpe)
    if strategy == "all_to_all":
        return _by_heads(q, k, v, layout, grid, shards, masks, kw, block_sparse_attention)
    return _by_key_blocks(q, k, v, layout, grid, plan, shards, masks, kw, block_sparse_attention)


def _by_heads(q, k, v, layout, grid, shards, masks, kw, attend):
    H, L = q.shape[1], q.shape[2] * shards.P
    P, rank, group = shards.P, shards.rank, shards.group
    kpm, kpm_mode, rpe = masks
    qh, kh, vh = (_AllToAll.apply(t, 1, 2, group) for t in (q, k, v))  # [B, h/P, L, D]
    # the ranks' shards end to end; in sequence order for the causal diagonal and the layout
    order = None
    if shards.order != "contiguous":
        order = _to_global(L, P, shards.order).to(q.device)
        qh, kh, vh = (t.index_select(2, order) for t in (qh, kh, vh))

    def local():  # the layout heads of my query heads (1, H_kv or H of them)
        mine = grid
        if grid.shape[1] > 1:
            per = grid.shape[1] // P
            mine = grid[:, rank * per : (rank + 1) * per]
        return _as_layout(mine, q.device)

    # one tensor per (layout, rank): the attention call caches its compiled index on it
    lay = _cached(layout, ("cp-heads", P, rank, str(q.device)), local)
    if kpm is not None:
        kpm = unshard_sequence(kpm, group, dim=1, order=shards.order)
    if rpe is not None:
        rpe = rpe.expand(-1, H, -1, -1) if rpe.shape[1] == 1 else rpe
        rpe = _AllToAll.apply(rpe, 1, 2, group)  # my heads, every query row
        if order is not None:
            rpe = rpe.index_select(2, order)
    result = attend(
        qh, kh, vh, lay, key_padding_mask=kpm, key_padding_mask_mode=kpm_mode, rpe=rpe, **kw
    )
    out, lse = result if kw["return_lse"] else (result, None)
    if order is not None:  # back to the shards' order
        back = _shard_order(L, P, shards.order).to(q.device)
        out = out.index_select(2, back)
        lse = lse.index_select(2, back) if lse is not None else None
    out = _AllToAll.apply(out, 2, 1, group)  # back to [B, H, S, D]
    if lse is None:
        return out
    return out, _AllToAll.apply(lse.unsqueeze(-1), 2, 1, group).squeeze(-1)


def _by_key_blocks(q, k, v, layout, grid, plan, shards, masks, kw, attend):
    block = kw["block"]
    P, rank, group, own = shards.P, shards.rank, shards.group, shards.own
    kpm_shard, kpm_mode, rpe = masks
    dev = q.device
    nb = grid.shape[-1]
    owner, local_block = _places(own, nb)
    visiting = plan.visiting  # the same on every rank: all take part in the visits
    wide = torch.zeros(nb, dtype=torch.bool)
    wide[plan.wide[rank]] = True

    # what I send to each rank: the token rows (in my shard) of the blocks it needs; what
    # I receive from each
    send = [_block_tokens(local_block[n[owner[n] == rank]], block, dev) for n in plan.needed]
    mine = plan.needed[rank]
    received = torch.cat([mine[owner[mine] == p] for p in range(P)])  # by sender, ascending
    sizes = [int((owner[mine] == p).sum()) * block for p in range(P)]
    k_in, v_in = (_Exchange.apply(t, send, sizes, group) for t in (k, v))
    # keys here: the received blocks, then my shard's; each key block's place among them
    kk = torch.cat([k_in, k], 2)
    vv = torch.cat([v_in, v], 2)
    here = torch.cat([received, own[rank]])
    ascending, place = here.sort()  # the key blocks here in sequence order, and their places
    kpm = None
    if kpm_shard is not None:
        kpm = unshard_sequence(kpm_shard, group, dim=1, order=shards.order)  # sequence order
    local_kw = dict(kw, return_lse=True) if visiting else kw
    # causal: each contiguous run of my blocks attends the keys before it and its own
    # (bottom-right aligned); otherwise all my rows attend every key here at once
    runs = _runs(own[rank]) if kw["causal"] else [own[rank]]
    outs, lses, first = [], [], 0
    for run in runs:
        rows = slice(first, first + len(run) * block)
        first += len(run) * block
        keys = here if not kw["causal"] else torch.cat([ascending[ascending < run[0]], run])
        at = place[torch.searchsorted(ascending, keys)]  # places in here
        keys_here, values_here = _take_blocks(kk, vv, at, block)
        position = None  # the keys' sequence positions, for the masks that need them
        if kpm is not None or rpe is not None:
            position = _block_tokens(keys, block, dev)

        def local(run=run, keys=keys):  # the run's rows, the columns of its keys
            mine = grid[..., run, :].clone()
            if visiting:  # visiting rows attend only my keys here; other ranks do the rest
                mine[..., wide[run], :] &= owner == rank
            return _as_layout(mine[..., keys], dev)

        key = ("cp-blocks", P, rank, shards.order, kw["causal"], int(run[0]), str(dev))
        lay = _cached(layout, (*key, *plan.key), local)
        result = attend(
            q[:, :, rows],
            keys_here,
            values_here,
            lay,
            key_padding_mask=None if kpm is None else kpm[:, position],
            key_padding_mask_mode=kpm_mode,
            rpe=None if rpe is None else rpe[..., rows, :].index_select(-1, position),
            **local_kw,
        )
        out, lse = result if local_kw["return_lse"] else (result, None)
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    lse = None if lses[0] is None else lses[0] if len(lses) == 1 else torch.cat(lses, 2)
    if visiting:
        part_rows, part_out, part_lse = _visit(
            q, k, v, layout, grid, plan, shards, masks, kw, attend, local_block
        )
        wide_rows = _block_tokens(local_block[plan.wide[rank]], block, dev)
        out, lse = _merge(out, lse, wide_rows, part_rows, part_out, part_lse)
    return (out, lse) if kw["return_lse"] else out


def _visit(q, k, v, layout, grid, plan, shards, masks, kw, attend, local_block):
    """The visits: each rank sends the rows of its wide query blocks to the ranks holding
    keys they attend, attends the rows that visit it against its own keys, and sends the
    partial outputs and log-sum-exps back. Returns the rows (in this rank's shard) of its
    visits, in the order of ``plan.visits[rank]``, and their partials ``[B, H, n, D]``
    and ``[B, H, n]``. Every
    rank takes part in every exchange (forward and backward), with or without rows."""
    block = kw["block"]
    P, rank, group, own = shards.P, shards.rank, shards.group, shards.own
    kpm_shard, kpm_mode, rpe = masks
    dev = q.device
    send = [_block_tokens(local_block[b], block, dev) for b in plan.visits[rank]]
    counts = [len(rows) for rows in send]
    arriving = [plan.visits[p][rank] for p in range(P)]  # the blocks of my visitors' rows
    sizes = [len(a) * block for a in arriving]
    q_in = _Exchange.apply(q, send, sizes, group)
    rpe_in = None
    if rpe is not None:  # each visit's rows of the bias, the columns of the keys it visits
        parts = [
            rpe.index_select(-2, rows).index_select(-1, _block_tokens(own[p], block, dev))
            for p, rows in enumerate(send)
        ]
        rpe_in = _Exchange.apply(torch.cat(parts, -2), _ranges(counts, dev), sizes, group)
    rows_in = torch.cat(arriving)
    if len(rows_in):

        def visited():  # my visitors' rows, the columns of my keys
            part = grid[..., rows_in, :][..., own[rank]]
            if kw["causal"]:  # another rank's row: my keys wholly before it or after it
                part = part & (own[rank][None, :] < rows_in[:, None])
            return _as_layout(part, dev)

        key = ("cp-visited", P, rank, shards.order, kw["causal"], str(dev), *plan.key)
        out_in, lse_in = attend(
            q_in.contiguous(),
            k,
            v,
            _cached(layout, key, visited),
            key_padding_mask=kpm_shard,
            key_padding_mask_mode=kpm_mode,
            rpe=None if rpe_in is None else rpe_in.contiguous(),
            **dict(kw, causal=False, return_lse=True),
        )
    else:  # no visitors: empty results that still carry the graph back to the exchanges
        out_in = q_in if rpe_in is None else q_in + rpe_in.sum() * 0
        lse_in = out_in[..., 0]
    # the log-sum-exp's dtype on every rank, visited or not (as the attention returns it)
    lse_in = lse_in.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    back = _ranges(sizes, dev)
    part_out = _Exchange.apply(out_in, back, counts, group)
    part_lse = _Exchange.apply(lse_in.unsqueeze(-1), back, counts, group).squeeze(-1)
    return torch.cat(send), part_out, part_lse


def _merge(out, lse, wide_rows, part_rows, part_out, part_lse):
    """``out`` ``[B, H, S, D]`` and ``lse`` ``[B, H, S]`` with the partial results
    ``part_out``, ``part_lse`` of rows ``part_rows`` merged into rows ``wide_rows`` (every
    ``part_rows`` entry one of them) by log-sum-exp, in fp32 (fp64 for fp64 inputs). A
    row no key reached keeps output 0 and log-sum-exp -inf."""
    S = out.shape[2]
    slot = torch.full((S,), -1, dtype=torch.long, device=out.device)
    slot[wide_rows] = torch.arange(len(wide_rows), device=out.device)
    at = slot[part_rows]  # each partial's row among the wide rows
    fp = torch.float64 if out.dtype == torch.float64 else torch.float32
    own_out = out.index_select(2, wide_rows).to(fp)
    own_lse = lse.index_select(2, wide_rows)
    shift = own_lse.detach().scatter_reduce(2, at.expand_as(part_lse), part_lse.detach(), "amax")
    shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift))
    total = torch.exp(own_lse - shift).index_add(
        2, at, torch.exp(part_lse - shift.index_select(2, at))
    )
    reached = total > 0
    merged_lse = torch.where(
        reached, shift + torch.log(torch.where(reached, total, 1.0)), -torch.inf
    )
    safe = torch.where(reached, merged_lse, 0.0)
    merged = (torch.exp(own_lse - safe)[..., None] * own_out).index_add(
        2, at, torch.exp(part_lse - safe.index_select(2, at))[..., None] * part_out.to(fp)
    )
    return (
        out.index_copy(2, wide_rows, merged.to(out.dtype)),
        lse.index_copy(2, wide_rows, merged_lse),
    )


def _take_blocks(k, v, at, block):
    """Key blocks ``at`` (a host tensor of block places) of ``k`` and ``v`` (dim 2): a view
    when they are one ascending run (all keys of a non-causal rank, or a causal rank whose
    received blocks all precede its own), else a gathered copy."""
    if len(at) and bool((at[1:] - at[:-1] == 1).all()):
        first, n = int(at[0]) * block, len(at) * block
        return k.narrow(2, first, n), v.narrow(2, first, n)
    token = _block_tokens(at, block, k.device)
    return k.index_select(2, token), v.index_select(2, token)


def _block_tokens(blocks: torch.Tensor, block: int, device) -> torch.Tensor:
    """The token indices of ``blocks`` (a host tensor of block numbers), in order, on
    ``device``."""
    return (blocks[:, None] * block + torch.arange(block)).flatten().to(device)


def _as_layout(grid: torch.Tensor, device) -> torch.Tensor:
    """A rank's part of the bool ``[B_l, H_l, ., .]`` grid as the layout it attends with
    (3-D when shared by the batch), one contiguous tensor on ``device``."""
    return (grid if grid.shape[0] > 1 else grid[0]).contiguous().to(device)


def _runs(blocks: torch.Tensor) -> list[torch.Tensor]:
    """``blocks`` (ascending within each run) cut where they stop being consecutive."""
    cuts = ((blocks[1:] - blocks[:-1]) != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(blocks, cuts.tolist()))
