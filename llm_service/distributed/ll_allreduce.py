"""An all-reduce with no barrier: each value travels with its call's flag (Triton).

torch's one-shot kernel (symm_allreduce.py) meets the peers at two barriers of remote atomics per
call, ~6.6 us at 8 KB on 2 H200s. Here each rank stores its words straight into every peer's
receive buffer as 8-byte packets (flag << 32 | 32 data bits, one store, so a reader sees both or
neither), then spins on its own buffer until every packet carries this call's flag, and sums the
ranks' words in rank order into x: one one-way NVLink trip, no barrier.

Why no barrier is needed to reuse a buffer: the receive buffer has two halves, used by alternate
calls. A rank writes half h again two calls later, which it only starts after its previous call
got the peer's packets of that call, which the peer only sent after finishing the call that read
half h. Flags come from a call counter on the device, the same on every rank (same calls, same
order); the program that finishes a call last advances it. Flags never repeat for 2^32 - 1 calls,
and a slot is trusted only when its flag is this call's.

The same exchange also runs fused with what follows every row-parallel layer of a decoder:
`reduce_rms_norm_` sums a decode batch's rows over the ranks, adds them to the residual and
normalises, one program a row, in one launch instead of an all-reduce and a norm kernel. Its
packets need not even wait for it: the GEMV of the row-parallel layer before it sends them as
each of its programs finishes (`send_partials`, triton_gemv.gemv's `send`; `send_args` records
the tensor so sent as `LLAllReduce.pending`), so they cross NVLink while that GEMV still runs,
and the norm only receives. The buffer argument holds for those sends too: the GEMV sends after its PDL wait, when
the call before has finished on this rank. And it gathers instead of summing in
`all_gather_last_dim` (a decode step's vocab-parallel logits), one launch where NCCL's all-gather
and a concatenation took two. Other modules make calls of their own over the same buffers and
counter (`exchange_args`): greedy.py trades each row's best (value, index), and the decode graphs'
input kernel hands a step's ints from rank 0 to the others (engine/cuda_graph.py).

PDL: the kernels launch with programmatic dependent launch (layers/pdl.py), like the kernels
around them. Each program first lets the next kernel launch (a GEMV then streams its first weight
slice while this one waits on NVLink) and reads nothing but the norm's weight and the buffers'
addresses before its `gdc_wait`: the call counter, x and the residual come after, once the
previous kernel has finished. The next kernel launches only when every program of this one has started, so its
programs never take the SM slots a spinning program's partner needs; and no program spins before
its predecessor is done.

Sums: bf16 pairs with `fma.rn.bf16x2` (x * 1 + y: one rounding, as NCCL and torch's __hadd2),
fp32 with an fp32 add; rank 0 + 1 + ... on every rank, so every rank gets the same bits.

Status: the default (PRISM_ALLREDUCE=auto) since bench/allreduce.py's 141 checks passed on 2 H200s
(bit-equal to NCCL and on every rank, eagerly, in graphs, in chains of 64 replayed 20 times; the
fused norm within a bf16 rounding of NCCL + the norm kernel): 3.3 us at 8 KB against the one-shot
op's 6.3 and NCCL's 18.6; all-reduce + norm 4.6 us against 7.7.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_service.layers import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None
BLOCK = 1024  # 4-byte words per program
MAX_PROGRAMS = 128  # every program of both ranks resident at once: no spin waits on an unscheduled one
MAX_NORM_ROWS = 8  # the fused all-reduce + RMSNorm: decode batches of the GEMV's size, a program a row
NORM_ROW_BYTES = 16384  # hidden sizes up to 8192 in bf16 (4096 in fp32)
ALONE = dict(WORLD=1, WORLD_P2=1, MAX_WORDS=1)  # the constexprs of a kernel that makes no ll call


if AVAILABLE:

    @triton.jit
    def _add_words(acc, v, ones, IS_BF16: tl.constexpr, ASM: tl.constexpr):
        """acc + v on 4-byte words: two bf16 lanes, or one fp32."""
        if IS_BF16:
            if ASM:
                return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [acc, ones, v],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            # the Triton interpreter (CPU tests) has no inline asm: fp32 add, one rounding to bf16
            lo = ((acc << 16).to(tl.float32, bitcast=True) + (v << 16).to(tl.float32, bitcast=True))
            hi = ((acc & -65536).to(tl.float32, bitcast=True) + (v & -65536).to(tl.float32, bitcast=True))
            lo16 = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            hi16 = hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16
            return hi16 | lo16
        return (acc.to(tl.float32, bitcast=True) + v.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)

    @triton.jit
    def _table(ptrs_ptr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr):
        """Every rank's receive buffer (int64 addresses): set up once, so loaded before the PDL wait."""
        idx = tl.arange(0, WORLD_P2)
        return tl.load(ptrs_ptr + idx, mask=idx < WORLD, other=0)

    @triton.jit
    def _buffer(table, p, WORLD_P2: tl.constexpr):
        """Rank p's receive buffer, as packets."""
        return tl.sum(tl.where(tl.arange(0, WORLD_P2) == p, table, 0)).to(tl.pointer_type(tl.int64))

    @triton.jit
    def _send(words, offs, mask, table, half, flag, rank,
              WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr):
        """Store this rank's `words` (at word offsets `offs`) as packets into every peer's slot for it."""
        packet = (flag << 32) | (words.to(tl.int64) & 0xFFFFFFFF)
        for p in tl.static_range(WORLD):
            if p != rank:
                tl.store(_buffer(table, p, WORLD_P2) + (half * WORLD + rank) * MAX_WORDS + offs, packet, mask=mask)

    @triton.jit
    def _receive(offs, mask, table, half, flag, rank, p,
                 WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr):
        """Rank p's words at `offs`, once every packet in this rank's slot for p carries `flag`."""
        src = _buffer(table, rank, WORLD_P2) + (half * WORLD + p) * MAX_WORDS + offs
        got = tl.load(src, mask=mask, other=0, volatile=True)
        waiting = tl.sum(tl.where(mask & (((got >> 32) & 0xFFFFFFFF) != flag), 1, 0))
        while waiting > 0:
            got = tl.load(src, mask=mask, other=0, volatile=True)
            waiting = tl.sum(tl.where(mask & (((got >> 32) & 0xFFFFFFFF) != flag), 1, 0))
        return got.to(tl.int32)  # the low 32 bits

    @triton.jit
    def _exchange(words, offs, mask, table, half, flag, rank, SEND: tl.constexpr,
                  WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr, BLOCK: tl.constexpr,
                  IS_BF16: tl.constexpr, ASM: tl.constexpr):
        """Send this rank's `words` (at word offsets `offs`) to every peer (unless the GEMV that
        made them has: SEND False), wait for theirs, and return the sum over the ranks in rank order."""
        if SEND:
            _send(words, offs, mask, table, half, flag, rank, WORLD, WORLD_P2, MAX_WORDS)
        ones = tl.full([BLOCK], 0x3F803F80, tl.int32)  # bf16x2 (1.0, 1.0)
        acc = words
        for p in tl.static_range(WORLD):  # receive and sum in rank order
            v = words
            if p != rank:
                v = _receive(offs, mask, table, half, flag, rank, p, WORLD, WORLD_P2, MAX_WORDS)
            if p == 0:
                acc = v
            else:
                acc = _add_words(acc, v, ones, IS_BF16, ASM)
        return acc

    @triton.jit
    def _call_flag(epoch_ptr):
        """This call's number (the same on every rank), receive-buffer half and packet flag."""
        call = tl.load(epoch_ptr) + 1  # int64
        return call, call % 2, call % 0xFFFFFFFF + 1  # flag 1 .. 2^32 - 1: never a zeroed slot's 0

    @triton.jit
    def _end_call(epoch_ptr, done_ptr, call):
        """The last program of this call advances the counter for the next one (a call of one
        program, the fused norm's at one row, just does: no atomic at the end of its path)."""
        if tl.num_programs(0) == 1:
            tl.store(epoch_ptr, call)
        else:
            arrived = tl.atomic_add(done_ptr, 1, sem="acq_rel")
            if arrived == tl.num_programs(0) - 1:
                tl.store(epoch_ptr, call)
                tl.store(done_ptr, 0)

    @triton.jit
    def send_partials(y, rows, cols, col_block, M, N, ptrs_ptr, epoch_ptr, rank,
                      WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_BF16: tl.constexpr):
        """A row-parallel GEMV's epilogue (or the vocab shard's embedding's): its tile y
        [BLOCK_M, BLOCK_N] of the partial sums [M, N] (rows `rows`, columns `cols` = the
        col_block-th BLOCK_N, already in the model dtype) sent as the packets of the next call,
        which `_ll_all_reduce_rms_norm` with SEND False then only receives. Called after the
        kernel's PDL wait: the previous call has finished, so its counter is final and this
        call's half is free (module docstring)."""
        call, half, flag = _call_flag(epoch_ptr)
        table = _table(ptrs_ptr, WORLD, WORLD_P2)
        if IS_BF16:  # column pairs (2j, 2j + 1) into word j
            bits = y.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            lo, hi = tl.split(tl.reshape(bits, [BLOCK_M, BLOCK_N // 2, 2]))
            words = lo | (hi << 16)
            wcol = col_block * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            offs = rows[:, None] * (N // 2) + wcol[None, :]
            mask = (rows[:, None] < M) & (2 * wcol < N)[None, :]
        else:
            words = y.to(tl.int32, bitcast=True)
            offs = rows[:, None] * N + cols[None, :]
            mask = (rows[:, None] < M) & (cols < N)[None, :]
        _send(words, offs, mask, table, half, flag, rank, WORLD, WORLD_P2, MAX_WORDS)

    @triton.jit
    def _flat_call(x_ptr, n_words, ptrs_ptr, epoch_ptr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):
        """The start of a call over x's words, BLOCK a program (the plain all-reduce and the
        gather): the buffers' addresses, the PDL hand-over and wait (module docstring, "PDL"), the
        call's number, half and flag, and this program's words. Returns (table, call, half, flag,
        offs, mask, words)."""
        table = _table(ptrs_ptr, WORLD, WORLD_P2)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        call, half, flag = _call_flag(epoch_ptr)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_words
        return table, call, half, flag, offs, mask, tl.load(x_ptr + offs, mask=mask, other=0)

    @triton.jit
    def _ll_all_reduce(x_ptr, n_words, ptrs_ptr, epoch_ptr, done_ptr, rank,
                       WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr, BLOCK: tl.constexpr,
                       IS_BF16: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        table, call, half, flag, offs, mask, words = _flat_call(x_ptr, n_words, ptrs_ptr, epoch_ptr, WORLD,
                                                                WORLD_P2, BLOCK, PDL)
        acc = _exchange(words, offs, mask, table, half, flag, rank, True, WORLD, WORLD_P2, MAX_WORDS, BLOCK,
                        IS_BF16, ASM)
        tl.store(x_ptr + offs, acc, mask=mask)
        _end_call(epoch_ptr, done_ptr, call)

    @triton.jit
    def _ll_all_gather(x_ptr, out_ptr, n_words, row_words, ptrs_ptr, epoch_ptr, done_ptr, rank,
                       WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
        """out [rows, WORLD * row_words] = every rank's x [rows, row_words] side by side, in rank order."""
        table, call, half, flag, offs, mask, words = _flat_call(x_ptr, n_words, ptrs_ptr, epoch_ptr, WORLD,
                                                                WORLD_P2, BLOCK, PDL)
        _send(words, offs, mask, table, half, flag, rank, WORLD, WORLD_P2, MAX_WORDS)
        dst = out_ptr + (offs // row_words) * (WORLD * row_words) + offs % row_words
        for p in tl.static_range(WORLD):
            v = words
            if p != rank:
                v = _receive(offs, mask, table, half, flag, rank, p, WORLD, WORLD_P2, MAX_WORDS)
            tl.store(dst + p * row_words, v, mask=mask)
        _end_call(epoch_ptr, done_ptr, call)

    @triton.jit
    def _lanes(words, IS_BF16: tl.constexpr):
        """4-byte words as fp32 values: the (low, high) bf16 of each word, or the fp32 word twice."""
        if IS_BF16:
            return (words << 16).to(tl.float32, bitcast=True), (words & -65536).to(tl.float32, bitcast=True)
        f = words.to(tl.float32, bitcast=True)
        return f, f

    @triton.jit
    def _pack(lo, hi, IS_BF16: tl.constexpr):
        """The inverse of `_lanes` for values already rounded to the model dtype."""
        if IS_BF16:
            lo16 = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            return (hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16) | lo16
        return lo.to(tl.int32, bitcast=True)

    @triton.jit
    def _round(x, IS_BF16: tl.constexpr):
        if IS_BF16:
            return x.to(tl.bfloat16).to(tl.float32)
        return x

    @triton.jit
    def _ll_all_reduce_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, row_words, hidden, eps,
                                ptrs_ptr, epoch_ptr, done_ptr, rank, SEND: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr,
                                BLOCK: tl.constexpr, IS_BF16: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        """One row a program: x summed over the ranks, then residual += x and out = RMSNorm(residual),
        rounding where triton_fused._rms_norm_kernel does; without HAS_RESIDUAL the sum itself is
        normalised and stored into x (res_ptr is x_ptr). All four tensors are contiguous rows of
        `row_words` 4-byte words; fp32 rows use only the low lane. SEND False: the kernel that made
        x has sent its packets (`send_partials`)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        cols = tl.arange(0, BLOCK)
        mask = cols < row_words
        w_lo, w_hi = _lanes(tl.load(w_ptr + cols, mask=mask, other=0), IS_BF16)  # before the wait: a weight,
        table = _table(ptrs_ptr, WORLD, WORLD_P2)  # and the buffers' addresses
        if PDL:
            tl.extra.cuda.gdc_wait()
        call, half, flag = _call_flag(epoch_ptr)
        offs = tl.program_id(0) * row_words + cols
        words = tl.load(x_ptr + offs, mask=mask, other=0)
        if HAS_RESIDUAL:
            r_lo, r_hi = _lanes(tl.load(res_ptr + offs, mask=mask, other=0), IS_BF16)  # in flight while waiting
        acc = _exchange(words, offs, mask, table, half, flag, rank, SEND, WORLD, WORLD_P2, MAX_WORDS, BLOCK,
                        IS_BF16, ASM)
        s_lo, s_hi = _lanes(acc, IS_BF16)
        if HAS_RESIDUAL:
            s_lo, s_hi = _round(s_lo + r_lo, IS_BF16), _round(s_hi + r_hi, IS_BF16)
        tl.store(res_ptr + offs, _pack(s_lo, s_hi, IS_BF16), mask=mask)
        squares = s_lo * s_lo
        if IS_BF16:
            squares += s_hi * s_hi
        inv = 1.0 / tl.sqrt(tl.sum(tl.where(mask, squares, 0.0), axis=0) / hidden + eps)
        o_lo = w_lo * _round(s_lo * inv, IS_BF16)
        o_hi = w_hi * _round(s_hi * inv, IS_BF16)
        tl.store(out_ptr + offs, _pack(o_lo, o_hi, IS_BF16), mask=mask)
        _end_call(epoch_ptr, done_ptr, call)


@dataclass
class LLAllReduce:
    """The receive buffers (symmetric, int64 [2, world, max_words]) and the call counter."""

    recv: torch.Tensor
    handle: object  # keeps the peers' mappings alive
    ptrs: torch.Tensor  # int64 [world]: every rank's receive buffer, as mapped in this process
    epoch: torch.Tensor  # int64 [1]: calls done
    done: torch.Tensor  # int32 [1]: programs of the running call that finished
    rank: int
    world: int
    max_bytes: int
    # the partial sums whose packets a kernel has sent (`send_args`), until reduce_rms_norm_ takes them
    pending: torch.Tensor | None = None

    def _consts(self) -> dict:
        return dict(WORLD=self.world, WORLD_P2=triton.next_power_of_2(self.world), MAX_WORDS=self.max_bytes // 4)

    def _no_pending(self) -> None:
        if self.pending is not None:  # its call would be taken by another: the ranks' calls go out of step
            raise RuntimeError("ll all-reduce: a GEMV sent partial sums that no reduce_rms_norm_ has taken")

    def _fits_size(self, nbytes: int, dtype: torch.dtype) -> bool:
        return dtype in (torch.bfloat16, torch.float32) and 0 < nbytes <= self.max_bytes and nbytes % 16 == 0

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and self._fits_size(x.numel() * x.element_size(), x.dtype) and x.is_contiguous()
                and x.storage_offset() * x.element_size() % 16 == 0)

    def reduce_(self, x: torch.Tensor) -> torch.Tensor:
        self._no_pending()
        words = x.view(-1).view(torch.int32)
        n = words.numel()
        _ll_all_reduce[(triton.cdiv(n, BLOCK),)](
            words, n, self.ptrs, self.epoch, self.done, self.rank, BLOCK=BLOCK, IS_BF16=x.dtype == torch.bfloat16,
            ASM=x.is_cuda, num_warps=4, **self._consts(), **pdl.launch(x.device))
        return x

    def fits_gather(self, x: torch.Tensor) -> bool:
        """Whether `all_gather_last_dim` takes x: what `fits` takes, in rows of whole words."""
        return self.fits(x) and x.dim() >= 1 and x.shape[-1] * x.element_size() % 4 == 0

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dimension, in rank order (x must `fits_gather`)."""
        self._no_pending()
        row_words = x.shape[-1] * x.element_size() // 4
        n = x.numel() * x.element_size() // 4
        out = torch.empty((*x.shape[:-1], x.shape[-1] * self.world), dtype=x.dtype, device=x.device)
        _ll_all_gather[(triton.cdiv(n, BLOCK),)](
            x.view(-1).view(torch.int32), out.view(-1).view(torch.int32), n, row_words, self.ptrs, self.epoch,
            self.done, self.rank, BLOCK=BLOCK, num_warps=4, **self._consts(), **pdl.launch(x.device))
        return out

    def fits_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether `reduce_rms_norm_` takes [rows, hidden] x: few rows (one program each, all
        resident), each a whole number of words, x and residual (if any) alike."""
        return (self.fits(x) and self._norm_rows(*x.shape, x.dtype)
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                          and residual.is_contiguous())))

    def _norm_rows(self, rows: int, hidden: int, dtype: torch.dtype) -> bool:
        return 0 < rows <= MAX_NORM_ROWS and hidden * dtype.itemsize <= NORM_ROW_BYTES

    def fits_norm_rows(self, rows: int, hidden: int, dtype: torch.dtype) -> bool:
        """The shape part of `fits_rms_norm`: what a GEMV may send partial sums for."""
        return self._norm_rows(rows, hidden, dtype) and self._fits_size(rows * hidden * dtype.itemsize, dtype)

    def reduce_rms_norm_(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                         eps: float) -> torch.Tensor:
        """x summed over the ranks, then residual += x in place; returns RMSNorm(residual) * weight
        (x must `fits_rms_norm`). Without a residual x itself becomes the sum, which is normalised.
        One launch instead of an all-reduce and a norm. When x is `pending` the kernel that made
        it has sent the packets, and this call only receives."""
        sent = self.pending is x
        if not sent:
            self._no_pending()
        self.pending = None
        rows, hidden = x.shape
        row_words = hidden * x.element_size() // 4
        out = torch.empty_like(x)
        _ll_all_reduce_rms_norm[(rows,)](
            x.view(torch.int32), (x if residual is None else residual).view(torch.int32), weight.view(torch.int32),
            out.view(torch.int32), row_words, hidden, eps, self.ptrs, self.epoch, self.done, self.rank,
            SEND=not sent, HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(row_words), IS_BF16=x.dtype == torch.bfloat16, ASM=x.is_cuda, num_warps=8,
            **self._consts(), **pdl.launch(x.device))
        return out


def exchange_args(ll: LLAllReduce | None, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """What a kernel of another module that may make an ll call of its own passes for it
    (greedy.argmax, the decode graphs' input kernel): with `ll`, the buffers, the call counter,
    the finished programs' count and the rank; without, `placeholder` for the pointers and ALONE."""
    if ll is None:
        return (placeholder, placeholder, placeholder, 0), ALONE
    ll._no_pending()
    return (ll.ptrs, ll.epoch, ll.done, ll.rank), ll._consts()


def send_args(ll: LLAllReduce | None, out: torch.Tensor) -> tuple[tuple, dict]:
    """What a kernel that may send its output `out` as the next call's packets (`send_partials`:
    triton_gemv.gemv's and triton_fused.embedding's `send`) passes for it. With `ll`, `out`
    becomes ll.pending, so the reduce_rms_norm_ that takes it only receives; without, `out` for
    the pointers and ALONE."""
    if ll is None:
        return (out, out, 0), ALONE
    ll._no_pending()  # two sends before a receive would both take the same call
    ll.pending = out
    return (ll.ptrs, ll.epoch, ll.rank), ll._consts()


def make(recv: torch.Tensor, handle, rank: int, world: int, max_bytes: int) -> LLAllReduce:
    """Wrap a rendezvoused, zeroed receive buffer of 2 * world * max_bytes // 4 int64."""
    assert max_bytes // 4 // BLOCK <= MAX_PROGRAMS and recv.numel() == 2 * world * (max_bytes // 4)
    offset = recv.data_ptr() - handle.buffer_ptrs[rank]  # the tensor may sit inside the allocation
    ptrs = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=recv.device)
    epoch = torch.zeros(1, dtype=torch.int64, device=recv.device)
    done = torch.zeros(1, dtype=torch.int32, device=recv.device)
    return LLAllReduce(recv, handle, ptrs, epoch, done, rank, world, max_bytes)
