"""The selective scan as a fixed graph of tensor operations, for ``torch.export``, ONNX and TorchScript tracing.

The reference scan loops in Python over chunks whose size depends on the sequence length L, and branches on the data
(softplus threshold), so it cannot be exported with a symbolic L (dynamic image size). This formulation has no
data-dependent control flow and no loop at all; its graph is the same for every L.

With a_t = Δ_t A (<= 0) and b_t = Δ_t B_t u_t, the recurrence x_t = exp(a_t) x_{t-1} + b_t, x_{-1} = 0, is solved
in chunks of a fixed ``CHUNK`` positions (L is zero-padded up to a multiple; the padding comes after the last real
position, so it changes nothing before it):

- inside a chunk, from a zero state: x_t = sum_{s <= t} exp(S_t - S_s) b_s, with S the cumulative sum of a inside
  the chunk. The (CHUNK x CHUNK) decay matrix has exponents S_t - S_s <= 0 where s <= t and -inf elsewhere, so
  every factor lies in [0, 1];
- the state entering chunk c is h_c = sum_{c' < c} exp(P_{c-1} - P_{c'}) e_{c'}, where e is each chunk's
  zero-state end value and P the cumulative sum of the chunk totals of a. P grows with L, so it is accumulated in
  float64: a float32 difference of two large sums would lose the small exponents that matter;
- x_t = (zero-state value) + exp(S_t) h_c.

Costs CHUNK multiply-adds per state instead of one, and memory for one (CHUNK x CHUNK) matrix per chunk and one
(C x C) matrix of chunk carries: fine for inference at image sizes, which is all it is used for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CHUNK", "selective_scan_export"]

CHUNK = 32

# The official softplus switches to the identity above 20 (classification/models/spatialmamba.py kernels).
_SOFTPLUS_THRESHOLD = 20.0


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log1p(exp(x)) for x <= 20, x above; branch-free (the exponent is clamped so the unused side stays finite)."""
    return torch.where(x > _SOFTPLUS_THRESHOLD, x, torch.log1p(torch.exp(x.clamp(max=_SOFTPLUS_THRESHOLD))))


def _exp_lower(diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(diff[..., t, s]) where s <= t, 0 elsewhere, for a (..., K, K) matrix of exponents."""
    k = diff.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=diff.device).triu(1)
    return diff.to(dtype).masked_fill(upper, float("-inf")).exp()


def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """Hidden states x_t of the scan, (Bt, Dn, N, L); the backend signature of ``selective_scan_fn``.

    u, delta: (Bt, Dn, L); A: (Dn, N); B: (Bt, N, L); delta_bias: (Dn,) or None. Computes in float32 (float64 when
    any input is float64) and returns that dtype.
    """
    dtype = (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (u, delta, A, B)) else torch.float32
    )
    batch, channels, length = u.shape
    states = A.shape[1]
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = _softplus(dt)
    # At least one padded position and two chunks for every L: a pad of zero or a single chunk would be special
    # cases (size 0 or 1) that an exported graph with a symbolic L would have to guard against.
    count = length // CHUNK + 2
    pad = count * CHUNK - length

    # (Bt, Dn, N, C, K): log-decays a_t and inputs b_t in chunks; padded positions have a = b = 0.
    a = F.pad(dt[:, :, None, :] * A.to(dtype)[None, :, :, None], (0, pad)).reshape(
        batch, channels, states, count, CHUNK
    )
    b = F.pad((dt * u.to(dtype))[:, :, None, :] * B.to(dtype)[:, None], (0, pad))
    b = b.reshape(batch, channels, states, count, CHUNK)

    within = a.cumsum(-1)  # S_t inside each chunk
    local = torch.einsum("...ts,...s->...t", _exp_lower(within[..., :, None] - within[..., None, :], dtype), b)

    totals = within[..., -1].to(torch.float64).cumsum(-1)  # P_c, (Bt, Dn, N, C)
    # carry into chunk c: sum over c' <= c - 1 of exp(P_{c-1} - P_{c'}) e_{c'}; row c of the lower matrix is chunk
    # c - 1's sum, so the rows are shifted down by one with a zero state entering chunk 0.
    ends = torch.einsum(
        "...ts,...s->...t", _exp_lower(totals[..., :, None] - totals[..., None, :], dtype), local[..., -1]
    )
    carry = F.pad(ends, (1, 0))[..., :count]
    hs = local + within.exp() * carry[..., None]
    return hs.reshape(batch, channels, states, count * CHUNK)[..., :length]
