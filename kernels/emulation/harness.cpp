// C entry points into the kernels' launchers for the CPU emulation build (see emulation.h), called via ctypes.
#include "dwconv2d/dwconv2d.h"
#include "selective_scan/selective_scan.h"
#include "state_fusion/state_fusion.h"

#include <limits>
#include <vector>

using namespace spatial_mamba;

namespace {
DwconvShape dwconv_shape(int64_t batch, int64_t channels, int64_t height, int64_t width, int k, int dilation) {
  DwconvShape s;
  s.batch = batch;
  s.channels = channels;
  s.height = height;
  s.width = width;
  s.kernel_size = k;
  s.dilation = dilation;
  return s;
}
FusionShape fusion_shape(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  FusionShape s;
  s.batch = batch;
  s.channels = channels;
  s.height = height;
  s.width = width;
  return s;
}
}  // namespace

extern "C" {

int64_t emu_scan_bwd_dim_groups(int64_t dim) { return scan_bwd_dim_groups(dim); }

int64_t emu_scan_split_segments(int64_t batch, int64_t dim, int64_t length, int64_t sm_count) {
  return scan_split_segments(batch, dim, length, sm_count);
}

int64_t emu_scan_segment_length(int64_t length, int64_t segments) { return scan_segment_length(length, segments); }

// The scans take the segment count (1: whole rows) and allocate the split rows' workspace as the binding does, filled
// with NaN so that a read of a total no kernel wrote shows up in the results.
int emu_scan_fwd(int kind, const void* u, const void* delta, const float* A, const void* B, const float* delta_bias,
                 int delta_softplus, float* hs, int64_t batch, int64_t dim, int64_t length, int64_t segments) {
  std::vector<float> totals(batch * dim * segments * 2, std::numeric_limits<float>::quiet_NaN());
  ScanFwdParams p;
  p.segments = segments;
  p.segment_totals = segments > 1 ? totals.data() : nullptr;
  p.shape = {batch, dim, length};
  p.kind = static_cast<ScalarKind>(kind);
  p.u = u;
  p.delta = delta;
  p.A = A;
  p.B = B;
  p.delta_bias = delta_bias;
  p.delta_softplus = delta_softplus != 0;
  p.hs = hs;
  return launch_selective_scan_fwd(p, nullptr);
}

int emu_scan_bwd(int kind, const void* u, const void* delta, const float* A, const void* B, const float* delta_bias,
                 int delta_softplus, const float* hs, const float* dhs, void* du, void* ddelta, float* dB_partial,
                 float* dA_partial, float* ddelta_bias_partial, int64_t batch, int64_t dim, int64_t length,
                 int64_t segments) {
  std::vector<float> totals(batch * dim * segments * 2, std::numeric_limits<float>::quiet_NaN());
  ScanBwdParams p;
  p.segments = segments;
  p.segment_totals = segments > 1 ? totals.data() : nullptr;
  p.shape = {batch, dim, length};
  p.kind = static_cast<ScalarKind>(kind);
  p.u = u;
  p.delta = delta;
  p.A = A;
  p.B = B;
  p.delta_bias = delta_bias;
  p.delta_softplus = delta_softplus != 0;
  p.hs = hs;
  p.dhs = dhs;
  p.du = du;
  p.ddelta = ddelta;
  p.dB_partial = dB_partial;
  p.dA_partial = dA_partial;
  p.ddelta_bias_partial = ddelta_bias_partial;
  return launch_selective_scan_bwd(p, nullptr);
}

// input_gradient = 0: y from x; 1: dx from dy.
int emu_dwconv2d(int input_gradient, int kind, const void* src, const float* weight, void* dst, int64_t batch,
                 int64_t channels, int64_t height, int64_t width, int k, int dilation) {
  DwconvParams p;
  p.shape = dwconv_shape(batch, channels, height, width, k, dilation);
  p.kind = static_cast<ScalarKind>(kind);
  p.src = src;
  p.weight = weight;
  p.dst = dst;
  return input_gradient ? launch_dwconv2d_dgrad(p, nullptr) : launch_dwconv2d_fwd(p, nullptr);
}

int64_t emu_dwconv2d_wgrad_partials(int64_t batch, int64_t channels, int64_t height, int64_t width, int k,
                                    int dilation) {
  return dwconv2d_wgrad_partials(dwconv_shape(batch, channels, height, width, k, dilation));
}

int emu_dwconv2d_wgrad(int kind, const void* x, const void* dy, float* dw_partial, int64_t batch, int64_t channels,
                       int64_t height, int64_t width, int k, int dilation) {
  DwconvWgradParams p;
  p.shape = dwconv_shape(batch, channels, height, width, k, dilation);
  p.kind = static_cast<ScalarKind>(kind);
  p.x = x;
  p.dy = dy;
  p.dw_partial = dw_partial;
  return launch_dwconv2d_wgrad(p, nullptr);
}

int64_t emu_fusion_tiles(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  return fusion_tiles(fusion_shape(batch, channels, height, width));
}

int emu_state_fusion_fwd(int kind, const void* h, const float* taps, void* out, int64_t batch, int64_t channels,
                         int64_t height, int64_t width) {
  FusionFwdParams p;
  p.shape = fusion_shape(batch, channels, height, width);
  p.kind = static_cast<ScalarKind>(kind);
  p.h = h;
  p.taps = taps;
  p.out = out;
  return launch_state_fusion_fwd(p, nullptr);
}

// dh or dtaps_partial may be null: that gradient is not computed.
int emu_state_fusion_bwd(int kind, const void* h, const float* taps, const void* dy, void* dh, float* dtaps_partial,
                         int64_t batch, int64_t channels, int64_t height, int64_t width) {
  FusionBwdParams p;
  p.shape = fusion_shape(batch, channels, height, width);
  p.kind = static_cast<ScalarKind>(kind);
  p.h = h;
  p.taps = taps;
  p.dy = dy;
  p.dh = dh;
  p.dtaps_partial = dtaps_partial;
  return launch_state_fusion_bwd(p, nullptr);
}

int64_t emu_observation_channel_groups(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  return observation_channel_groups(fusion_shape(batch, channels, height, width));
}

// kind: h and y; u_kind: C and u.
int emu_fused_observation_fwd(int kind, int u_kind, const void* h, const float* taps, const void* C, const void* u,
                              const float* D, void* y, int64_t batch, int64_t channels, int64_t height,
                              int64_t width) {
  ObservationFwdParams p;
  p.shape = fusion_shape(batch, channels, height, width);
  p.kind = static_cast<ScalarKind>(kind);
  p.u_kind = static_cast<ScalarKind>(u_kind);
  p.h = h;
  p.taps = taps;
  p.C = C;
  p.u = u;
  p.D = D;
  p.y = y;
  return launch_fused_observation_fwd(p, nullptr);
}

// Any of dh, dtaps_partial, dC_partial, du and dD_partial may be null: that gradient is not computed.
int emu_fused_observation_bwd(int kind, int u_kind, const void* h, const float* taps, const void* C, const void* u,
                              const float* D, const void* dy, void* dh, float* dtaps_partial, float* dC_partial,
                              void* du, float* dD_partial, int64_t channel_groups, int64_t batch, int64_t channels,
                              int64_t height, int64_t width) {
  ObservationBwdParams p;
  p.shape = fusion_shape(batch, channels, height, width);
  p.kind = static_cast<ScalarKind>(kind);
  p.u_kind = static_cast<ScalarKind>(u_kind);
  p.channel_groups = channel_groups;
  p.h = h;
  p.taps = taps;
  p.C = C;
  p.u = u;
  p.D = D;
  p.dy = dy;
  p.dh = dh;
  p.dtaps_partial = dtaps_partial;
  p.dC_partial = dC_partial;
  p.du = du;
  p.dD_partial = dD_partial;
  return launch_fused_observation_bwd(p, nullptr);
}
}
