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
- the state entering chunk c is the true end state of chunk c - 1. The end states follow the same recurrence one
  level up, E_c = exp(T_c) E_{c-1} + e_c, with T_c the chunk's total of a and e_c its zero-state end value; that
  recurrence is solved the same way, in groups of ``CHUNK`` chunks, and the state entering each group from the dense
  (G x G) form sum_{g' < g} exp(P_{g-1} - P_{g'}) e'_{g'} over the G groups. P grows with L, so the sums above the
  first level are accumulated in float64: a float32 difference of two large sums would lose the small exponents
  that matter;
- x_t = (zero-state value) + exp(S_t) E_{c-1}.

Costs CHUNK multiply-adds per state instead of one, and memory for one (CHUNK x CHUNK) matrix per chunk, one per
group of chunks and one (G x G) matrix, G = L / CHUNK**2: linear in L up to very long rows (a 1024x1024 image's first
stage has L = 65536 and G = 66; a single level of chunks had a (2050 x 2050) float64 matrix per channel there).
"""

from __future__ import annotations

from typing import Tuple

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


def _chunks(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """x (..., L) zero-padded to (..., count, CHUNK), and count. At least one padded position and two chunks for
    every L: a pad of zero or a single chunk would be special cases (size 0 or 1) that an exported graph with a
    symbolic L would have to guard against."""
    length = x.shape[-1]
    count = length // CHUNK + 2
    return F.pad(x, (0, count * CHUNK - length)).reshape(*x.shape[:-1], count, CHUNK), count


def _zero_state_chunks(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per chunk of (..., count, CHUNK) log-decays a and inputs b: (the states from a zero state at each chunk's
    start, the cumulative sums S of a inside each chunk)."""
    within = a.cumsum(-1)
    local = torch.einsum("...ts,...s->...t", _exp_lower(within[..., :, None] - within[..., None, :], dtype), b)
    return local, within


def _end_states(totals: torch.Tensor, ends: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The true end state of every chunk, E_c = exp(T_c) E_{c-1} + e_c from E_{-1} = 0, for chunk totals T and
    zero-state end values e (..., C): the same recurrence, solved in groups of CHUNK chunks (in float64, see above)."""
    length = totals.shape[-1]
    a, count = _chunks(totals.to(torch.float64))
    b, _ = _chunks(ends.to(torch.float64))
    local, within = _zero_state_chunks(a, b, torch.float64)
    group_totals = within[..., -1].cumsum(-1)  # P_g
    # The state entering group g: row g - 1 of the dense lower form, shifted down one row with a zero state entering
    # group 0.
    group_ends = torch.einsum(
        "...ts,...s->...t",
        _exp_lower(group_totals[..., :, None] - group_totals[..., None, :], torch.float64),
        local[..., -1],
    )
    carry = F.pad(group_ends, (1, 0))[..., :count]
    states = local + within.exp() * carry[..., None]
    return states.reshape(*totals.shape[:-1], count * CHUNK)[..., :length].to(dtype)


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
    # (Bt, Dn, N, C, K): log-decays a_t and inputs b_t in chunks; padded positions have a = b = 0.
    a, count = _chunks(dt[:, :, None, :] * A.to(dtype)[None, :, :, None])
    b, _ = _chunks((dt * u.to(dtype))[:, :, None, :] * B.to(dtype)[:, None])
    local, within = _zero_state_chunks(a, b, dtype)
    # The state entering chunk c is chunk c - 1's true end state; zero enters chunk 0.
    carry = F.pad(_end_states(within[..., -1], local[..., -1], dtype), (1, 0))[..., :count]
    hs = local + within.exp() * carry[..., None]
    return hs.reshape(batch, channels, states, count * CHUNK)[..., :length]
