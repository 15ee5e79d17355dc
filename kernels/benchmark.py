"""Times the CUDA kernels against their bandwidth floor and against the PyTorch baseline; prints a table.

    SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace && python kernels/benchmark.py

Needs a CUDA GPU and the built extensions. The ceiling is measured, not taken from a datasheet: a large
device-to-device copy, counting the bytes read and written. Each kernel's floor counts each input read once and each
output written once; "of copy" is floor bytes / time / copy bandwidth. Targets (kernels/README.md): the scan forward
>= 80% and backward >= 60% of the bandwidth at Bt = 128, D = 128, L = 3136 in bf16; the depthwise convolution at
least 2x faster than F.pad(replicate) + F.conv2d at B = 128, C = 128, 56x56.
"""

import argparse

import torch
import torch.nn.functional as F

from spatial_mamba.ops import backend


def cuda_time_ms(fn, warmup=3, iters=20) -> float:
    """Median time of ``fn()`` in milliseconds, from CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (cuda_time_ms(lambda: dst.copy_(src)) * 1e-3)


def report(name, ms, floor_bytes, bandwidth, baseline_ms=None):
    line = f"{name:<44} {ms * 1e3:9.1f} us  {floor_bytes / (ms * 1e-3) / 1e9:7.0f} GB/s  "
    line += f"{floor_bytes / (ms * 1e-3) / bandwidth:5.0%} of copy"
    if baseline_ms is not None:
        line += f"  {baseline_ms / ms:5.2f}x vs PyTorch ({baseline_ms * 1e3:.1f} us)"
    print(line)


def bench_scan(batch, dim, length, dtype, bandwidth):
    ops = torch.ops.spatial_mamba
    u = torch.randn(batch, dim, length, device="cuda").to(dtype)
    delta = (torch.randn(batch, dim, length, device="cuda") - 3).to(dtype)
    A = -torch.rand(dim, 1, device="cuda") - 0.5
    B = torch.randn(batch, 1, length, device="cuda").to(dtype)
    bias = torch.rand(dim, device="cuda") * 0.1
    hs = ops.selective_scan_cuda_fwd(u, delta, A, B, bias, True)
    dhs = torch.randn_like(hs)
    size, elems = u.element_size(), u.numel()
    fwd_bytes = elems * (2 * size + 4) + B.numel() * size
    bwd_bytes = elems * (2 * size + 8 + 2 * size) + 2 * B.numel() * size
    tag = f"B={batch} D={dim} L={length} {str(dtype)[6:]}"
    report(
        f"scan fwd {tag}",
        cuda_time_ms(lambda: ops.selective_scan_cuda_fwd(u, delta, A, B, bias, True)),
        fwd_bytes,
        bandwidth,
    )
    report(
        f"scan bwd {tag}",
        cuda_time_ms(lambda: ops.selective_scan_cuda_bwd(u, delta, A, B, bias, True, hs, dhs)),
        bwd_bytes,
        bandwidth,
    )


def bench_dwconv(batch, channels, size, kernel_size, dilation, dtype, bandwidth):
    ops = torch.ops.spatial_mamba
    x = torch.randn(batch, channels, size, size, device="cuda").to(dtype)
    w = torch.randn(channels, 1, kernel_size, kernel_size, device="cuda").to(dtype)
    dy = torch.randn_like(x)
    pad = dilation * (kernel_size // 2)

    def reference():
        return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), w, dilation=dilation, groups=channels)

    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    y_ref = F.conv2d(F.pad(x_ref, (pad,) * 4, mode="replicate"), w_ref, dilation=dilation, groups=channels)

    def reference_backward():
        return torch.autograd.grad(y_ref, (x_ref, w_ref), dy, retain_graph=True)

    two_planes = 2 * x.numel() * x.element_size()
    tag = f"B={batch} C={channels} {size}x{size} k={kernel_size} d={dilation} {str(dtype)[6:]}"
    report(
        f"dwconv fwd {tag}",
        cuda_time_ms(lambda: ops.dwconv2d_cuda_fwd(x, w, dilation)),
        two_planes,
        bandwidth,
        cuda_time_ms(reference),
    )
    dgrad = cuda_time_ms(lambda: ops.dwconv2d_cuda_dgrad(dy, w, dilation))
    wgrad = cuda_time_ms(lambda: ops.dwconv2d_cuda_wgrad(dy, x, kernel_size, dilation))
    report(f"dwconv dgrad+wgrad {tag}", dgrad + wgrad, 2 * two_planes, bandwidth, cuda_time_ms(reference_backward))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    for op in ("selective_scan", "dwconv2d"):
        ok, why = backend._REGISTRY[op]["cuda"].available()
        if not ok or not torch.cuda.is_available():
            raise SystemExit(f"{op}: the cuda backend cannot run here ({why}; GPU: {torch.cuda.is_available()})")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e9:.0f} GB/s (read + write)")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        bench_scan(args.batch, 128, 3136, dtype, bandwidth)
    for dim, length in ((256, 784), (512, 196), (1024, 49)):
        bench_scan(args.batch, dim, length, torch.bfloat16, bandwidth)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for kernel_size, dilation in ((3, 1), (3, 3), (3, 5), (11, 1)):
            bench_dwconv(args.batch, 128, 56, kernel_size, dilation, dtype, bandwidth)


if __name__ == "__main__":
    main()
