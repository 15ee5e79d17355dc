"""Triton kernels of the one-pass state fusion: 25 taps with a halo of 5 and replicate borders.

Imported by ``triton_state_fusion.py`` on first use, so that importing spatial_mamba does not need Triton.

The 25 taps are the distinct positions of the three dilated 3x3 kernels of the structure-aware state fusion (paper
Eq. 4): tap 0 is the shared centre (0, 0); tap 1 + t, t = 0..23, is (d (i - 1), d (j - 1)) with d = 1 + 2 (t // 8) and
(i, j) the (t % 8)-th off-centre cell of a 3x3 grid in row order (cell t % 8 + (t % 8) // 4, skipping the centre 4).

Each program owns a BLOCK_H x BLOCK_W tile of one (batch, channel) plane. Clamped indices always lie inside the plane,
so the shifted loads need no masks; they hit L1/L2 after the first tap, so HBM sees one read of h and one write per
element (8 B/element in fp32) in the forward pass, and one read of h and dy and one write of dh in the backward pass.
"""

import triton
import triton.language as tl

N_TAPS = tl.constexpr(25)


@triton.jit
def _tap_dy(t: tl.constexpr):
    """Row shift of tap 1 + t (t = 0..23); see the module docstring."""
    return (1 + 2 * (t // 8)) * ((t % 8 + (t % 8) // 4) // 3 - 1)


@triton.jit
def _tap_dx(t: tl.constexpr):
    """Column shift of tap 1 + t (t = 0..23): d (j - 1)."""
    return (1 + 2 * (t // 8)) * ((t % 8 + (t % 8) // 4) % 3 - 1)


@triton.jit
def _clamp(index, size):
    return tl.minimum(tl.maximum(index, 0), size - 1)


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
    h_ptr += plane * height * width
    out_ptr += plane * height * width
    taps_ptr += (plane % n_channels) * N_TAPS
    rows_c = _clamp(rows, height)
    cols_c = _clamp(cols, width)
    acc = tl.load(taps_ptr) * tl.load(h_ptr + rows_c[:, None] * width + cols_c[None, :]).to(tl.float32)
    for t in tl.static_range(24):
        dy = _tap_dy(t)
        dx = _tap_dx(t)
        src_rows = _clamp(rows + dy, height)
        src_cols = _clamp(cols + dx, width)
        value = tl.load(h_ptr + src_rows[:, None] * width + src_cols[None, :]).to(tl.float32)
        acc += tl.load(taps_ptr + 1 + t) * value
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
    row_in = rows < height
    col_in = cols < width
    mask = row_in[:, None] & col_in[None, :]
    offsets = rows[:, None] * width + cols[None, :]
    h_ptr += plane * height * width
    dy_ptr += plane * height * width
    dh_ptr += plane * height * width
    taps_ptr += (plane % n_channels) * N_TAPS
    grad = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    if NEED_DTAPS:
        partial_ptr = dtaps_partial_ptr + (plane * (tl.num_programs(1) * tl.num_programs(2)) + tile) * N_TAPS
        rows_c = _clamp(rows, height)
        cols_c = _clamp(cols, width)
        centre = tl.load(h_ptr + rows_c[:, None] * width + cols_c[None, :]).to(tl.float32)
        tl.store(partial_ptr, tl.sum(tl.sum(grad * centre, axis=1), axis=0))
        for t in tl.static_range(24):
            dy = _tap_dy(t)
            dx = _tap_dx(t)
            src_rows = _clamp(rows + dy, height)
            src_cols = _clamp(cols + dx, width)
            value = tl.load(h_ptr + src_rows[:, None] * width + src_cols[None, :]).to(tl.float32)
            tl.store(partial_ptr + 1 + t, tl.sum(tl.sum(grad * value, axis=1), axis=0))

    if NEED_DH:
        acc = tl.load(taps_ptr) * grad
        for t in tl.static_range(24):
            dy = _tap_dy(t)
            dx = _tap_dx(t)
            src_rows = rows - dy
            src_cols = cols - dx
            inside = ((src_rows >= 0) & (src_rows < height))[:, None] & ((src_cols >= 0) & (src_cols < width))[None, :]
            value = tl.load(dy_ptr + src_rows[:, None] * width + src_cols[None, :], mask=inside, other=0.0)
            acc += tl.load(taps_ptr + 1 + t) * value.to(tl.float32)
        tl.store(dh_ptr + offsets, acc.to(dh_ptr.dtype.element_ty), mask=mask)


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
def _fold(acc, tap, dy_ptr, y, x, valid, height, width, T: tl.constexpr, CENTRE: tl.constexpr):
    """acc + tap * the sum of dy over every output whose tap (the centre, or tap 1 + T) reads pixel (y, x).

    Along each axis those outputs form an interval of at most |shift| + 1 (``_source_interval``), so the loops have
    compile-time trip counts: |d (i - 1)| + 1 rows and |d (j - 1)| + 1 columns (one of each for the centre).
    """
    lo_y, hi_y = _source_interval(y, 0 if CENTRE else _tap_dy(T), height)
    lo_x, hi_x = _source_interval(x, 0 if CENTRE else _tap_dx(T), width)
    for ey in tl.static_range(1 + (1 - CENTRE) * (1 + 2 * (T // 8)) * ((T % 8 + (T % 8) // 4) // 3 - 1) ** 2):
        for ex in tl.static_range(1 + (1 - CENTRE) * (1 + 2 * (T // 8)) * ((T % 8 + (T % 8) // 4) % 3 - 1) ** 2):
            m = valid & (lo_y + ey <= hi_y) & (lo_x + ex <= hi_x)
            value = tl.load(dy_ptr + (lo_y + ey) * width + (lo_x + ex), mask=m, other=0.0)
            acc += tap * value.to(tl.float32)
    return acc


@triton.jit
def state_fusion_dgrad_border_kernel(
    taps_ptr,
    dy_ptr,
    dh_ptr,
    n_channels,
    height,
    width,
    n_border,
    BLOCK: tl.constexpr,
):
    """dh on the border pixels of one plane, where replicate padding folds several outputs onto one pixel.

    Border pixel i: the first row (i < W), the last row (next W, when H > 1), then the first and last columns of the
    rows in between. The interval of outputs folded onto a pixel spans at most |shift| + 1 along each axis.
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
    taps_ptr += (plane % n_channels) * N_TAPS
    acc = tl.zeros((BLOCK,), tl.float32)
    acc = _fold(acc, tl.load(taps_ptr), dy_ptr, y, x, valid, height, width, 0, True)
    for t in tl.static_range(24):
        acc = _fold(acc, tl.load(taps_ptr + 1 + t), dy_ptr, y, x, valid, height, width, t, False)
    tl.store(dh_ptr + y * width + x, acc.to(dh_ptr.dtype.element_ty), mask=valid)
