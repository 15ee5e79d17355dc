"""Triton kernels of the hidden-state selective scan for d_state N = 1 (paper Eq. 2-3; the official
``kernels/selective_scan/``).

Imported by ``triton_scan.py`` on first use, so that importing spatial_mamba does not need Triton.

Each program owns one batch element and BLOCK_D channels, and walks the sequence in chunks of BLOCK_L positions:
inside a chunk the recurrence x_t = a_t x_{t-1} + b_t is a ``tl.associative_scan`` over the pairs (a_t, b_t), and the
state at the chunk's end is carried into the next chunk. The backward pass is the same scan run from the end.
"""

import triton
import triton.language as tl


@triton.jit
def _affine_combine(decay_first, value_first, decay_second, value_second):
    # Composes x -> decay_first * x + value_first with x -> decay_second * x + value_second (first applied first).
    return decay_first * decay_second, decay_second * value_first + value_second


@triton.jit
def _softplus(v):
    # The official softplus: log1p(exp(v)) for v <= 20, v otherwise. Triton has no log1p: log(w) * e / (w - 1) with
    # w = 1 + e is accurate to rounding for small e too (Goldberg's trick), and log1p(e) = e where w rounds to 1.
    e = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + e
    w_minus_1 = w - 1.0
    exact = w_minus_1 == 0.0
    log1p_e = tl.where(exact, e, tl.log(w) * e / tl.where(exact, 1.0, w_minus_1))
    return tl.where(v <= 20.0, log1p_e, v)


@triton.jit
def _softplus_grad(v):
    # Derivative of _softplus: sigmoid(v) on the log1p branch, exactly 1 on the identity branch.
    return tl.where(v <= 20.0, tl.sigmoid(v), 1.0)


