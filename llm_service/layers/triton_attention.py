"""Triton kernels for paged attention on CUDA: rotary + KV-cache store, prefill and split-K attention.

Same semantics as the CPU reference in `attention.py`:
- caches are `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block * block_size + offset,
  and slot -1 is skipped (padded tokens under CUDA graphs);
- an int8 cache (quant_policy=8) comes with float32 scales `[num_blocks, block_size, num_kv_heads]`:
  the store quantizes each (token, kv head) row as `quantize_kv` does, op for op (QUANT, a
  constexpr: 0 for a 16/32-bit cache, whose path is the code it was; 1 for int8, 2 for int8 with
  the codes' conversion free to move to where the dots read them, see `_codes_f16`). With fp32 queries the attention kernels read
  `dequantize_kv`'s values, op for op; with 16-bit ones they read the codes as fp16 and fold the
  scales into the scores and the softmax weights (`_softmax_step`): the same attention, rounded
  differently, without a conversion and a multiply per cached element that made decode
  compute-bound;
- sequences are packed: query j of sequence b sits at absolute position
  `seq_lens[b] - q_len_b + j` and attends causally to cached keys 0..that position;
- GQA: query head h reads kv head `h // (Hq // Hkv)`.
Softmax runs online in fp32 (exp2 domain); the output has q's dtype. fp32 inputs use IEEE dots, not
tf32, so the fp32 test models match transformers.

Two attention kernels: `_prefill_kernel` (one program per 64 queries of one head, walking all of
its keys: long prompts and batched prefills) and `_split_kernel` (decode, and short prefills of a
few sequences over long contexts, e.g. a follow-up turn after a prefix-cache hit): one program per
(sequence, kv head, split of the keys), holding every query row of that kv head. With several
splits each writes a partial (max, sum, acc) to fp32 scratch and the last one of its (sequence,
kv head) to finish merges them (FOLD; an atomic counter per group, reset by the merger), or a
second kernel does (`_merge_kernel`). The split count comes from the batch size and the block
table's width, never from seq_lens on the host, and the kernels never sync with the host, so decode
and the short prefills are safe to capture in CUDA graphs of fixed shapes.

Every kernel launches with programmatic dependent launch where `pdl` enables it (see pdl.py).

The module imports without triton (CPU CI); `AVAILABLE` says whether the kernels can run.
"""
from __future__ import annotations

import functools

import torch

from llm_service.layers import pdl
from llm_service.layers.rotary import Rope

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None

_LOG2E = 1.4426950408889634


