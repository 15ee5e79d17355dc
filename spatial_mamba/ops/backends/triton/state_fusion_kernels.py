"""Triton kernels of the one-pass state fusion (25 taps with a halo of 5 and replicate borders), alone and fused with
the observation step that follows it, y = fusion(h)·C + D·u.

Imported by ``state_fusion.py`` on first use, so that importing spatial_mamba does not need Triton.

The 25 taps are the distinct positions of the three dilated 3x3 kernels of the structure-aware state fusion (paper
Eq. 4): tap 0 is the shared centre (0, 0); tap 1 + t, t = 0..23, is (d (i - 1), d (j - 1)) with d = 1 + 2 (t // 8) and
(i, j) the (t % 8)-th off-centre cell of a 3x3 grid in row order (cell t % 8 + (t % 8) // 4, skipping the centre 4).

Each program owns a BLOCK_H x BLOCK_W tile of one (batch, channel) plane (the fused observation's backward: of the
planes of one channel group, one after the other). Clamped indices always lie inside the plane, so the shifted loads
need no masks; they hit L1/L2 after the first tap, so HBM sees one read of h and one write per element (8 B/element in
fp32) in the forward pass of the fusion, one read of h and dy and one write of dh in its backward pass; the fused
observation adds the reads of u (and the channel-shared C) and the writes of du.
"""

import triton
import triton.language as tl

N_TAPS = tl.constexpr(25)


