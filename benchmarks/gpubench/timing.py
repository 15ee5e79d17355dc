"""The one timer of the benchmark, and the steps it times."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, List, Sequence

import torch


def time_ms(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> Dict[str, float]:
    """Runs ``fn`` ``warmup`` times, then times ``iters`` calls one by one: CUDA events on a GPU, the wall clock on
    the CPU. Returns the median and minimum in ms."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "iters": iters, "warmup": warmup}


def leaves(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Detached copies of ``tensors`` that require gradients."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def pass_step(
    direction: str, call: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad: torch.Tensor
) -> Callable[[], List[torch.Tensor]]:
    """The step that the benchmark times for one pass of ``call(*inputs)``.

    ``"forward"``: the call without autograd; the step returns [output]. ``"backward"``: ``torch.autograd.grad`` of
    one forward, run here and retained, with respect to every input, ``grad`` being the output's gradient; the step
    returns the gradients.
    """
    if direction == "forward":

        def forward() -> List[torch.Tensor]:
            with torch.no_grad():
                return [call(*inputs)]

        return forward
    if direction != "backward":
        raise ValueError(f"pass_step: direction must be 'forward' or 'backward', got {direction!r}")
    tensors = leaves(inputs)
    out = call(*tensors)
    return lambda: list(torch.autograd.grad(out, tensors, grad, retain_graph=True))