if AVAILABLE:
    _M_INIT = tl.constexpr(-1.0e30)  # finite running-max start: a masked row never computes inf - inf
    _ASM = tl.constexpr(not triton.knobs.runtime.interpret)  # inline PTX: Triton's interpreter has none
    _LAZY_RANGE = tl.constexpr(8.0)  # log2 units: how far scores may pass a stale running max
    # Integers that change from step to step (the block table's width, the split count): Triton
    # would compile a variant for each value class (1, a multiple of 16, other) it meets, mid-serving
    # (~0.7 s each on an H100 host; W2 met three of `_decode_mha_kernel` outside the decode graphs)
    _STEP_VARYING = ["num_splits", "stride_bt"]

    @triton.jit
    def _pdl_launch(PDL: tl.constexpr):
        """Let the next kernel launch now: every program calls this first."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible. Every program
        calls this before it reads anything an earlier kernel may write (`_split_kernel` reads
        some inputs before: see there) and before it returns, so a kernel never completes before
        its predecessor (which keeps PDL's ordering transitive)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _pdl_start(PDL: tl.constexpr):
        """`_pdl_launch`, then `_pdl_wait`: for kernels that read nothing before the wait."""
        _pdl_launch(PDL)
        _pdl_wait(PDL)

    @triton.jit
    def _rotate(x1, x2, c1, s1, c2, s2, DT: tl.constexpr):
        """Rotate-half RoPE of the halves x1, x2, rounding to DT after each multiply and
        the add, as transformers' `x * cos + rotate_half(x) * sin` does in DT."""
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = (x1 * c1).to(DT).to(tl.float32) + (-(x2 * s1)).to(DT).to(tl.float32)
        o2 = (x2 * c2).to(DT).to(tl.float32) + (x1 * s2).to(DT).to(tl.float32)
        return o1.to(DT), o2.to(DT)

    @triton.jit
    def _code(x, scale):
        """round(x / scale) half to even, clamped to [-127, 127], as int8. Adding and subtracting
        1.5 * 2^23 rounds an fp32 under 2^22 in magnitude to an integer, ties to even (libdevice's
        rint has no twin in the interpreter); div_rn: IEEE division, as torch's."""
        r = tl.math.div_rn(x, scale)
        r = (r + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)

    @triton.jit
    def _store_int8(dst, scale_dst, x1, x2, mask, row_mask, HALF: tl.constexpr):
        """Rows [x1 | x2] (head_dim's two halves, a row per kv head) stored as attention.py's
        quantize_kv stores them: int8 codes at dst, the fp32 scale max|x| / 127 (1 for a zero
        row) at scale_dst."""
        x1 = tl.where(mask, x1.to(tl.float32), 0.0)
        x2 = tl.where(mask, x2.to(tl.float32), 0.0)
        amax = tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1))
        scale = tl.math.div_rn(amax, 127.0)[:, None]
        scale = tl.where(scale > 0, scale, 1.0)
        tl.store(dst, _code(x1, scale), mask=mask)
        tl.store(dst + HALF, _code(x2, scale), mask=mask)
        tl.store(scale_dst, scale, mask=row_mask)

    @triton.jit
    def _dequant(codes, scale, DT: tl.constexpr):
        """attention.py's dequantize_kv of a tile: codes x row scale in fp32, rounded once to DT."""
        return (codes.to(tl.float32) * scale[:, None]).to(DT)

    @triton.jit
    def _codes_f16(x, PURE: tl.constexpr):
        """int8 codes as fp16, exactly. I2F runs at a quarter of the fp32 rate on Hopper (with a
        multiply by the scale it made int8 decode compute-bound), so four codes of a register go
        by the magic-number trick: xor 0x80808080 makes each byte code + 128 (unsigned), prmt
        puts bytes 0, 1 (then 2, 3) under 0x64 (the fp16 1024 + byte, in element order) and
        sub.f16x2 takes 1152 off. Not pure: Triton would otherwise move it past the shared-memory
        loads into the dots' operand layout, where both converted tiles sit in registers (154-168
        a thread at the decode tile, sm_90, against 128). PURE lets it: the loads then pipeline
        (cp.async into shared memory, the conversion in the dots' operand layout). The interpreter
        (no inline asm) converts plainly."""
        if _ASM:
            y = tl.inline_asm_elementwise(
                """{
                .reg .b32 t, c;
                xor.b32 t, $2, 0x80808080;
                mov.b32 c, 0x64806480;
                prmt.b32 $0, t, 0x64646464, 0x4140;
                prmt.b32 $1, t, 0x64646464, 0x4342;
                sub.f16x2 $0, $0, c;
                sub.f16x2 $1, $1, c;
                }""",
                "=r,=r,r", [x], dtype=tl.float16, is_pure=PURE, pack=4)
        else:
            y = x.to(tl.float16)
        return y

    @triton.jit
    def _words_f32(x):
        """The four int8 codes packed in each int32 of x (byte i: code 4j + i of word j) as four fp32
        tensors of x's shape, exactly, for the CUDA-core decode (`_decode_mha_kernel`). Loaded as
        words, the codes stay four to a register wherever they are kept (a loop-carried int8 tile
        takes a register per code). Again a magic number rather than I2F: xor 0x80808080 makes each
        byte code + 128, prmt puts it under 0x4B000000 (the fp32 2^23 + byte) and sub.f32 takes
        2^23 + 128 off. The interpreter shifts the bytes out instead."""
        if _ASM:
            y = tl.inline_asm_elementwise(
                """{
                .reg .b32 t;
                xor.b32 t, $4, 0x80808080;
                prmt.b32 $0, t, 0x4B000000, 0x7540;
                prmt.b32 $1, t, 0x4B000000, 0x7541;
                prmt.b32 $2, t, 0x4B000000, 0x7542;
                prmt.b32 $3, t, 0x4B000000, 0x7543;
                sub.f32 $0, $0, 0f4B000080;
                sub.f32 $1, $1, 0f4B000080;
                sub.f32 $2, $2, 0f4B000080;
                sub.f32 $3, $3, 0f4B000080;
                }""",
                "=r,=r,=r,=r,r", [x], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            y = ((x << 24) >> 24).to(tl.float32), ((x << 16) >> 24).to(tl.float32), \
                ((x << 8) >> 24).to(tl.float32), (x >> 24).to(tl.float32)
        return y

    # positions: a view into the step's one flat int64 tensor (distributed/step.py), 16-byte
    # aligned only when the step has an even token count; read one per program, so not worth a variant
    @triton.jit(do_not_specialize_on_alignment=["pos_ptr"])
    def _rope_store_kernel(
        q_ptr, k_ptr, v_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
        stride_qt, stride_qh, stride_qot, stride_qoh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_rope,
        ks_ptr, vs_ptr, stride_sb, stride_ss, stride_sh,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, ROPE: tl.constexpr,
        QUANT: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Token t: (with ROPE) q rotated into q_out; k (rotated with ROPE) and v stored at
        slot_mapping[t] unless that is -1. One program per token, both halves of head_dim.
        QUANT: int8 caches; k and v are rounded to their own dtype, as the 16-bit cache would
        hold them, then quantized per kv head (scales at ks_ptr / vs_ptr)."""
        t = tl.program_id(0).to(tl.int64)
        _pdl_start(PDL)
        d = tl.arange(0, BLOCK_HALF)[None, :]
        d_ok = d < HALF
        DT = k_ptr.dtype.element_ty if QUANT else kc_ptr.dtype.element_ty  # the dtype of the cached values
        if ROPE:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            c1 = tl.load(cos_ptr + pos * stride_rope + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * stride_rope + HALF + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * stride_rope + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * stride_rope + HALF + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            hq = tl.arange(0, BLOCK_HQ)[:, None]
            q_ok = (hq < HQ) & d_ok
            src = q_ptr + t * stride_qt + hq * stride_qh + d
            q1, q2 = _rotate(tl.load(src, mask=q_ok), tl.load(src + HALF, mask=q_ok), c1, s1, c2, s2, DT)
            dst = q_out_ptr + t * stride_qot + hq * stride_qoh + d
            tl.store(dst, q1, mask=q_ok)
            tl.store(dst + HALF, q2, mask=q_ok)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            page = slot // PAGE
            off = slot % PAGE
            hk = tl.arange(0, BLOCK_HKV)[:, None]
            kv_ok = (hk < HKV) & d_ok
            k_src = k_ptr + t * stride_kt + hk * stride_kh + d
            k1, k2 = tl.load(k_src, mask=kv_ok), tl.load(k_src + HALF, mask=kv_ok)
            if ROPE:
                k1, k2 = _rotate(k1, k2, c1, s1, c2, s2, DT)
            v_src = v_ptr + t * stride_vt + hk * stride_vh + d
            kc = kc_ptr + page * stride_kcb + off * stride_kcs + hk * stride_kch + d
            vc = vc_ptr + page * stride_vcb + off * stride_vcs + hk * stride_vch + d
            if QUANT:
                row = page * stride_sb + off * stride_ss + hk * stride_sh
                _store_int8(kc, ks_ptr + row, k1.to(DT), k2.to(DT), kv_ok, hk < HKV, HALF)
                _store_int8(vc, vs_ptr + row, tl.load(v_src, mask=kv_ok).to(DT),
                            tl.load(v_src + HALF, mask=kv_ok).to(DT), kv_ok, hk < HKV, HALF)
            else:
                tl.store(kc, k1.to(DT), mask=kv_ok)
                tl.store(kc + HALF, k2.to(DT), mask=kv_ok)
                tl.store(vc, tl.load(v_src, mask=kv_ok).to(DT), mask=kv_ok)
                tl.store(vc + HALF, tl.load(v_src + HALF, mask=kv_ok).to(DT), mask=kv_ok)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _tile_pages(bt_row, n0, n_end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keys n0..n0+BLOCK_N (those < n_end) of one sequence: (offs_n, n_mask, page, offset in
        the page), the pages read from its block-table row."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        return offs_n, n_mask, page, offs_n % PAGE

    @triton.jit
    def _load_tiles(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_d, d_mask,
                    stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, QUANT: tl.constexpr):
        """The K and V tiles of those keys as stored (0 where masked), both loads issued before
        either is used: V's does not wait behind the QK product where the loads are not
        pipelined, and their row scales (QUANT: an int8 cache's, K's and V's at the same strides,
        0 where masked; else zeros, unused)."""
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + page[:, None] * stride_kb + off[:, None] * stride_ks + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + page[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        k_scale = tl.zeros(n_mask.shape, tl.float32)
        v_scale = k_scale
        if QUANT:
            row = page * stride_sb + off * stride_ss
            k_scale = tl.load(ks_base + row, mask=n_mask, other=0.0)
            v_scale = tl.load(vs_base + row, mask=n_mask, other=0.0)
        return k, v, k_scale, v_scale

    @triton.jit
    def _load_kv(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_d, d_mask,
                 stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss,
                 QUANT: tl.constexpr, IEEE: tl.constexpr):
        """`_load_tiles`, an int8 cache's codes converted for the dots: with IEEE (fp32 queries)
        dequantized to fp32, else the codes as fp16 (`_softmax_step` folds the scales in; QUANT 2:
        converted by `_codes_f16` with PURE)."""
        k, v, k_scale, v_scale = _load_tiles(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_d, d_mask,
                                             stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, QUANT)
        if QUANT:
            if IEEE:
                k, v = _dequant(k, k_scale, tl.float32), _dequant(v, v_scale, tl.float32)
            else:
                k, v = _codes_f16(k, QUANT == 2), _codes_f16(v, QUANT == 2)
        return k, v, k_scale, v_scale

    @triton.jit
    def _softmax_step(q, pos, m_i, l_i, acc, k, v, k_scale, v_scale, offs_n, n_mask, qk_scale,
                      IEEE: tl.constexpr, QUANT: tl.constexpr, CAUSAL: tl.constexpr):
        """One online-softmax step over a loaded tile, row i of q seeing key n when n <= pos[i].
        Returns the updated (max, sum, acc).

        QUANT without IEEE: q, k and v are fp16, k and v an int8 cache's codes, their row scales
        folded out of the tiles: scores (q . codes_n) * k_scale[n], and acc += w @ codes for the
        weights w = p * v_scale[n]. Each row's w is divided by c, the power of two at or below
        its largest, before the cast to fp16 (p * v_scale, v_scale = max|v| / 127, would often be
        an fp16 subnormal, with a fraction of its precision), and c goes into alpha (exactly:
        a power of two), so the product still accumulates into acc. Products of fp16 are exact
        in fp32, so beyond fp32 only w is rounded (to fp16, 2^-11). A bf16 q is cast to fp16 by
        the kernels: beyond 65504 it would overflow to inf; a model's rotated queries are orders
        of magnitude below that.

        CAUSAL False: every row sees every key of the tile (the caller knows), so no mask: the
        same values where the mask would keep them all."""
        s = _dot(q, tl.trans(k), IEEE)
        if QUANT and not IEEE:
            s = s * k_scale[None, :]
        if CAUSAL:
            s = tl.where((offs_n[None, :] <= pos[:, None]) & n_mask[None, :], s * qk_scale, float("-inf"))
        else:
            s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if QUANT and not IEEE:
            w = p * v_scale[None, :]
            c = (tl.max(w, 1).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
            c = tl.where(c > 0, c, 1.0)  # a row that sees no key of the tile
            acc = (acc * (alpha / c)[:, None] + _dot((w * (1.0 / c)[:, None]).to(tl.float16), v, IEEE)) * c[:, None]
        else:
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _attend_tile(q, pos, m_i, l_i, acc, n0, n_end, k_base, v_base, ks_base, vs_base, bt_row, offs_d, d_mask,
                     qk_scale, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss,
                     PAGE: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
        """Load and attend the paged keys n0..n0+BLOCK_N (those < n_end) of one kv head (CAUSAL:
        see `_softmax_step`)."""
        offs_n, n_mask, page, off = _tile_pages(bt_row, n0, n_end, PAGE, BLOCK_N)
        k, v, k_scale, v_scale = _load_kv(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_d, d_mask,
                                          stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss,
                                          QUANT, IEEE)
        return _softmax_step(q, pos, m_i, l_i, acc, k, v, k_scale, v_scale, offs_n, n_mask, qk_scale, IEEE, QUANT,
                             CAUSAL)

    @triton.jit
    def _write_out(o_ptr, toks, heads, offs_d, mask, acc, l_i, stride_ot, stride_oh):
        """acc / l (0 where a row saw no key) to rows `toks`, heads `heads` of the output."""
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + toks[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["seq0", "stride_bt"])
    def _prefill_kernel(
        q_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, cu_ptr, lens_ptr, seq0, qk_scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        ks_ptr, vs_ptr, stride_sb, stride_ss, stride_sh,
        GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
        PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one sequence and one query head. The key tiles that all
        of its queries see (keys up to its first query's position) run without the causal mask;
        only the tiles on the diagonal mask. A (sequence, head)'s query blocks are neighbours in
        the grid (they read the same keys, which then come from L2), the last first: it sees
        the most keys. Sequences seq0.. only (a mixed step's decodes, before them, take the split
        kernel; an offset, not sliced pointers, whose alignment would compile another variant)."""
        mblk = tl.num_programs(0) - 1 - tl.program_id(0)
        b = seq0 + tl.program_id(1)
        h = tl.program_id(2)
        _pdl_start(PDL)
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        if mblk * BLOCK_M >= q_len:
            return
        seq_len = tl.load(lens_ptr + b)
        ctx = seq_len - q_len
        kvh = h // GROUP

        offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        mask = (offs_m < q_len)[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask, other=0.0)
        if QUANT and not IEEE:  # fp16 dots with the codes (_softmax_step)
            q = q.to(tl.float16)
        pos = ctx + offs_m

        m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(seq_len, ctx + (mblk + 1) * BLOCK_M)
        seen_by_all = (ctx + mblk * BLOCK_M + 1) // BLOCK_N * BLOCK_N  # <= kv_end: whole tiles below the diagonal
        k_base, v_base = kc_ptr + kvh * stride_kh, vc_ptr + kvh * stride_vh
        ks_base, vs_base = ks_ptr + kvh * stride_sh, vs_ptr + kvh * stride_sh
        bt_row = bt_ptr + b * stride_bt
        for n0 in range(0, seen_by_all, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, pos, m_i, l_i, acc, n0, kv_end, k_base, v_base, ks_base, vs_base, bt_row, offs_d, d_mask,
                qk_scale, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, PAGE, IEEE, QUANT, BLOCK_N,
                False)
        for n0 in range(seen_by_all, kv_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, pos, m_i, l_i, acc, n0, kv_end, k_base, v_base, ks_base, vs_base, bt_row, offs_d, d_mask,
                qk_scale, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, PAGE, IEEE, QUANT, BLOCK_N,
                True)
        _write_out(o_ptr, q_start + offs_m, h + tl.zeros([BLOCK_M], tl.int32), offs_d, mask, acc, l_i,
                   stride_ot, stride_oh)

    @triton.jit
    def _split_range(seq_len, num_splits, BLOCK_N: tl.constexpr):
        """(split_len, active): splits are equal BLOCK_N-aligned ranges of the keys, sized from
        seq_len on device; the first `active` hold keys (at least split 0, even with no keys)."""
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        return split_len, tl.maximum(tl.cdiv(seq_len, tl.maximum(split_len, 1)), 1)

    @triton.jit
    def _split_program(cu_ptr, lens_ptr, num_splits, PDL: tl.constexpr, BLOCK_N: tl.constexpr):
        """The start of a split program (b, pid, split): lets the next kernel launch, then reads
        what it may read before the PDL wait (see `_split_kernel`). Returns (b, pid, split, its
        sequence's first query row, q_len, seq_len, its keys' range start..end, active splits)."""
        b = tl.program_id(0)
        pid = tl.program_id(1)
        split = tl.program_id(2)
        _pdl_launch(PDL)
        q_row = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_row
        seq_len = tl.load(lens_ptr + b)
        split_len, active = _split_range(seq_len, num_splits, BLOCK_N)
        start = split * split_len
        return b, pid, split, q_row, q_len, seq_len, start, tl.minimum(start + split_len, seq_len), active

    @triton.jit
    def _rows(pid, q_row, q_len, GROUP: tl.constexpr, CHUNKS: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS_H: tl.constexpr):
        """The rows of split program `pid` (axis 1): BLOCK_H query heads (chunk pid % CHUNKS of
        kv head pid // CHUNKS's group) x BLOCK_Q queries, of which the first ROWS_H heads (all
        BLOCK_H, or fewer for the merge: the rows of the group past it are padding). Returns
        (kv head, query head, token, query index j, valid) per row."""
        kvh = pid // CHUNKS
        r = tl.arange(0, ROWS_H * BLOCK_Q)
        g = (pid % CHUNKS) * BLOCK_H + r // BLOCK_Q
        j = r % BLOCK_Q
        return kvh, kvh * GROUP + g, q_row + j, j, (g < GROUP) & (j < q_len)

    @triton.jit
    def _merge_splits(mpart_ptr, lpart_ptr, apart_ptr, part0, active, row_ok, offs_d, d_mask,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Merge the partials of splits 0..active-1 (index part0 + split), BLOCK_S splits at a time:
        their partials load together, so a merge waits on memory cdiv(active, BLOCK_S) times instead
        of once a split (at bs=1 decode the merge is the end of attention's critical path). The
        order of the sums depends on `active` only, not on which program merges. Loads bypass L1
        (.cg): another program on this SM may have cached a line of these partials before they
        were written."""
        m_i = tl.full([BLOCK_R], _M_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        offs_s = tl.arange(0, BLOCK_S)
        for s0 in range(0, active, BLOCK_S):
            part = part0[:, None] + s0 + offs_s[None, :]  # [rows, splits]
            ok = row_ok[:, None] & (s0 + offs_s < active)[None, :]
            m_s = tl.load(mpart_ptr + part, mask=ok, other=_M_INIT, cache_modifier=".cg")
            l_s = tl.load(lpart_ptr + part, mask=ok, other=0.0, cache_modifier=".cg")
            a_s = tl.load(apart_ptr + part[:, :, None] * D + offs_d[None, None, :],
                          mask=ok[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_i, tl.max(m_s, 1))
            alpha = tl.exp2(m_i - m_new)
            beta = tl.exp2(m_s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(l_s * beta, 1)
            acc = acc * alpha[:, None] + tl.sum(a_s * beta[:, :, None], 1)
            m_i = m_new
        return acc, l_i

    @triton.jit
    def _finish_split(o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cnt_ptr, b, pid, toks, heads, row_ok, offs_d, d_mask,
                      m_i, l_i, acc, split, active, num_q_heads, num_splits, stride_ot, stride_oh,
                      merge_toks, merge_heads, merge_ok,
                      D: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr, MERGE_R: tl.constexpr, BLOCK_S: tl.constexpr):
        """A split program's rows (max, sum, acc) to the output: written directly when the
        sequence's keys fit one split, else stored as this split's partial and, with FOLD, merged
        by the split that finishes last (the counter of program (b, pid); see `_split_kernel`).
        The merge takes the MERGE_R rows merge_* (the real ones of the BLOCK_R: a padded GQA group
        has fewer), BLOCK_S splits at a time."""
        mask = row_ok[:, None] & d_mask[None, :]
        if SPLIT:
            if active > 1:
                part0 = (toks * num_q_heads + heads) * num_splits
                tl.store(mpart_ptr + part0 + split, m_i, mask=row_ok)
                tl.store(lpart_ptr + part0 + split, l_i, mask=row_ok)
                tl.store(apart_ptr + (part0 + split)[:, None] * D + offs_d[None, :], acc, mask=mask)
                if FOLD:
                    tl.debug_barrier()
                    counter = cnt_ptr + b * tl.num_programs(1) + pid
                    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == active - 1:
                        tl.store(counter, 0)
                        merge0 = (merge_toks * num_q_heads + merge_heads) * num_splits
                        acc_m, l_m = _merge_splits(mpart_ptr, lpart_ptr, apart_ptr, merge0, active, merge_ok,
                                                   offs_d, d_mask, D, MERGE_R, BLOCK_D, BLOCK_S)
                        _write_out(o_ptr, merge_toks, merge_heads, offs_d, merge_ok[:, None] & d_mask[None, :],
                                   acc_m, l_m, stride_ot, stride_oh)
            else:
                _write_out(o_ptr, toks, heads, offs_d, mask, acc, l_i, stride_ot, stride_oh)
        else:
            _write_out(o_ptr, toks, heads, offs_d, mask, acc, l_i, stride_ot, stride_oh)

    @triton.jit(do_not_specialize=_STEP_VARYING)
    def _split_kernel(
        q_ptr, kc_ptr, vc_ptr, o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cnt_ptr,
        bt_ptr, cu_ptr, lens_ptr, qk_scale, num_splits, num_q_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        ks_ptr, vs_ptr, stride_sb, stride_ss, stride_sh,
        GROUP: tl.constexpr, CHUNKS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
        QUANT: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MERGE_H: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program: BLOCK_H query heads of one kv head x the (up to BLOCK_Q) queries of one
        sequence, over one split of its keys (decode: BLOCK_Q 1, the GQA group padded to 16 rows).

        Each kv tile is read once for all those rows, and both products run on tensor cores
        (measured faster than a CUDA-core dot even for MHA decode). A sequence whose keys fit one
        split (always when not SPLIT) writes the output directly. Otherwise each active split
        stores its partial (max, sum, acc) at (token, head, split); with FOLD the program that
        finishes last in its (sequence, kv head, chunk) merges them: it counts itself in with an
        acq_rel atomic at gpu scope after a CTA barrier (the barrier orders every thread's partial
        stores before the one thread's release, which is cumulative), reads the count back (its
        acquire, and the chain of acq_rel increments, makes every earlier program's partials
        visible), resets the counter to 0 for the next launch or graph replay, and merges. No
        program ever waits on another, so any launch order or residency is safe. Without FOLD,
        `_merge_kernel` merges.

        Under PDL a program reads before its wait only what no kernel that may still be running
        writes: cu_seqlens, seq_lens and the block table (filled before the forward by copies and
        torch ops, which launch without PDL and so finish before any later kernel starts) and,
        with EARLY, its first tile's block-table entries and, if the tile holds only keys older
        than this step (positions < seq_len - q_len), its K and V (and an int8 cache's scales of
        them). Those were stored by earlier forwards: in this one, the kernel before attention
        (rope_store, or the QKV GEMV with its rope epilogue) writes q and this step's K/V at
        slot_mapping only, and the kernels further back that PDL lets overlap write activations
        and other layers' caches. q, a first tile
        holding any of this step's keys (in decode the last active split's), the later tiles, the
        partials and the counters (reset by earlier attention launches) are read after the wait;
        every program waits before returning, also those with nothing to do. So
        a split of old keys has its first K and V tile on chip when the wait returns instead of
        starting three dependent reads then (seq_len -> block table -> K/V). At one split (many
        waves of programs, few of which meet a running predecessor) EARLY's registers (96 -> 105
        a thread at the default tile, sm_90) would cost a CTA per SM, so the launcher sets it with
        more than one split only. The first tile's step is the loop's first step moved before
        it, so the result is bitwise the same either way.
        """
        b, pid, split, q_row, q_len, seq_len, start, end, active = _split_program(cu_ptr, lens_ptr, num_splits, PDL,
                                                                                  BLOCK_N)
        kvh, heads, toks, j, row_ok = _rows(pid, q_row, q_len, GROUP, CHUNKS, BLOCK_H, BLOCK_Q, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        k_base = kc_ptr + kvh * stride_kh
        v_base = vc_ptr + kvh * stride_vh
        ks_base = ks_ptr + kvh * stride_sh
        vs_base = vs_ptr + kvh * stride_sh
        bt_row = bt_ptr + b * stride_bt
        if EARLY:  # read before the wait: see above
            offs_n, n_mask, page, off = _tile_pages(bt_row, start, end, PAGE, BLOCK_N)
            cached = (q_len > 0) & (split < active) & (tl.minimum(start + BLOCK_N, end) <= seq_len - q_len)
            tile_dt = (tl.float32 if IEEE else tl.float16) if QUANT else kc_ptr.dtype.element_ty  # _load_kv's
            k = tl.zeros([BLOCK_N, BLOCK_D], tile_dt)
            v = tl.zeros([BLOCK_N, BLOCK_D], tile_dt)
            k_scale = tl.zeros([BLOCK_N], tl.float32)
            v_scale = k_scale
            if cached:  # loaded in an `if`: Triton then copies K to shared memory after V's load, not before
                k, v, k_scale, v_scale = _load_kv(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_d,
                                                  d_mask, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb,
                                                  stride_ss, QUANT, IEEE)
        _pdl_wait(PDL)
        if q_len == 0:
            return
        if split >= active:
            return
        mask = row_ok[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + toks[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask, other=0.0)
        if QUANT and not IEEE:  # fp16 dots with the codes (_softmax_step)
            q = q.to(tl.float16)
        pos = seq_len - q_len + j

        m_i = tl.full([BLOCK_H * BLOCK_Q], _M_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_H * BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_H * BLOCK_Q, BLOCK_D], tl.float32)
        first = start
        if EARLY:
            if cached:
                m_i, l_i, acc = _softmax_step(q, pos, m_i, l_i, acc, k, v, k_scale, v_scale, offs_n, n_mask,
                                              qk_scale, IEEE, QUANT, True)
                first += BLOCK_N
        for n0 in range(first, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, pos, m_i, l_i, acc, n0, end, k_base, v_base, ks_base, vs_base, bt_row, offs_d, d_mask, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, PAGE, IEEE, QUANT, BLOCK_N, True)

        _, merge_heads, merge_toks, _, merge_ok = _rows(pid, q_row, q_len, GROUP, CHUNKS, BLOCK_H, BLOCK_Q, MERGE_H)
        _finish_split(o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cnt_ptr, b, pid, toks, heads, row_ok, offs_d, d_mask,
                      m_i, l_i, acc, split, active, num_q_heads, num_splits, stride_ot, stride_oh,
                      merge_toks, merge_heads, merge_ok, D, SPLIT, FOLD, BLOCK_H * BLOCK_Q, BLOCK_D,
                      MERGE_H * BLOCK_Q, BLOCK_S)

    @triton.jit(do_not_specialize=_STEP_VARYING)
    def _decode_mha_kernel(
        q_ptr, kc_ptr, vc_ptr, o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cnt_ptr,
        bt_ptr, cu_ptr, lens_ptr, qk_scale, num_splits, num_q_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        ks_ptr, vs_ptr, stride_sb, stride_ss, stride_sh,
        D: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Decode over an int8 cache without GQA (one query row per kv head) on CUDA cores: one
        program per (sequence, head, split). The tensor-core kernel pads that row to 16 and
        converts each code tile to fp16 in the dots' operand layout; here the codes go straight
        from their loads, as int32 words, to fp32 (`_words_f32`) and into products with q, four
        vectors for the four bytes of a word, so the program holds no converted tile and no
        padding (`bench/KERNELS.md`, "int8 decode"). D % 16 == 0: the word strides are then
        multiples of 4 words (16 bytes), which the loads' vectorization is told.

        Each of the tile's BLOCK_N key slots keeps its own sum and row of acc over the keys
        n0 + slot of successive tiles, against one running max that is raised only when a tile's
        top score passes it by more than _LAZY_RANGE (weights up to 2^8 meanwhile, harmless in
        fp32): most tiles then skip rescaling acc, and the slots are summed once at the end. The
        scales fold in as in `_softmax_step`: scores (q . codes) * k_scale, weights p * v_scale
        (in fp32 here). Each step loads the next tile before it works on its own (carried in
        registers: 2-6% faster at W2's shapes than Triton's pipelining through shared memory at
        2-4 stages, `kernels_check.py --cc`). q_len is 1 (cu_seqlens step by 1; 0 for a padding
        row)."""
        b, h, split, tok, q_len, seq_len, start, end, active = _split_program(cu_ptr, lens_ptr, num_splits, PDL,
                                                                              BLOCK_N)
        _pdl_wait(PDL)
        if q_len == 0:
            return
        if split >= active:
            return
        offs_w = tl.arange(0, BLOCK_D // 4)  # words of 4 codes; element d = 4 * word + byte
        w_mask = offs_w < D // 4
        q_row = q_ptr + tok * stride_qt + h * stride_qh + 4 * offs_w
        q0 = tl.load(q_row, mask=w_mask, other=0.0).to(tl.float32)
        q1 = tl.load(q_row + 1, mask=w_mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_row + 2, mask=w_mask, other=0.0).to(tl.float32)
        q3 = tl.load(q_row + 3, mask=w_mask, other=0.0).to(tl.float32)
        k_base = (kc_ptr + h * stride_kh).to(tl.pointer_type(tl.int32))
        v_base = (vc_ptr + h * stride_vh).to(tl.pointer_type(tl.int32))
        ks_base, vs_base = ks_ptr + h * stride_sh, vs_ptr + h * stride_sh
        wkb, wks = tl.multiple_of(stride_kb // 4, 4), tl.multiple_of(stride_ks // 4, 4)
        wvb, wvs = tl.multiple_of(stride_vb // 4, 4), tl.multiple_of(stride_vs // 4, 4)
        bt_row = bt_ptr + b * stride_bt
        m_top = tl.full([], _M_INIT, tl.float32)
        l = tl.zeros([BLOCK_N], tl.float32)
        a0 = tl.zeros([BLOCK_N, BLOCK_D // 4], tl.float32)
        a1, a2, a3 = a0, a0, a0
        _, n_mask, page, off = _tile_pages(bt_row, start, end, PAGE, BLOCK_N)
        k, v, k_scale, v_scale = _load_tiles(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_w, w_mask,
                                             wkb, wks, wvb, wvs, stride_sb, stride_ss, 1)
        for n0 in range(start, end, BLOCK_N):
            # this tile was loaded the step before; load the next (masked off past the end)
            mask_now, k_now, v_now, ks_now, vs_now = n_mask, k, v, k_scale, v_scale
            _, n_mask, page, off = _tile_pages(bt_row, n0 + BLOCK_N, end, PAGE, BLOCK_N)
            k, v, k_scale, v_scale = _load_tiles(k_base, v_base, ks_base, vs_base, page, off, n_mask, offs_w, w_mask,
                                                 wkb, wks, wvb, wvs, stride_sb, stride_ss, 1)
            k0, k1, k2, k3 = _words_f32(k_now)
            s = tl.sum(k0 * q0[None, :] + k1 * q1[None, :] + k2 * q2[None, :] + k3 * q3[None, :], 1)
            s = tl.where(mask_now, s * ks_now * qk_scale, float("-inf"))
            top = tl.max(s, 0)
            if top > m_top + _LAZY_RANGE:
                alpha = tl.exp2(m_top - top)
                l, a0, a1, a2, a3, m_top = l * alpha, a0 * alpha, a1 * alpha, a2 * alpha, a3 * alpha, top
            p = tl.exp2(s - m_top)
            l += p
            w = (p * vs_now)[:, None]
            v0, v1, v2, v3 = _words_f32(v_now)
            a0, a1, a2, a3 = a0 + w * v0, a1 + w * v1, a2 + w * v2, a3 + w * v3
        l_row = tl.zeros([1], tl.float32) + tl.sum(l, 0)
        acc_row = tl.reshape(tl.join(tl.join(tl.sum(a0, 0), tl.sum(a2, 0)), tl.join(tl.sum(a1, 0), tl.sum(a3, 0))),
                             [BLOCK_D])[None, :]  # interleaved back: element 4 * word + byte
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        one = tl.zeros([1], tl.int32)
        _finish_split(o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cnt_ptr, b, h, tok + one, h + one, one == 0, offs_d,
                      d_mask, m_top + tl.zeros([1], tl.float32), l_row, acc_row, split, active, num_q_heads,
                      num_splits, stride_ot, stride_oh, tok + one, h + one, one == 0, D, SPLIT, FOLD, 1, BLOCK_D,
                      1, BLOCK_S)

    @triton.jit(do_not_specialize=["num_splits"])
    def _merge_kernel(
        o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cu_ptr, lens_ptr, num_splits, num_q_heads, stride_ot, stride_oh,
        GROUP: tl.constexpr, CHUNKS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MERGE_H: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Without FOLD: merge the splits of the rows of split program (b, pid); sequences whose
        keys fit one split were written by `_split_kernel` itself."""
        b = tl.program_id(0)
        pid = tl.program_id(1)
        _pdl_start(PDL)
        q_row = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_row
        if q_len == 0:
            return
        _, active = _split_range(tl.load(lens_ptr + b), num_splits, BLOCK_N)
        if active == 1:
            return
        _, heads, toks, _, row_ok = _rows(pid, q_row, q_len, GROUP, CHUNKS, BLOCK_H, BLOCK_Q, MERGE_H)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc, l_i = _merge_splits(mpart_ptr, lpart_ptr, apart_ptr, (toks * num_q_heads + heads) * num_splits,
                                 active, row_ok, offs_d, d_mask, D, MERGE_H * BLOCK_Q, BLOCK_D, BLOCK_S)
        _write_out(o_ptr, toks, heads, offs_d, row_ok[:, None] & d_mask[None, :], acc, l_i, stride_ot, stride_oh)


def _require_triton() -> None:
    if not AVAILABLE:
        raise RuntimeError("triton is not installed: use the torch paths in llm_service.layers.attention")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Write k, v `[T, Hkv, D]` into the caches at `slot_mapping` (int64 `[T]`; -1 skips);
    with scales, into int8 caches as quantize_kv's codes and scales."""
    _rope_store(None, k, v, None, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding and cache write in one launch: returns q `[T, Hq, D]` rotated, and
    stores k (rotated) and v at `slot_mapping` (quantized with scales, as store_kvcache). rope:
    the cos and sin tables and the positions, fp32 `[max_positions, D]` tables and int64
    positions `[T]`."""
    return _rope_store(q, k, v, rope, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _rope_store(q, k, v, rope, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    _require_triton()
    T, Hkv, D = k.shape
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if q is None:  # store only: the q arguments are placeholders the kernel never reads
        q_in = q_out = k
        cos = sin = positions = slot_mapping
    else:
        q_in = _last_dim_contiguous(q)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        cos, sin, positions = rope.cos, rope.sin, rope.positions
    if T == 0:
        return q_out
    Hq = q_in.shape[1]
    scales, quant = _scale_args(k_cache, v_cache, k_scale, v_scale)
    _rope_store_kernel[(T,)](
        q_in, k, v, q_out, k_cache, v_cache, slot_mapping, positions, cos, sin,
        q_in.stride(0), q_in.stride(1), q_out.stride(0), q_out.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_cache_strides(k_cache, v_cache), cos.stride(0) if q is not None else 0, *scales,
        HQ=Hq, HKV=Hkv, HALF=D // 2, PAGE=k_cache.shape[1], ROPE=q is not None, QUANT=quant,
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HALF=triton.next_power_of_2(D // 2),
        enable_fp_fusion=False,  # a contracted multiply-add would skip the product's rounding
        **pdl.launch(k.device),
    )
    return q_out


SHORT_Q_MAX = 64  # a prefill of queries up to this long may take the split kernel (see _use_split)
FOLD = True  # the last split program merges (no second launch); False: _merge_kernel does


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float, max_q_len: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, num_decodes: int = 0) -> torch.Tensor:
    """Causal attention of packed queries `[T, Hq, D]` over the paged caches; returns `[T, Hq, D]`.
    With scales the caches are int8 and the kernels read their dequantized values.

    Decode (`max_q_len == 1`, or `max_q_len is None` and T == B, which means every q_len is 1) and
    short prefills of few sequences over a wide block table take the split kernel; anything else
    (long prompts, batched prefills) the prefill kernel, whose grid is sized by `max_q_len` (T when
    not given). In a mixed step the first `num_decodes` sequences (q_len 1, rows 0..num_decodes-1)
    take the split kernel and the rest the prefill kernel: there each decode row would hold a
    64-query program for its whole context (in W2's mixed steps, ~80% of the prefill kernel's
    time). The choice and the split count depend on shapes only (B, T, max_q_len, table width).
    """
    _require_triton()
    T = q.shape[0]
    B = seq_lens.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    q = _last_dim_contiguous(q)
    if max_q_len is None and T == B:
        max_q_len = 1
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if max_q_len == 1:
        _split_k(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, 1, **scales)
        return out
    nd = num_decodes
    if nd:
        _split_k(q[:nd], k_cache, v_cache, block_tables[:nd], cu_seqlens_q[: nd + 1], seq_lens[:nd], scale,
                 out[:nd], 1, **scales)
    if max_q_len is not None and _use_split(q, k_cache, block_tables[nd:], max_q_len):
        rest = (block_tables[nd:], cu_seqlens_q[nd:], seq_lens[nd:])  # cu_seqlens keep their absolute rows
        if nd:  # fresh copies: sliced pointers' alignment would compile other kernel variants mid-serving
            rest = tuple(t.clone() for t in rest)
        _split_k(q, k_cache, v_cache, *rest, scale, out, max_q_len, **scales)
    else:
        _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out,
                 T if max_q_len is None else max_q_len, seq0=nd, **scales)
    return out


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))


def _scale_args(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                v_scale: torch.Tensor | None) -> tuple[tuple, bool]:
    """(the kernels' scale pointers and strides by block, slot and head, QUANT): an int8 cache's
    scales, or the caches as placeholders that QUANT off never reads."""
    if k_scale is None and v_scale is None and k_cache.dtype != torch.int8:
        return (k_cache, v_cache, 0, 0, 0), False
    if (k_cache.dtype != torch.int8 or v_cache.dtype != torch.int8 or k_scale is None or v_scale is None
            or k_scale.shape != k_cache.shape[:3] or k_scale.stride() != v_scale.stride()
            or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32):
        raise ValueError("an int8 KV cache [blocks, page, Hkv, D] needs float32 k_scale and v_scale "
                         "[blocks, page, Hkv] of the same strides (and scales need an int8 cache)")
    return (k_scale, v_scale, *k_scale.stride()), True


def _launch_pdl(device: torch.device, on: bool | None) -> dict:
    """The PDL launch kwargs: pdl.launch's by default, forced on or off for the bench's sweeps."""
    if on is None:
        return pdl.launch(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, max_q_len, *,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, seq0: int = 0,
             block_m: int | None = None, block_n: int | None = None, num_warps: int = 4,
             num_stages: int | None = None, use_pdl: bool | None = None) -> None:
    """The general kernel; the keyword knobs exist for bench/kernels_check.py's sweeps. Stages:
    3 over a 16-bit cache, 1 over an int8 one (the best of `kernels_check.py --prefill` on an
    H100 at W2's shapes: 8% and 15% faster than 2)."""
    _, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    wide = q.element_size() * D > 256  # fp32 with D 128: smaller tiles to fit shared memory
    block_m = block_m or (32 if wide else 64)
    block_n = block_n or (32 if wide else 64)
    grid = (triton.cdiv(max_q_len, block_m), seq_lens.shape[0] - seq0, Hq)
    scales, quant = _scale_args(k_cache, v_cache, k_scale, v_scale)
    num_stages = num_stages or (1 if quant else 2 if wide else 3)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, seq0, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), block_tables.stride(0), *scales,
        GROUP=Hq // Hkv, D=D, PAGE=k_cache.shape[1], IEEE=q.dtype == torch.float32, QUANT=quant,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D),
        num_warps=num_warps, num_stages=num_stages, **_launch_pdl(q.device, use_pdl),
    )


def _num_splits(batch: int, programs: int, max_context: int, block_n: int, sm_count: int) -> int:
    """Enough splits for ~2 programs per SM (`programs` per sequence and split), each with at
    least one kv tile at full context."""
    splits = 1
    most = min(64, max(1, max_context // block_n))
    while batch * programs * splits < 2 * sm_count and splits * 2 <= most:
        splits *= 2
    return splits


MERGE_ELEMENTS = 4096  # fp32 partial values a merge loads at once (rows x splits x head_dim)


def _merge_block(rows: int, block_d: int) -> int:
    """Splits a merge loads at once (`_merge_splits`): up to 16, within MERGE_ELEMENTS."""
    return max(1, min(16, MERGE_ELEMENTS // (rows * block_d)))


def _split_rows(group: int, max_q_len: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_H, chunks) of a split program: BLOCK_H query heads x BLOCK_Q queries, at
    least 16 rows (tensor-core dots) and, past that, at most 64; `chunks` programs per kv head."""
    block_q = triton.next_power_of_2(max_q_len)
    block_h = max(min(triton.next_power_of_2(group), max(1, 64 // block_q)), 16 // block_q)
    return block_q, block_h, triton.cdiv(group, block_h)


def _use_split(q, k_cache, block_tables, max_q_len: int) -> bool:
    """A short prefill takes the split kernel when its table is long enough to split and the
    batch too small to fill the GPU; batched prefills keep the prefill kernel."""
    if max_q_len > SHORT_Q_MAX:
        return False
    Hkv = k_cache.shape[2]
    _, _, chunks = _split_rows(q.shape[1] // Hkv, max_q_len)
    return _num_splits(block_tables.shape[0], Hkv * chunks, block_tables.shape[1] * k_cache.shape[1], 64,
                       _sm_count(q.device)) > 1


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The FOLD arrival counters: int32, all 0 between launches (each merger resets its own).
    One persistent buffer per device, grown (never freed: a captured graph may hold the old one)
    outside graph capture only, where its zeroing memset really runs. Shared by every launch on
    the device, which is safe while attention runs on one stream at a time (the engine's case)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("triton_attention: run this attention shape once outside CUDA-graph capture "
                               "first (its split counters must exist before capture)")
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _split_k(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, max_q_len, *,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, num_splits: int | None = None,
             fold: bool | None = None, use_pdl: bool | None = None, early: bool | None = None,
             block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
             pipe_codes: bool | None = None, cuda_cores: bool | None = None) -> None:
    """Split-K attention for decode (max_q_len 1) and short prefills; the keyword knobs exist
    for bench/kernels_check.py's sweeps (fold/use_pdl None: FOLD and pdl's defaults; early None:
    the kernel's EARLY with more than one split, when one wave of programs runs it and latency
    rules, not at one split, where many waves do and its registers would cost occupancy; tiles,
    stages and pipe_codes None: 64 keys, 4 warps and 2 stages, and an int8 cache's codes
    converted where they are loaded; for int8 decode 2 warps, 2 stages and the codes converted
    where the dots read them, so their loads pipeline: 4-17% faster at W2's 64-256 sequences on
    an H100, `kernels_check.py --w2 --int8` and `--pipe`). cuda_cores None: int8 decode of 16-bit
    queries without GQA takes `_decode_mha_kernel` (16 keys, 2 warps: 19-20% faster than the
    tensor-core kernel at W2's shapes, `kernels_check.py --cc`); fp32 queries keep the
    tensor-core kernel, whose fp32 path reads `dequantize_kv`'s values."""
    B = seq_lens.shape[0]
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    page = k_cache.shape[1]
    scales, quant = _scale_args(k_cache, v_cache, k_scale, v_scale)
    int8_decode = quant and max_q_len == 1
    if cuda_cores is None:
        cuda_cores = int8_decode and group == 1 and q.dtype != torch.float32 and D % 16 == 0
    if cuda_cores and (not int8_decode or group != 1 or D % 16):
        raise ValueError("the CUDA-core decode kernel takes int8 caches, one query per sequence, no GQA and "
                         "head_dim % 16 == 0")
    block_n = block_n or (16 if cuda_cores else 64)
    block_q, block_h, chunks = _split_rows(group, max_q_len)
    if num_splits is None:
        num_splits = _num_splits(B, Hkv * chunks, block_tables.shape[1] * page, block_n, _sm_count(q.device))
    fold = FOLD if fold is None else fold
    split = num_splits > 1
    early = split if early is None else early
    if split:
        mpart = torch.empty((T, Hq, num_splits), dtype=torch.float32, device=q.device)
        lpart = torch.empty_like(mpart)
        apart = torch.empty((T, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    else:
        mpart = lpart = apart = out  # unused with one split
    counters = _counters(q.device, B * Hkv * chunks) if split and fold else out
    block_d = triton.next_power_of_2(D)
    merge_h = 1 if cuda_cores else min(block_h, triton.next_power_of_2(group))  # the group's real heads
    block_s = _merge_block(merge_h * (1 if cuda_cores else block_q), block_d)
    launch = _launch_pdl(q.device, use_pdl)
    if cuda_cores:
        _decode_mha_kernel[(B, Hq, num_splits)](
            q, k_cache, v_cache, out, mpart, lpart, apart, counters,
            block_tables, cu_seqlens_q, seq_lens, scale * _LOG2E, num_splits, Hq,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *_cache_strides(k_cache, v_cache), block_tables.stride(0), *scales,
            D=D, PAGE=page, SPLIT=split, FOLD=fold, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=block_s,
            num_warps=num_warps or 2, **launch,
        )
    else:
        num_warps = num_warps or (2 if int8_decode else 4)
        pipe_codes = int8_decode if pipe_codes is None else pipe_codes
        _split_kernel[(B, Hkv * chunks, num_splits)](
            q, k_cache, v_cache, out, mpart, lpart, apart, counters,
            block_tables, cu_seqlens_q, seq_lens, scale * _LOG2E, num_splits, Hq,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *_cache_strides(k_cache, v_cache), block_tables.stride(0), *scales,
            GROUP=group, CHUNKS=chunks, D=D, PAGE=page, IEEE=q.dtype == torch.float32,
            QUANT=(2 if pipe_codes else 1) if quant else 0, SPLIT=split, FOLD=fold, EARLY=early, BLOCK_H=block_h,
            BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, MERGE_H=merge_h, BLOCK_S=block_s,
            num_warps=num_warps, num_stages=num_stages or 2, **launch,
        )
    if split and not fold:
        if cuda_cores:  # one row per program
            group = chunks = block_h = block_q = merge_h = 1
        _merge_kernel[(B, Hq if cuda_cores else Hkv * chunks)](
            out, mpart, lpart, apart, cu_seqlens_q, seq_lens, num_splits, Hq, out.stride(0), out.stride(1),
            GROUP=group, CHUNKS=chunks, D=D, BLOCK_H=block_h, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
            MERGE_H=merge_h, BLOCK_S=block_s, num_warps=4, **launch,
        )