@triton.jit
def _delta_pre_activation(delta_ptr, offsets, mask, bias):
    return tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + bias[:, None]


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    delta_bias_ptr,
    hs_ptr,
    n_channels,
    length,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    first_channel = tl.program_id(1) * BLOCK_D
    channels = first_channel + tl.arange(0, BLOCK_D)
    channel_mask = channels < n_channels
    # The block's offset (batch * channels * length may pass 2**31) moves the base pointers once, in int64; the
    # offsets inside the block stay int32, which keeps the per-element addresses cheap.
    block = (batch * n_channels + first_channel) * length
    u_ptr += block
    delta_ptr += block
    hs_ptr += block
    B_ptr += batch * length
    rows = tl.arange(0, BLOCK_D) * length
    A = tl.load(A_ptr + channels, mask=channel_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + channels, mask=channel_mask, other=0.0)
    state = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, length, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        position_mask = positions < length
        mask = channel_mask[:, None] & position_mask[None, :]
        offsets = rows[:, None] + positions[None, :]
        u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dt = _delta_pre_activation(delta_ptr, offsets, mask, bias)
        if DELTA_SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(B_ptr + positions, mask=position_mask, other=0.0).to(tl.float32)
        # Masked entries get the identity pair (1, 0) (u is loaded as 0 there), so the chunk's last column is the
        # state at its end.
        decay = tl.where(mask, tl.exp(dt * A[:, None]), 1.0)
        drive = dt * Bt[None, :] * u
        decay_prefix, state_prefix = tl.associative_scan((decay, drive), 1, _affine_combine)
        hs = decay_prefix * state[:, None] + state_prefix
        tl.store(hs_ptr + offsets, hs, mask=mask)
        state = tl.sum(tl.where(tl.arange(0, BLOCK_L)[None, :] == BLOCK_L - 1, hs, 0.0), axis=1)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    delta_bias_ptr,
    hs_ptr,
    dhs_ptr,
    du_ptr,
    ddelta_ptr,
    dA_partial_ptr,
    dB_ptr,
    ddelta_bias_partial_ptr,
    n_channels,
    length,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Reverse scan g_t = dhs_t + a_{t+1} g_{t+1} (g_t is the total gradient of x_t), then, with dt = Δ_t,
    du_t = g_t dt B_t, dB_t = sum_d g_t dt u_t, ddt_t = g_t (A a_t x_{t-1} + B_t u_t), dA = sum_t g_t a_t x_{t-1} dt.

    dB_ptr is an fp32 (batch, length) buffer summed over channel blocks with atomics; dA and ddelta_bias are written
    per (batch, channel) and summed over the batch by the caller.
    """
    batch = tl.program_id(0).to(tl.int64)
    first_channel = tl.program_id(1) * BLOCK_D
    channels = first_channel + tl.arange(0, BLOCK_D)
    channel_mask = channels < n_channels
    block = (batch * n_channels + first_channel) * length
    u_ptr += block
    delta_ptr += block
    hs_ptr += block
    dhs_ptr += block
    du_ptr += block
    ddelta_ptr += block
    B_ptr += batch * length
    dB_ptr += batch * length
    rows = tl.arange(0, BLOCK_D) * length
    A = tl.load(A_ptr + channels, mask=channel_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + channels, mask=channel_mask, other=0.0)
    grad_state = tl.zeros((BLOCK_D,), tl.float32)
    dA = tl.zeros((BLOCK_D,), tl.float32)
    ddelta_bias = tl.zeros((BLOCK_D,), tl.float32)
    n_chunks = tl.cdiv(length, BLOCK_L)
    for chunk in range(0, n_chunks):
        # Chunks from the last, and each chunk read backwards: the reverse scan is a forward scan of the reversed
        # sequence, and the chunk's first position ends up in its last column.
        positions = (n_chunks - 1 - chunk) * BLOCK_L + BLOCK_L - 1 - tl.arange(0, BLOCK_L)
        position_mask = positions < length
        mask = channel_mask[:, None] & position_mask[None, :]
        next_mask = channel_mask[:, None] & (positions + 1 < length)[None, :]
        offsets = rows[:, None] + positions[None, :]
        u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = _delta_pre_activation(delta_ptr, offsets, mask, bias)
        v_next = _delta_pre_activation(delta_ptr, offsets + 1, next_mask, bias)
        dt = v
        dt_next = v_next
        if DELTA_SOFTPLUS:
            dt = _softplus(v)
            dt_next = _softplus(v_next)
        Bt = tl.load(B_ptr + positions, mask=position_mask, other=0.0).to(tl.float32)
        dhs = tl.load(dhs_ptr + offsets, mask=mask, other=0.0)
        x_prev = tl.load(hs_ptr + offsets - 1, mask=mask & (positions > 0)[None, :], other=0.0)
        decay = tl.exp(dt * A[:, None])
        # a_{t+1} is 0 past the last position, so g_{L-1} = dhs_{L-1}; masked entries have dhs = 0 and give g = 0.
        decay_next = tl.where(next_mask, tl.exp(dt_next * A[:, None]), 0.0)
        decay_suffix, grad_suffix = tl.associative_scan((decay_next, dhs), 1, _affine_combine)
        g = decay_suffix * grad_state[:, None] + grad_suffix
        grad_state = tl.sum(tl.where(tl.arange(0, BLOCK_L)[None, :] == BLOCK_L - 1, g, 0.0), axis=1)

        g_dt = g * dt
        tl.store(du_ptr + offsets, (g_dt * Bt[None, :]).to(du_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(dB_ptr + positions, tl.sum(g_dt * u, axis=0), mask=position_mask)
        decayed_prev = decay * x_prev
        dA += tl.sum(g_dt * decayed_prev, axis=1)
        ddt = g * (A[:, None] * decayed_prev + Bt[None, :] * u)
        if DELTA_SOFTPLUS:
            ddt = ddt * _softplus_grad(v)
        tl.store(ddelta_ptr + offsets, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        ddelta_bias += tl.sum(ddt, axis=1)
    partial_offsets = batch * n_channels + channels
    tl.store(dA_partial_ptr + partial_offsets, dA, mask=channel_mask)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_partial_ptr + partial_offsets, ddelta_bias, mask=channel_mask)
