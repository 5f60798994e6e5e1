"""What it costs to bring image embeddings from the GPU to host memory of their own, per image.

The vision tier returns each image's embedding on the host (576 x 4096 bf16 = 4.7 MB for
LLaVA-1.5-7B). In a burst every image is new and still referenced, so no freed block can be
reused. Timed over 256 images: a fresh pinned tensor (the caching host allocator rounds up to
8 MB and the driver pins it), the same once cached, a synchronous copy into pageable memory,
and one reused pinned staging buffer followed by plain host copies (what the finisher does).

    python bench/host_copies.py     # on a CUDA machine; also try it under
    PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8
"""
from __future__ import annotations

import time

import torch

N, SHAPE = 256, (576, 4096)


def timed(name: str, fn) -> None:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - t0) / N * 1e3:.3f} ms/image", flush=True)
    del out


def main() -> None:
    src = [torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
    stage = torch.empty((32, *SHAPE), dtype=torch.bfloat16, pin_memory=True)

    def pinned(copy: bool):
        hold = []
        for i in range(N):
            hold.append(torch.empty(SHAPE, dtype=torch.bfloat16, pin_memory=True))
            if copy:
                hold[-1].copy_(src[i % 32], non_blocking=True)
        torch.cuda.synchronize()
        return hold

    def staged():
        hold = []
        for _ in range(N // 32):
            for j in range(32):
                stage[j].copy_(src[j], non_blocking=True)
            torch.cuda.synchronize()
            hold += [torch.empty(SHAPE, dtype=torch.bfloat16).copy_(stage[j]) for j in range(32)]
        return hold

    print(torch.cuda.get_device_name())
    timed("fresh pinned tensor, allocation only", lambda: pinned(False))
    timed("pinned tensor from the cache, allocation only", lambda: pinned(False))
    timed("pinned tensor from the cache + copy", lambda: pinned(True))
    timed("synchronous copy into pageable memory", lambda: [src[i % 32].to("cpu") for i in range(N)])
    timed("pinned staging buffer + host copy", staged)


if __name__ == "__main__":
    main()
