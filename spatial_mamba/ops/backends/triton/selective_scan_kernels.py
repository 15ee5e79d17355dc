"""Triton kernels of the hidden-state selective scan for d_state N = 1 (paper Eq. 2-3; the official
``kernels/selective_scan/``).

Imported by ``selective_scan.py`` on first use, so that importing spatial_mamba does not need Triton.

Each program owns one batch element and BLOCK_D channels, and walks the sequence in chunks of BLOCK_L positions:
inside a chunk the recurrence x_t = a_t x_{t-1} + b_t is a ``tl.associative_scan`` over the pairs (a_t, b_t), and the
state at the chunk's end is carried into the next chunk. The backward pass is the same scan run from the end.

Split rows: when there are too few (batch, channel block) programs for the GPU, each row is cut into segments of
``segment_length`` positions (whole chunks; the last one ragged), the third grid axis. The ``*_totals_kernel``s store
each segment's composite map (total decay, end state from a zero start) in a (batch, channels, segments, 2) buffer;
the scan kernels then compose the maps of the segments before theirs (after it, for the backward) into the state
entering their segment, a loop of at most 31 steps, and scan their segment from it.
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
def _fwd_chunk_maps(u_ptr, delta_ptr, B_ptr, offsets, positions, mask, position_mask, A, bias, DELTA_SOFTPLUS):
    # The pairs (a_t, b_t) of x_t = a_t x_{t-1} + b_t over one chunk; masked entries get the identity pair (1, 0)
    # (u is loaded as 0 there).
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dt = _delta_pre_activation(delta_ptr, offsets, mask, bias)
    if DELTA_SOFTPLUS:
        dt = _softplus(dt)
    Bt = tl.load(B_ptr + positions, mask=position_mask, other=0.0).to(tl.float32)
    decay = tl.where(mask, tl.exp(dt * A[:, None]), 1.0)
    drive = dt * Bt[None, :] * u
    return decay, drive


@triton.jit
def _last_column(values, BLOCK_L: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, BLOCK_L)[None, :] == BLOCK_L - 1, values, 0.0), axis=1)


@triton.jit
def selective_scan_fwd_totals_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    delta_bias_ptr,
    totals_ptr,
    n_channels,
    length,
    segment_length,
    n_segments,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Split rows, first pass: the composite map of segment program_id(2) of each row, into totals (batch, channels,
    segments, 2) as (total decay, end state from a zero start). The last segment's map is never needed."""
    batch = tl.program_id(0).to(tl.int64)
    first_channel = tl.program_id(1) * BLOCK_D
    segment = tl.program_id(2)
    channels = first_channel + tl.arange(0, BLOCK_D)
    channel_mask = channels < n_channels
    block = (batch * n_channels + first_channel) * length
    u_ptr += block
    delta_ptr += block
    B_ptr += batch * length
    rows = tl.arange(0, BLOCK_D) * length
    A = tl.load(A_ptr + channels, mask=channel_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + channels, mask=channel_mask, other=0.0)
    segment_start = segment * segment_length
    segment_end = tl.minimum(segment_start + segment_length, length)
    total_decay = tl.full((BLOCK_D,), 1.0, tl.float32)
    state = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(segment_start, segment_end, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        position_mask = positions < segment_end
        mask = channel_mask[:, None] & position_mask[None, :]
        offsets = rows[:, None] + positions[None, :]
        decay, drive = _fwd_chunk_maps(
            u_ptr, delta_ptr, B_ptr, offsets, positions, mask, position_mask, A, bias, DELTA_SOFTPLUS
        )
        decay_prefix, state_prefix = tl.associative_scan((decay, drive), 1, _affine_combine)
        chunk_decay = _last_column(decay_prefix, BLOCK_L)
        state = chunk_decay * state + _last_column(state_prefix, BLOCK_L)
        total_decay = total_decay * chunk_decay
    out = ((batch * n_channels + channels) * n_segments + segment) * 2
    tl.store(totals_ptr + out, total_decay, mask=channel_mask)
    tl.store(totals_ptr + out + 1, state, mask=channel_mask)


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    delta_bias_ptr,
    hs_ptr,
    totals_ptr,
    n_channels,
    length,
    segment_length,
    n_segments,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """hs of segment program_id(2) of each row (the whole row when n_segments is 1); totals_ptr is read only for
    split rows."""
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
    segment = tl.program_id(2)
    segment_start = segment * segment_length
    segment_end = tl.minimum(segment_start + segment_length, length)
    # The state entering the segment: the maps of the segments before it, composed in order from x_{-1} = 0.
    state = tl.zeros((BLOCK_D,), tl.float32)
    totals = ((batch * n_channels + channels) * n_segments) * 2
    for earlier in range(0, segment):
        decay = tl.load(totals_ptr + totals + 2 * earlier, mask=channel_mask, other=1.0)
        state = decay * state + tl.load(totals_ptr + totals + 2 * earlier + 1, mask=channel_mask, other=0.0)
    for start in range(segment_start, segment_end, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        position_mask = positions < segment_end
        mask = channel_mask[:, None] & position_mask[None, :]
        offsets = rows[:, None] + positions[None, :]
        # Masked entries are the identity map, so the chunk's last column is the state at its end.
        decay, drive = _fwd_chunk_maps(
            u_ptr, delta_ptr, B_ptr, offsets, positions, mask, position_mask, A, bias, DELTA_SOFTPLUS
        )
        decay_prefix, state_prefix = tl.associative_scan((decay, drive), 1, _affine_combine)
        hs = decay_prefix * state[:, None] + state_prefix
        tl.store(hs_ptr + offsets, hs, mask=mask)
        state = _last_column(hs, BLOCK_L)


@triton.jit
def _bwd_chunk_positions(chunk, n_chunks, chunk_origin, BLOCK_L: tl.constexpr):
    # Chunks from the last, and each chunk read backwards: the reverse scan is a forward scan of the reversed
    # sequence, and the chunk's first position ends up in its last column.
    return chunk_origin + (n_chunks - 1 - chunk) * BLOCK_L + BLOCK_L - 1 - tl.arange(0, BLOCK_L)


@triton.jit
def _bwd_decay_next(delta_ptr, offsets, next_mask, A, bias, DELTA_SOFTPLUS):
    # a_{t+1}, 0 past the last position of the row (so g_{L-1} = dhs_{L-1}).
    v_next = _delta_pre_activation(delta_ptr, offsets + 1, next_mask, bias)
    dt_next = v_next
    if DELTA_SOFTPLUS:
        dt_next = _softplus(v_next)
    return tl.where(next_mask, tl.exp(dt_next * A[:, None]), 0.0)


@triton.jit
def selective_scan_bwd_totals_kernel(
    delta_ptr,
    A_ptr,
    delta_bias_ptr,
    dhs_ptr,
    totals_ptr,
    n_channels,
    length,
    segment_length,
    n_segments,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Split rows, first pass of the backward: for segment program_id(2) + 1 of each row, the composite map of
    g_t = a_{t+1} g_{t+1} + dhs_t from the segment's end to its start, into totals (batch, channels, segments, 2) as
    (total decay, g at the segment's first position when g past its end is 0). The first segment's is never needed."""
    batch = tl.program_id(0).to(tl.int64)
    first_channel = tl.program_id(1) * BLOCK_D
    segment = tl.program_id(2) + 1
    channels = first_channel + tl.arange(0, BLOCK_D)
    channel_mask = channels < n_channels
    block = (batch * n_channels + first_channel) * length
    delta_ptr += block
    dhs_ptr += block
    rows = tl.arange(0, BLOCK_D) * length
    A = tl.load(A_ptr + channels, mask=channel_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + channels, mask=channel_mask, other=0.0)
    segment_start = segment * segment_length
    segment_end = tl.minimum(segment_start + segment_length, length)
    total_decay = tl.full((BLOCK_D,), 1.0, tl.float32)
    grad_state = tl.zeros((BLOCK_D,), tl.float32)
    n_chunks = tl.cdiv(segment_end - segment_start, BLOCK_L)
    for chunk in range(0, n_chunks):
        positions = _bwd_chunk_positions(chunk, n_chunks, segment_start, BLOCK_L)
        mask = channel_mask[:, None] & (positions < segment_end)[None, :]
        next_mask = channel_mask[:, None] & (positions + 1 < length)[None, :] & mask
        offsets = rows[:, None] + positions[None, :]
        dhs = tl.load(dhs_ptr + offsets, mask=mask, other=0.0)
        # Masked entries (past the segment's end) are the identity map (1, 0).
        decay_next = tl.where(mask, _bwd_decay_next(delta_ptr, offsets, next_mask, A, bias, DELTA_SOFTPLUS), 1.0)
        decay_suffix, grad_suffix = tl.associative_scan((decay_next, dhs), 1, _affine_combine)
        chunk_decay = _last_column(decay_suffix, BLOCK_L)
        grad_state = chunk_decay * grad_state + _last_column(grad_suffix, BLOCK_L)
        total_decay = total_decay * chunk_decay
    out = ((batch * n_channels + channels) * n_segments + segment) * 2
    tl.store(totals_ptr + out, total_decay, mask=channel_mask)
    tl.store(totals_ptr + out + 1, grad_state, mask=channel_mask)


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
    totals_ptr,
    n_channels,
    length,
    segment_length,
    n_segments,
    HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Reverse scan g_t = dhs_t + a_{t+1} g_{t+1} (g_t is the total gradient of x_t), then, with dt = Δ_t,
    du_t = g_t dt B_t, dB_t = sum_d g_t dt u_t, ddt_t = g_t (A a_t x_{t-1} + B_t u_t), dA = sum_t g_t a_t x_{t-1} dt.

    dB_ptr is an fp32 (batch, channel blocks, length) buffer of each channel block's sum, which the caller sums over
    the blocks in a fixed order (deterministic, unlike atomics); dA and ddelta_bias are written per (segment, batch,
    channel) and summed over segments and batch by the caller. Segment program_id(2) of each
    row (the whole row when n_segments is 1); totals_ptr is read only for split rows.
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
    dB_ptr += (batch * tl.num_programs(1) + tl.program_id(1)) * length
    rows = tl.arange(0, BLOCK_D) * length
    A = tl.load(A_ptr + channels, mask=channel_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + channels, mask=channel_mask, other=0.0)
    segment = tl.program_id(2)
    segment_start = segment * segment_length
    segment_end = tl.minimum(segment_start + segment_length, length)
    # g at the first position after the segment: the maps of the segments after it, composed from the last one
    # (g past the end of the row is 0).
    grad_state = tl.zeros((BLOCK_D,), tl.float32)
    totals = ((batch * n_channels + channels) * n_segments) * 2
    for later in range(0, n_segments - 1 - segment):
        index = 2 * (n_segments - 1 - later)
        decay = tl.load(totals_ptr + totals + index, mask=channel_mask, other=1.0)
        grad_state = decay * grad_state + tl.load(totals_ptr + totals + index + 1, mask=channel_mask, other=0.0)
    dA = tl.zeros((BLOCK_D,), tl.float32)
    ddelta_bias = tl.zeros((BLOCK_D,), tl.float32)
    n_chunks = tl.cdiv(segment_end - segment_start, BLOCK_L)
    for chunk in range(0, n_chunks):
        positions = _bwd_chunk_positions(chunk, n_chunks, segment_start, BLOCK_L)
        position_mask = positions < segment_end
        mask = channel_mask[:, None] & position_mask[None, :]
        next_mask = channel_mask[:, None] & (positions + 1 < length)[None, :] & mask
        offsets = rows[:, None] + positions[None, :]
        u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = _delta_pre_activation(delta_ptr, offsets, mask, bias)
        dt = v
        if DELTA_SOFTPLUS:
            dt = _softplus(v)
        Bt = tl.load(B_ptr + positions, mask=position_mask, other=0.0).to(tl.float32)
        dhs = tl.load(dhs_ptr + offsets, mask=mask, other=0.0)
        x_prev = tl.load(hs_ptr + offsets - 1, mask=mask & (positions > 0)[None, :], other=0.0)
        decay = tl.exp(dt * A[:, None])
        # a_{t+1} crosses into the next segment at the segment's last position. Masked entries (past the segment's
        # end) are the identity map (1, 0), which carries grad_state to that position; their u, B and x_prev are 0,
        # so they add nothing to the gradients.
        decay_next = tl.where(mask, _bwd_decay_next(delta_ptr, offsets, next_mask, A, bias, DELTA_SOFTPLUS), 1.0)
        decay_suffix, grad_suffix = tl.associative_scan((decay_next, dhs), 1, _affine_combine)
        g = decay_suffix * grad_state[:, None] + grad_suffix
        grad_state = _last_column(g, BLOCK_L)

        g_dt = g * dt
        tl.store(du_ptr + offsets, (g_dt * Bt[None, :]).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dB_ptr + positions, tl.sum(g_dt * u, axis=0), mask=position_mask)
        decayed_prev = decay * x_prev
        dA += tl.sum(g_dt * decayed_prev, axis=1)
        ddt = g * (A[:, None] * decayed_prev + Bt[None, :] * u)
        if DELTA_SOFTPLUS:
            ddt = ddt * _softplus_grad(v)
        tl.store(ddelta_ptr + offsets, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        ddelta_bias += tl.sum(ddt, axis=1)
    partial_offsets = (segment * tl.num_programs(0) + batch) * n_channels + channels
    tl.store(dA_partial_ptr + partial_offsets, dA, mask=channel_mask)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_partial_ptr + partial_offsets, ddelta_bias, mask=channel_mask)
