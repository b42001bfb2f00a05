#!/usr/bin/env python3
"""torch_gemm: bf16 TFLOP/s of torch.matmul at the shapes of bench_cuda_gemm, for comparison.

Prints the same rows as build/.../bench/bench_cuda_gemm (M, K, N, op, ms, TFLOP/s) for the three
linear GEMMs of each shape, with x [M, K], W [N, K], dy [M, N] in bf16:
    forward          y  = x @ W.T
    backward_input   dx = dy @ W
    backward_weight  dW = dy.T @ x
torch.matmul of bf16 tensors accumulates in fp32 and writes bf16 (dsx writes f32 outputs and
accumulates dW; at these sizes the GEMMs are compute bound, so the output width barely matters).
Times are the median of --reps calls measured with CUDA events after 5 warm-up calls.
TF32 is irrelevant here (bf16 inputs); torch's own cuBLAS/cuBLASLt choice is what is measured.

usage: python3 tools/bench/torch_gemm.py [--quick] [--reps N]
Exits 0 with a skip message where torch or a CUDA device is missing.
"""
import argparse
import statistics
import sys

FULL_SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 7168, 18432),
               (4096, 7168, 1536), (4096, 1536, 24576), (8192, 8192, 8192)]
QUICK_SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168)]


def median_ms(torch, call, reps):
    for _ in range(5):
        call()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, 20 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per GEMM (default 30)")
    args = parser.parse_args()
    reps = args.reps if args.reps is not None else (20 if args.quick else 30)
    if reps < 1:
        parser.error("--reps must be positive")
    try:
        import torch
    except ImportError:
        print("torch_gemm: SKIPPED: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("torch_gemm: SKIPPED: no CUDA device visible to torch")
        return 0

    device = torch.device("cuda", 0)
    print(f"torch_gemm on {torch.cuda.get_device_name(device)}: torch {torch.__version__}, "
          f"bf16 operands and outputs (fp32 accumulation)")
    print(f"median of {reps} timed calls each (CUDA events), after 5 warm-up calls\n")
    print("|     M |     K |     N | op              | torch ms | TFLOP/s |")
    print("|------:|------:|------:|-----------------|---------:|--------:|")
    generator = torch.Generator(device=device).manual_seed(0)
    for m, k, n in (QUICK_SHAPES if args.quick else FULL_SHAPES):
        def rand(rows, cols):
            return (torch.rand(rows, cols, device=device, generator=generator) * 2 - 1).to(torch.bfloat16)
        x, w, dy = rand(m, k), rand(n, k), rand(m, n)
        flops = 2.0 * m * k * n
        calls = [("forward", lambda: torch.matmul(x, w.t())),
                 ("backward_input", lambda: torch.matmul(dy, w)),
                 ("backward_weight", lambda: torch.matmul(dy.t(), x))]
        for name, call in calls:
            ms = median_ms(torch, call, reps)
            print(f"| {m:5d} | {k:5d} | {n:5d} | {name:<15s} | {ms:8.3f} | {flops / (ms * 1e-3) * 1e-12:7.1f} |")
        del x, w, dy
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