@triton.jit
def _tap_dy(t):
    """Row shift of tap 1 + t (t = 0..23); see the module docstring."""
    return (1 + 2 * (t // 8)) * ((t % 8 + (t % 8) // 4) // 3 - 1)


@triton.jit
def _tap_dx(t):
    """Column shift of tap 1 + t (t = 0..23): d (j - 1)."""
    return (1 + 2 * (t // 8)) * ((t % 8 + (t % 8) // 4) % 3 - 1)


@triton.jit
def _clamp(index, size):
    return tl.minimum(tl.maximum(index, 0), size - 1)


@triton.jit
def _tap_load(ptr, rows, cols, height, width, K: tl.constexpr):
    """The plane at ``ptr`` read through tap K (0..24) over a tile: ptr[clamp(y + dy_K), clamp(x + dx_K)], float32."""
    if K == 0:
        src_rows = _clamp(rows, height)
        src_cols = _clamp(cols, width)
    else:
        src_rows = _clamp(rows + _tap_dy(K - 1), height)
        src_cols = _clamp(cols + _tap_dx(K - 1), width)
    return tl.load(ptr + src_rows[:, None] * width + src_cols[None, :]).to(tl.float32)


@triton.jit
def _fusion_tile(h_ptr, taps_ptr, rows, cols, height, width):
    """Σ_k taps[k] h[clamp(y + dy_k), clamp(x + dx_k)] over a tile, in float32."""
    acc = tl.load(taps_ptr) * _tap_load(h_ptr, rows, cols, height, width, 0)
    for k in tl.static_range(1, 25):
        acc += tl.load(taps_ptr + k) * _tap_load(h_ptr, rows, cols, height, width, k)
    return acc


@triton.jit
def _tap_sums(
    h_ptr, taps_ptr, grad, partial_ptr, rows, cols, height, width, NEED_DTAPS: tl.constexpr, NEED_FUSION: tl.constexpr
):
    """One pass over the 25 shifted reads of h for the tap gradients and the fused tile.

    NEED_DTAPS: stores partial[k] = Σ_{y,x} grad[y, x] h[clamp(y + dy_k), clamp(x + dx_k)] (grad is zero off the
    plane). Returns Σ_k taps[k] h[...] when NEED_FUSION, else zeros.
    """
    fused = tl.zeros_like(grad)
    for k in tl.static_range(25):
        value = _tap_load(h_ptr, rows, cols, height, width, k)
        if NEED_DTAPS:
            tl.store(partial_ptr + k, tl.sum(tl.sum(grad * value, axis=1), axis=0))
        if NEED_FUSION:
            fused += tl.load(taps_ptr + k) * value
    return fused


@triton.jit
def _adjoint_tile(taps_ptr, grad_ptr, scale_ptr, centre, rows, cols, height, width, SCALED: tl.constexpr):
    """Σ_k taps[k] g[y - dy_k, x - dx_k] over a tile (zero outside the plane), with g = grad, or grad · scale (both
    planes, read at the same pixel) when SCALED; ``centre`` is g on the tile itself.

    The adjoint of the fusion away from the border, where no clamp folds several outputs onto one input.
    """
    acc = tl.load(taps_ptr) * centre
    for t in tl.static_range(24):
        src_rows = rows - _tap_dy(t)
        src_cols = cols - _tap_dx(t)
        inside = ((src_rows >= 0) & (src_rows < height))[:, None] & ((src_cols >= 0) & (src_cols < width))[None, :]
        offsets = src_rows[:, None] * width + src_cols[None, :]
        value = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if SCALED:
            value *= tl.load(scale_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        acc += tl.load(taps_ptr + 1 + t) * value
    return acc


@triton.jit
def state_fusion_fwd_kernel(
    h_ptr,
    taps_ptr,
    out_ptr,
    n_channels,
    height,
    width,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out[y, x] = sum_k taps[k] h[clamp(y + dy_k), clamp(x + dx_k)] for one tile of one plane."""
    plane = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < height)[:, None] & (cols < width)[None, :]
    acc = _fusion_tile(
        h_ptr + plane * height * width, taps_ptr + (plane % n_channels) * N_TAPS, rows, cols, height, width
    )
    out_ptr += plane * height * width
    tl.store(out_ptr + rows[:, None] * width + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def state_fusion_bwd_kernel(
    h_ptr,
    taps_ptr,
    dy_ptr,
    dh_ptr,
    dtaps_partial_ptr,
    n_channels,
    height,
    width,
    NEED_DH: tl.constexpr,
    NEED_DTAPS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One tile: the tap gradients' partial sums, and dh for pixels off the border (the border kernel redoes those).

    dtaps[k] = sum_{y,x} dy[y, x] h[clamp(y + dy_k), clamp(x + dx_k)], written to dtaps_partial[plane, tile, k].
    dh[y, x] = sum_k taps[k] dy[y - dy_k, x - dx_k] (zero outside the plane): the adjoint away from the border, where
    no clamp folds several outputs onto one input.
    """
    plane = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < height)[:, None] & (cols < width)[None, :]
    offsets = rows[:, None] * width + cols[None, :]
    h_ptr += plane * height * width
    dy_ptr += plane * height * width
    dh_ptr += plane * height * width
    taps_ptr += (plane % n_channels) * N_TAPS
    grad = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    if NEED_DTAPS:
        partial_ptr = dtaps_partial_ptr + (plane * (tl.num_programs(1) * tl.num_programs(2)) + tile) * N_TAPS
        _tap_sums(h_ptr, taps_ptr, grad, partial_ptr, rows, cols, height, width, True, False)

    if NEED_DH:
        acc = _adjoint_tile(taps_ptr, dy_ptr, dy_ptr, grad, rows, cols, height, width, False)
        tl.store(dh_ptr + offsets, acc.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_observation_fwd_kernel(
    h_ptr,
    taps_ptr,
    c_ptr,
    u_ptr,
    d_ptr,
    y_ptr,
    n_channels,
    height,
    width,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """y[y, x] = fusion(h)[y, x] C[y, x] + D u[y, x] for one tile of one plane; C is the batch's plane, shared by
    its channels."""
    plane = tl.program_id(0).to(tl.int64)
    channel = plane % n_channels
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < height)[:, None] & (cols < width)[None, :]
    offsets = rows[:, None] * width + cols[None, :]
    fused = _fusion_tile(h_ptr + plane * height * width, taps_ptr + channel * N_TAPS, rows, cols, height, width)
    c = tl.load(c_ptr + (plane // n_channels) * height * width + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + plane * height * width + offsets, mask=mask, other=0.0).to(tl.float32)
    out = fused * c + tl.load(d_ptr + channel) * u
    y_ptr += plane * height * width
    tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_observation_bwd_kernel(
    h_ptr,
    taps_ptr,
    c_ptr,
    u_ptr,
    d_ptr,
    dy_ptr,
    dh_ptr,
    du_ptr,
    dtaps_partial_ptr,
    dc_partial_ptr,
    dd_partial_ptr,
    n_channels,
    height,
    width,
    group_size,
    zero,
    NEED_DH: tl.constexpr,
    NEED_DTAPS: tl.constexpr,
    NEED_DC: tl.constexpr,
    NEED_DU: tl.constexpr,
    NEED_DD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One tile of one batch element, over the channels of one group (program 0 = batch x groups + group).

    With dF = dy C, for every channel c of the group:
    - dtaps[c, k] = sum_{y,x} dF h[clamp(y + dy_k), clamp(x + dx_k)] -> dtaps_partial[b, c, tile, k];
    - dh = sum_k taps[c, k] dF[y - dy_k, x - dx_k] off the border (the border kernel redoes the border pixels);
    - du = D[c] dy; dD[c] = sum_{y,x} dy u -> dd_partial[b, c, tile];
    and dC = sum_c dy fusion(h) over the group's channels -> dc_partial[b, group] (the fused tile comes from the
    same 25 reads of h as the tap gradients).

    ``zero`` is 0. The channel loop adds channel · zero to the tile's rows: otherwise the compiler hoists the 25
    shifted index tiles and the 24 shifted reads of C, which do not depend on the channel, out of the loop and keeps
    them all in registers, which spills.
    """
    n_groups = tl.cdiv(n_channels, group_size)
    batch = (tl.program_id(0) // n_groups).to(tl.int64)
    group = tl.program_id(0) % n_groups
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tile = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < height)[:, None] & (cols < width)[None, :]
    offsets = rows[:, None] * width + cols[None, :]
    plane_size = height * width
    c_ptr += batch * plane_size
    c = tl.load(c_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dc = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    first = group * group_size
    for channel in range(first, tl.minimum(first + group_size, n_channels)):
        plane = batch * n_channels + channel
        rows_in_loop = rows + channel * zero
        base = plane * plane_size
        grad = tl.load(dy_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        dfused = grad * c
        if NEED_DTAPS or NEED_DC:
            partial_ptr = dtaps_partial_ptr + (plane * n_tiles + tile) * N_TAPS
            fused = _tap_sums(
                h_ptr + base, taps_ptr + channel * N_TAPS, dfused, partial_ptr, rows_in_loop, cols, height, width,
                NEED_DTAPS, NEED_DC,
            )  # fmt: skip
            if NEED_DC:
                dc += grad * fused
        if NEED_DH:
            acc = _adjoint_tile(
                taps_ptr + channel * N_TAPS, dy_ptr + base, c_ptr, dfused, rows_in_loop, cols, height, width, True
            )
            tl.store(dh_ptr + base + offsets, acc.to(dh_ptr.dtype.element_ty), mask=mask)
        if NEED_DU:
            du = grad * tl.load(d_ptr + channel)
            tl.store(du_ptr + base + offsets, du.to(du_ptr.dtype.element_ty), mask=mask)
        if NEED_DD:
            u = tl.load(u_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(dd_partial_ptr + plane * n_tiles + tile, tl.sum(tl.sum(grad * u, axis=1), axis=0))
    if NEED_DC:
        tl.store(dc_partial_ptr + tl.program_id(0).to(tl.int64) * plane_size + offsets, dc, mask=mask)


@triton.jit
def _source_interval(index, shift, size):
    """The outputs o with clamp(o + shift, 0, size - 1) == index, an interval [lo, hi] (empty when lo > hi).

    Off the border it is the single o = index - shift; on the first (last) pixel it also takes every output whose
    source falls before (after) the plane.
    """
    lo = tl.where(index == 0, 0, index - shift)
    hi = tl.where(index == size - 1, size - 1, index - shift)
    return tl.maximum(lo, 0), tl.minimum(hi, size - 1)


@triton.jit
def _fold(acc, tap, dy_ptr, scale_ptr, y, x, valid, height, width, shift_y, shift_x, SCALED: tl.constexpr):
    """acc + tap * the sum of g over every output whose tap, at (shift_y, shift_x), reads pixel (y, x), with g = dy,
    or dy · scale when SCALED.

    Along each axis those outputs form an interval of at most |shift| + 1 (``_source_interval``): the loops run
    |shift_y| + 1 rows and |shift_x| + 1 columns.
    """
    lo_y, hi_y = _source_interval(y, shift_y, height)
    lo_x, hi_x = _source_interval(x, shift_x, width)
    total = tl.zeros_like(acc)
    for ey in range(0, tl.abs(shift_y) + 1):
        row = lo_y + ey
        row_ok = valid & (row <= hi_y)
        row_start = row * width
        for ex in range(0, tl.abs(shift_x) + 1):
            col = lo_x + ex
            m = row_ok & (col <= hi_x)
            offsets = row_start + col
            value = tl.load(dy_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            if SCALED:
                value *= tl.load(scale_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            total += value
    return acc + tap * total


@triton.jit
def state_fusion_dgrad_border_kernel(
    taps_ptr,
    dy_ptr,
    scale_ptr,
    dh_ptr,
    n_channels,
    height,
    width,
    n_border,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dh on the border pixels of one plane, where replicate padding folds several outputs onto one pixel.

    The gradient folded is dy, or dy · scale when SCALED, with scale a (batch, height, width) plane shared by the
    channels (the fused observation: dF = dy C). Border pixel i: the first row (i < W), the last row (next W, when
    H > 1), then the first and last columns of the rows in between. The interval of outputs folded onto a pixel spans
    at most |shift| + 1 along each axis.
    """
    plane = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n_border
    full_rows = tl.minimum(height, 2)
    side_cols = tl.minimum(width, 2)
    in_rows = i < full_rows * width
    j = i - full_rows * width
    y = tl.where(in_rows, (i // width) * (height - 1), 1 + j // side_cols)
    x = tl.where(in_rows, i % width, (j % side_cols) * (width - 1))
    y = tl.where(valid, y, 0)
    x = tl.where(valid, x, 0)
    dy_ptr += plane * height * width
    dh_ptr += plane * height * width
    scale_ptr += (plane // n_channels) * height * width
    taps_ptr += (plane % n_channels) * N_TAPS
    acc = tl.zeros((BLOCK,), tl.float32)
    acc = _fold(acc, tl.load(taps_ptr), dy_ptr, scale_ptr, y, x, valid, height, width, 0, 0, SCALED)
    # A loop over the taps (not unrolled): unrolled, the index and mask tiles that taps with the same shift share stay
    # live across all of them, which spills.
    for t in range(0, 24):
        shift_y = _tap_dy(t)
        shift_x = _tap_dx(t)
        acc = _fold(
            acc, tl.load(taps_ptr + 1 + t), dy_ptr, scale_ptr, y, x, valid, height, width, shift_y, shift_x, SCALED
        )
    tl.store(dh_ptr + y * width + x, acc.to(dh_ptr.dtype.element_ty), mask=valid)
