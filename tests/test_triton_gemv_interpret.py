"""The gated GEMV (SiLU * up in the gate_up projection's epilogue) in Triton's CPU interpreter
(fp32: its bf16/fp16 dots are unreliable) against silu_and_mul of the plain GEMV: the same bits
for one row of x (the tl.sum path) and 2..8 rows (tl.dot), with and without a bias, with N not a
multiple of the rows a program owns and K not a multiple of the K slice; and Llama's MLP, which
takes it for <= 8 rows, gives the bits of its unfused path.

One caveat of the interpreter: its tl.dot is numpy's matmul, whose sum for an output column
depends on where in the tile the column sits, and the gated kernel moves rows (up row j sits
where gate row j does, not at I + j). So for 2..8 rows the plain GEMV is run on the rows at the
fused kernel's positions (`_plain_at`): the same slices, sums and roundings. A GPU's dots
(tensor-core MMA for 16-bit, FMA chains for fp32) and the one-row tl.sum give a column's sum
independently of its position; tests/gpu/test_fused_kernels.py checks the fused kernel there
against the plain layout, bf16 and fp32. An intermediate size that is a multiple of 32 (the
positions agree) is checked against the plain layout here too.

The interpreter is chosen when triton is imported, so the checks run in a child process with
TRITON_INTERPRET=1 (this file run as a script).
"""
from __future__ import annotations

import sys

import torch

from tests.interpreter import needs_triton, run_script


@needs_triton
def test_gated_gemv_in_the_interpreter():
    run_script(__file__)


def _report(name: str, ok: bool) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def _plain_at(x, w, b, first, second):
    """The plain GEMV's output with every row summed at the tile position the fused kernel gives it:
    rows first[i] and second[i] (gate and up) both at position i."""
    from llm_service.layers.triton_gemv import gemv

    y = torch.empty(x.shape[0], w.shape[0])
    for rows in (first, second):
        y[:, rows] = gemv(x, w[rows], None if b is None else b[rows])
    return y


def _gated(gen) -> list[bool]:
    import torch.nn.functional as F

    from llm_service.layers.triton_fused import silu_and_mul
    from llm_service.layers.triton_gemv import gemv

    oks = []
    K = 1100  # one row: 8 rows a program, 1024-wide slices; 2..8 rows: 32 rows a program, 128-wide slices
    for inter, rows in ((37, 1), (37, 2), (37, 5), (37, 8), (64, 3)):
        w = torch.randn(2 * inter, K, generator=gen) * K**-0.5
        b = torch.randn(2 * inter, generator=gen)
        x = torch.randn(rows, K, generator=gen)
        gate_rows = torch.arange(inter)
        for bias in (None, b):
            got = gemv(x, w, bias, gated=True)
            at_plain_positions = rows == 1 or inter % 32 == 0
            plain = gemv(x, w, bias) if at_plain_positions else _plain_at(x, w, bias, gate_rows, gate_rows + inter)
            gate, up = F.linear(x.double(), w.double(), None if bias is None else bias.double()).chunk(2, dim=-1)
            close = torch.allclose(got.double(), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
            ok = torch.equal(got, silu_and_mul(plain)) and close and got.shape == (rows, inter)
            oks.append(_report(f"gated gemv rows={rows} I={inter} bias={bias is not None}: "
                               "bits of silu_and_mul(gemv)", ok))
    return oks


def _llama_mlp(gen) -> list[bool]:
    """LlamaMLP with kernels on: <= 8 rows take the gated GEMV and give the bits of the unfused
    launches (intermediate 64: the interpreter's positions agree)."""
    from llm_service.models.llama import LlamaArgs, LlamaMLP

    a = LlamaArgs(vocab_size=8, hidden_size=48, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=64, rope={"rope_theta": 10000.0},
                  mlp_bias=True)
    mlp = LlamaMLP(a)
    for p in mlp.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    assert all(m.use_kernels() for m in mlp.modules() if hasattr(m, "use_kernels"))
    oks = []
    for rows in (1, 3):
        x = torch.randn(rows, a.hidden_size, generator=gen)
        same = torch.equal(mlp(x), mlp.down_proj(mlp.act(mlp.gate_up_proj(x))))
        oks.append(_report(f"LlamaMLP, {rows} rows: the gated GEMV, bits of the unfused path", same))
    return oks


def _main() -> int:
    gen = torch.Generator().manual_seed(0)
    oks = _gated(gen) + _llama_mlp(gen)
    if all(oks):
        print("all ok")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(_main())
