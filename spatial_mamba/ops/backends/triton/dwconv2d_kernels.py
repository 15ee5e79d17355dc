"""Triton kernels of the depthwise 2-D convolution of the state fusion (paper Eq. 4; the official
``kernels/dwconv2d/``).

Imported by ``dwconv2d.py`` on first use, so that importing spatial_mamba does not need Triton.

Each program computes a BLOCK_H x BLOCK_W tile of one (batch, channel) plane and loops over the K x K taps, reading
the input at the shifted positions directly (clamped to the border for replicate padding), so no padded copy of the
input is ever made.
"""

import triton
import triton.language as tl


@triton.jit
def _source_index(index, shift, size, REPLICATE):
    """The input index that output ``index`` reads at a tap shifted by ``shift``, and whether it lies inside the input:
    clamped to the border (replicate padding), or masked out when outside (zero padding)."""
    source = index + shift
    if REPLICATE:
        source = tl.minimum(tl.maximum(source, 0), size - 1)
    return source, (source >= 0) & (source < size)


@triton.jit
def dwconv2d_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    n_channels,
    in_height,
    in_width,
    out_height,
    out_width,
    OFFSET: tl.constexpr,
    DILATION: tl.constexpr,
    K: tl.constexpr,
    REPLICATE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """y[i, j] = sum_{p,q} w[p, q] x[i - OFFSET + DILATION (p - K//2), j - OFFSET + DILATION (q - K//2)] per plane.

    The forward pass is OFFSET = 0 with replicate padding; the input gradient on the replicate-padded domain is the
    same correlation of dy with the flipped kernel, OFFSET = DILATION * (K // 2) and zero padding.
    """
    plane = tl.program_id(0).to(tl.int64)
    channel = plane % n_channels
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    out_mask = (rows < out_height)[:, None] & (cols < out_width)[None, :]
    x_ptr += plane * in_height * in_width
    w_ptr += channel * K * K
    acc = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    for p in range(K):
        src_rows, rows_inside = _source_index(rows, DILATION * (p - K // 2) - OFFSET, in_height, REPLICATE)
        row_offsets = src_rows * in_width
        row_mask = out_mask & rows_inside[:, None]
        for q in range(K):
            src_cols, cols_inside = _source_index(cols, DILATION * (q - K // 2) - OFFSET, in_width, REPLICATE)
            x = tl.load(x_ptr + row_offsets[:, None] + src_cols[None, :], mask=row_mask & cols_inside[None, :])
            acc += tl.load(w_ptr + p * K + q).to(tl.float32) * x.to(tl.float32)
    y_ptr += plane * out_height * out_width
    y_offsets = rows[:, None] * out_width + cols[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def dwconv2d_weight_grad_kernel(
    x_ptr,
    dy_ptr,
    dw_partial_ptr,
    height,
    width,
    DILATION: tl.constexpr,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """dw[p, q] = sum_{i,j} dy[i, j] x[clamp(i + DILATION (p - K//2)), clamp(j + DILATION (q - K//2))], per tile:
    dw_partial has one row of K * K values per (plane, tile), summed over batch and tiles by the caller."""
    plane = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < height)[:, None] & (cols < width)[None, :]
    x_ptr += plane * height * width
    dy = tl.load(dy_ptr + plane * height * width + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    tile = (plane * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    dw_partial_ptr += tile * K * K
    for p in range(K):
        src_rows = _source_index(rows, DILATION * (p - K // 2), height, True)[0]
        row_offsets = src_rows * width
        for q in range(K):
            src_cols = _source_index(cols, DILATION * (q - K // 2), width, True)[0]
            x = tl.load(x_ptr + row_offsets[:, None] + src_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dw_partial_ptr + p * K + q, tl.sum(tl.sum(dy * x, axis=1), axis=0))
