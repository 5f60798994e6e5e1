"""Greedy decoding's next ids on the device: each row's argmax over vocab-parallel logits (Triton).

A greedy decode step needs one id a row, yet it took the whole logits through torch: a float32
copy of them and torch's argmax (~14 us at bs=1 on an H200, the argmax a reduction of one block
a row) and, under tensor parallelism, first a gather of every rank's vocabulary shard (4.3 us).
Here one program a row scans this rank's shard as the LM head wrote it (16-bit), keeps each
lane's first largest value and takes the lowest index among the lanes that hold the row's
largest: torch.argmax's first occurrence. NaN counts as +inf (torch ranks NaN above all).
Under tensor parallelism each program then trades its (value, index) pair with the other ranks
through the ll all-reduce's buffers (ll_allreduce.py: 8 bytes a row, one NVLink trip) and keeps
the largest in rank order, so a tie goes to the lower rank, whose shard holds the lower indices.
Every rank gets the same ids. The full logits are gathered only for the steps that sample or
return them (model_runner.py). The ids can also go straight into pinned host memory (`host`),
where the engine reads them once the step is done: no copy home queued behind the step.
"""
from __future__ import annotations

import torch

from llm_service.layers import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None
MAX_BLOCK = 16384  # logits a program loads at once: a tp=2 shard of a 32k vocabulary in one go


if AVAILABLE:
    from llm_service.distributed.ll_allreduce import (MAX_PROGRAMS, _call_flag, _end_call, _receive, _send,
                                                      _table, exchange_args)

    @triton.jit
    def _first_max(x_ptr, valid, BLOCK: tl.constexpr):
        """(largest value, its first index) of x[:valid] as fp32 and int32, NaN as +inf."""
        offs = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        idx = offs  # an all -inf row: index 0, as torch
        for k0 in range(0, valid, BLOCK):
            v = tl.load(x_ptr + k0 + offs, mask=k0 + offs < valid, other=float("-inf")).to(tl.float32)
            v = tl.where(v != v, float("inf"), v)
            take = v > best  # strictly: a lane keeps its first occurrence
            best = tl.where(take, v, best)
            idx = tl.where(take, k0 + offs, idx)
        top = tl.max(best, axis=0)
        return top, tl.min(tl.where(best == top, idx, 2147483647), axis=0)

    @triton.jit
    def _greedy_kernel(x_ptr, out_ptr, stride_x, valid, start, ptrs_ptr, epoch_ptr, done_ptr, rank,
                       host_addr, host_off_ptr,
                       WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr, HOST: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[row] = the vocabulary index of row's largest logit over every rank's shard; x holds
        this rank's, from index `start`, `valid` of them real (the last shard may be padded).
        HOST: also into the int64 host memory at host_addr, from the element *host_off_ptr on."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        table = _table(ptrs_ptr, WORLD, WORLD_P2)  # WORLD 1: unused
        if PDL:
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        top, first = _first_max(x_ptr + row.to(tl.int64) * stride_x, valid, BLOCK)
        first += start
        if WORLD > 1:
            call, half, flag = _call_flag(epoch_ptr)
            two = tl.arange(0, 2)
            words = tl.where(two == 0, top.to(tl.int32, bitcast=True), first)
            offs = row * 2 + two
            mask = two < 2
            _send(words, offs, mask, table, half, flag, rank, WORLD, WORLD_P2, MAX_WORDS)
            for p in tl.static_range(WORLD):  # in rank order: a tie keeps the lower rank's index
                got = words
                if p != rank:
                    got = _receive(offs, mask, table, half, flag, rank, p, WORLD, WORLD_P2, MAX_WORDS)
                value = tl.sum(tl.where(two == 0, got, 0)).to(tl.float32, bitcast=True)
                index = tl.sum(tl.where(two == 1, got, 0))
                if p == 0:
                    top, first = value, index
                else:
                    take = value > top
                    top = tl.where(take, value, top)
                    first = tl.where(take, index, first)
            _end_call(epoch_ptr, done_ptr, call)
        tl.store(out_ptr + row, first.to(tl.int64))
        if HOST:
            tl.store(host_addr.to(tl.pointer_type(tl.int64)) + tl.load(host_off_ptr) + row, first.to(tl.int64))


def fits(rows: int, ll) -> bool:
    """Whether `argmax` takes `rows` rows: any number alone; under tensor parallelism (ll, an
    ll_allreduce.LLAllReduce) one resident program a row and a pair of words each in its buffer."""
    if not AVAILABLE:
        return False
    return ll is None or (0 < rows <= MAX_PROGRAMS and 8 * rows <= ll.max_bytes)


def argmax(logits: torch.Tensor, start: int, valid: int, ll=None, out: torch.Tensor | None = None,
           host: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """int64 [rows]: each row's argmax over the whole vocabulary, whose columns start..start+valid
    this rank's logits [rows, >= valid] hold; the other ranks' through `ll` (every rank calls it,
    in the same order as its other ll calls). `out` [rows] int64, when given, receives them.
    host (address, offset): the address of pinned int64 host memory, and a device int64 [1] whose
    value, read when the kernel runs, is the element the ids go to from there (a graph replays
    the address; the offset may change between replays)."""
    rows = logits.shape[0]
    if not fits(rows, ll):
        raise ValueError(f"greedy.argmax: {rows} rows do not fit the exchange")
    if logits.stride(-1) != 1:
        raise ValueError("greedy.argmax needs logits contiguous along the vocabulary")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    if rows == 0:
        return out
    args, consts = exchange_args(ll, logits)
    host_addr, host_off = host if host is not None else (0, out)
    block = min(MAX_BLOCK, triton.next_power_of_2(max(valid, 1)))
    _greedy_kernel[(rows,)](logits, out, logits.stride(0), valid, start, *args, host_addr, host_off,
                            HOST=host is not None, BLOCK=block, num_warps=16 if block >= 8192 else 4, **consts,
                            **pdl.launch(logits.device))
    return out
