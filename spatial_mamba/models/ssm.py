"""The token mixer: a raster-order selective scan whose hidden states are fused with dilated depthwise
convolutions before the observation step (the paper's eqs. for x_t, h_t and y_t;
``classification/models/spatialmamba.py`` in the official repository)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import fused_observation, selective_scan_fn, state_fusion
from ..ops.state_fusion import PATHS

__all__ = ["StateFusion", "StructureAwareSSM", "dt_bias_init"]


def dt_bias_init(
    d_inner: int,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The initial ``dt_projs_bias`` of a mixer with ``d_inner`` channels: a float32 CPU tensor (d_inner,).

    dt is log-uniform in [dt_min, dt_max], raised to at least ``dt_init_floor``, and the bias is its inverse softplus,
    so that softplus(bias) == dt (the ``dt_projs_bias`` initialisation of ``classification/models/spatialmamba.py``
    in the official repository, which is Mamba's). The draw is one ``torch.rand(d_inner)`` from ``generator``
    (default: torch's global generator), so the model's initialisation follows ``torch.manual_seed``.
    """
    if isinstance(d_inner, bool) or not isinstance(d_inner, int) or d_inner < 1:
        raise ValueError(f"dt_bias_init: d_inner must be a positive integer, got {d_inner!r}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_bias_init: expected 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(d_inner, generator=generator) * (log_max - log_min) + log_min)
    dt = dt.clamp(min=dt_init_floor)
    # softplus^-1(dt) = log(exp(dt) - 1), written so that it stays accurate for small dt.
    return dt + torch.log(-torch.expm1(-dt))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half types, as the official kernels require; float64 stays float64 (tests, double models)."""
    return t if t.dtype == torch.float64 else t.float()


def _silu_temporary(t: torch.Tensor) -> torch.Tensor:
    """SiLU of a temporary of the mixer (a convolution's output, half of in_proj's output), in place when autograd is
    off: on the CPU, allocating one more tensor of the mixer's width costs more than the SiLU itself. (Grad mode, not
    ``t.requires_grad``, decides: it is known when torch.fx traces the model.)"""
    return F.silu(t, inplace=not torch.is_grad_enabled())


class StateFusion(nn.Module):
    """Structure-aware state fusion h_t = sum_k alpha_k x_{rho_k(t)}: three 3x3 depthwise kernels at dilations 1, 3, 5.

    ``path`` picks how the op computes this one function (``spatial_mamba.ops.state_fusion``): ``"auto"`` (the
    25-tap op, one pass over the states, in training and evaluation), ``"branches"`` (the official training path,
    which the FLOP count measures) or ``"merged"`` (the official evaluation path). It is not a state-dict entry.
    """

    def __init__(self, dim: int, path: str = "auto"):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"StateFusion: path must be one of {', '.join(PATHS)}; got {path!r}")
        self.path = path
        # All-ones initialisation, as in the official code (docs/official_bugs.md, #7).
        self.kernel_3 = nn.Parameter(torch.ones(dim, 1, 3, 3))
        self.kernel_3_1 = nn.Parameter(torch.ones(dim, 1, 3, 3))
        self.kernel_3_2 = nn.Parameter(torch.ones(dim, 1, 3, 3))
        self.alpha = nn.Parameter(torch.ones(3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fuse(h, self.kernel_3, self.kernel_3_1, self.kernel_3_2, self.alpha, self.path)

    @staticmethod
    def fuse(h: torch.Tensor, kernel_3, kernel_3_1, kernel_3_2, alpha, path: str) -> torch.Tensor:
        """The fusion of ``h`` (B, C·N, H, W) with the given (C, 1, 3, 3) kernels and alpha: with d_state N > 1 every
        state map of a channel shares that channel's kernels."""
        kernels = (kernel_3, kernel_3_1, kernel_3_2)
        repeats = h.shape[1] // kernel_3.shape[0]
        if repeats > 1:
            kernels = tuple(k.repeat_interleave(repeats, dim=0) for k in kernels)
        return state_fusion(h, *kernels, alpha, path=path)

    def fuses_observation(self) -> bool:
        """Whether the mixer may run this fusion together with its observation step (``observe``): on the taps path,
        and only while no hook watches this module, since the fused op never calls it."""
        return self.path in ("auto", "taps") and not (self._forward_hooks or self._forward_pre_hooks)

    def observe(self, h: torch.Tensor, C: torch.Tensor, u: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """y = fusion(h)·C + D·u for d_state N = 1 (the paper's eq. for y_t), in one op: h and u (B, D, H, W), C
        (B, H, W), D (D,); returns h's dtype (``spatial_mamba.ops.fused_observation``)."""
        return fused_observation(h, self.kernel_3, self.kernel_3_1, self.kernel_3_2, self.alpha, C, u, D)


class StructureAwareSSM(nn.Module):
    """Mamba-style mixer with a 3x3 depthwise conv, a single raster scan and state fusion; input/output (B, h, w, C).

    Parameter names and shapes follow the official checkpoints (VMamba's SS2D naming).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        d_conv: int = 3,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dt_init not in ("random", "constant", "simple", "zero"):
            raise ValueError(f"dt_init must be 'random', 'constant', 'simple' or 'zero', got {dt_init!r}")
        d_inner = int(expand * d_model)
        dt_rank = math.ceil(d_model / 16)  # from the block width C, not d_inner (docs/official_bugs.md, #6)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)

        # Rows [dt (R) ; B (N) ; C (N)], initialised like nn.Linear(d_inner, R + 2N) (the official ``x_proj``).
        x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.x_proj_weight = nn.Parameter(x_proj.weight.detach().clone())
        self.dt_projs_weight = nn.Parameter(self._dt_weight_init(dt_rank, d_inner, dt_init, dt_scale))
        self.dt_projs_bias = nn.Parameter(dt_bias_init(d_inner, dt_min, dt_max, dt_init_floor))
        if dt_init in ("simple", "zero"):  # official: these two replace the bias too, with the same law as the weight
            self.dt_projs_bias.data = 0.1 * (torch.randn if dt_init == "simple" else torch.rand)(d_inner)
        # S4D-real init log(1..N); the official branch condition makes this the only init (docs/official_bugs.md, #8).
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(d_inner))

        self.state_fusion = StateFusion(d_inner)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @staticmethod
    def _dt_weight_init(dt_rank: int, d_inner: int, dt_init: str, dt_scale: float) -> torch.Tensor:
        std = dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            return torch.full((d_inner, dt_rank), std)
        if dt_init == "simple":  # official: 0.1 * N(0, 1)
            return 0.1 * torch.randn(d_inner, dt_rank)
        if dt_init == "zero":  # official (despite the name): 0.1 * U[0, 1)
            return 0.1 * torch.rand(d_inner, dt_rank)
        return torch.empty(d_inner, dt_rank).uniform_(-std, std)

    # Recompute the mixer in the backward pass instead of keeping its intermediates (see ``forward``); the model's
    # ``set_mixer_recompute`` and its ``recompute_mixer`` argument switch it for every block.
    recompute: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            # The backward recomputes the mixer from its input rather than keeping its intermediates, the size of 14
            # (B, L, d_inner) float tensors (in_proj's output, twice that width; the convolution's input and output;
            # u in two layouts; Δ before and after the softplus; the scan and fused states; the observation before
            # and after the norm; silu(z); out_proj's input). Only x, half of one, is kept: this halves the training
            # memory of the model (benchmarks/memory.py).
            out = checkpoint(self._mix, x, use_reentrant=False)
        else:
            out = self._mix(x)
        if self.dropout is not None:
            out = self.dropout(out)
        return out

    def _scan_inputs(self, x: torch.Tensor):
        """The scan's inputs from the in_proj half x (B, h, w, D): u and Δ (B, D, L) contiguous (the layout of the GPU
        kernels), B and C (B, N, L). The depthwise convolution runs on a contiguous (B, D, h, w) copy of x."""
        batch, height, width, d_inner = x.shape
        x = _silu_temporary(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        u = x.view(batch, d_inner, height * width)  # row-major flatten: the raster scan order t = row * w + col
        # (R + 2N, D) @ (B, D, L) and (D, R) @ (B, R, L): batched matmuls that read u and dts in place.
        x_dbl = torch.matmul(self.x_proj_weight.to(u.dtype), u)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dts = torch.matmul(self.dt_projs_weight.to(dts.dtype), dts)
        return u, dts, Bs, Cs

    def _scan_inputs_token_major(self, x: torch.Tensor):
        """``_scan_inputs`` for the CPU, where the compiled kernels take the blocks' token layout: u and Δ (B, D, L)
        are views of (B, L, D) memory, and nothing is transposed on either side of the scan and the fusion (oneDNN's
        depthwise convolution is also fastest on the channels-last view, and keeps it)."""
        batch, height, width, d_inner = x.shape
        x = _silu_temporary(self.conv2d(x.permute(0, 3, 1, 2)))
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, d_inner)  # raster order t = row * w + col
        x_dbl = F.linear(tokens, self.x_proj_weight.to(tokens.dtype))  # (B, L, R + 2N)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dts = F.linear(dts, self.dt_projs_weight.to(dts.dtype))  # (B, L, D)
        return tokens.transpose(1, 2), dts.transpose(1, 2), Bs.transpose(1, 2), Cs.transpose(1, 2)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, h, w, C): in_proj, the scan and the fusion, the gated observation, out_proj."""
        xz = self.in_proj(x)
        batch, height, width, _ = xz.shape
        length, d_inner, d_state = height * width, self.d_inner, self.d_state
        x, z = xz.chunk(2, dim=-1)

        if x.device.type == "cpu":
            u, dts, Bs, Cs = self._scan_inputs_token_major(x)
        else:
            u, dts, Bs, Cs = self._scan_inputs(x)

        A = -torch.exp(_at_least_fp32(self.A_logs))
        hs = selective_scan_fn(
            u,
            dts.to(u.dtype),
            A,
            Bs.to(u.dtype).contiguous(),
            delta_bias=_at_least_fp32(self.dt_projs_bias),
            delta_softplus=True,
        )  # (B, D, N, L) float32 hidden states x_t

        # Observation y_t = C_t h_t + D u_t, with D applied here and not in the scan (docs/official_bugs.md, #5).
        if d_state == 1 and self.state_fusion.fuses_observation():
            # One op: a kernel backend reads the states and u once and never writes the fused states.
            plane = (batch, d_inner, height, width)
            y = self.state_fusion.observe(
                hs.reshape(plane), Cs.reshape(batch, height, width), u.reshape(plane), self.Ds
            )
            y = y.reshape(batch, d_inner, length)
        else:
            hf = self.state_fusion(hs.reshape(batch, d_inner * d_state, height, width))
            hf = hf.reshape(batch, d_inner, d_state, length)
            if d_state == 1:
                y = hf[:, :, 0] * Cs + u * self.Ds[:, None]
            else:
                y = torch.einsum("bdnl,bnl->bdl", hf, Cs.to(hf.dtype)) + u * self.Ds[:, None]

        y = self.out_norm(y.transpose(1, 2).reshape(batch, height, width, d_inner))
        if torch.is_grad_enabled():
            return self.out_proj(y * F.silu(z))
        return self.out_proj(y.mul_(_silu_temporary(z)))  # the norm's output is a temporary too
