// Torch binding of the one-pass state fusion kernels and of the fused observation kernels: checks the inputs,
// allocates the outputs and sums the gradients' partial results. Built as spatial_mamba._state_fusion_cuda (see kernels/build.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>
#include <tuple>

#include "state_fusion.h"
#include "common/build_info.h"

namespace spatial_mamba {
namespace {

ScalarKind scalar_kind(const at::Tensor& t, const char* name, const char* op = "state_fusion") {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, op, " (cuda): ", name, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  }
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& h, const char* op = "state_fusion") {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == h.device(), op, " (cuda): ", name, " is on ", t.device(), " but ", h.device(),
              " was expected");
  TORCH_CHECK(t.is_contiguous(), op, " (cuda): ", name, " must be contiguous");
}

FusionShape check_inputs(const at::Tensor& h, const at::Tensor& taps, const char* op = "state_fusion") {
  check_like(h, "h", h, op);
  TORCH_CHECK(h.dim() == 4, op, " (cuda): h must be (batch, channels, height, width); got shape ", h.sizes());
  scalar_kind(h, "h", op);
  check_like(taps, "taps", h, op);
  TORCH_CHECK(taps.scalar_type() == at::kFloat, op, " (cuda): taps must be float32; got ", taps.scalar_type());
  TORCH_CHECK(taps.dim() == 2 && taps.size(0) == h.size(1) && taps.size(1) == kFusionTaps, op,
              " (cuda): taps must be (channels=", h.size(1), ", ", kFusionTaps, "); got ", taps.sizes());
  TORCH_CHECK(h.size(2) * h.size(3) <= std::numeric_limits<int32_t>::max(), op,
              " (cuda): planes of more than 2^31 - 1 pixels are not supported; got ", h.sizes());
  TORCH_CHECK(h.size(0) * h.size(1) <= std::numeric_limits<int32_t>::max(), op,
              " (cuda): more than 2^31 - 1 planes are not supported; got ", h.sizes());
  FusionShape shape;
  shape.batch = h.size(0);
  shape.channels = h.size(1);
  shape.height = h.size(2);
  shape.width = h.size(3);
  TORCH_CHECK(h.numel() == 0 || fusion_tiles(shape) <= 65535, op, " (cuda): planes of ", shape.height, "x",
              shape.width, " are too large for the kernels' grid");
  return shape;
}

void check_launch(cudaError_t error, const char* what, const char* op = "state_fusion") {
  TORCH_CHECK(error == cudaSuccess, op, " (cuda): ", what, " kernel launch failed: ", cudaGetErrorString(error));
}

// out in h's dtype.
at::Tensor fwd(const at::Tensor& h, const at::Tensor& taps) {
  TORCH_CHECK(h.is_cuda(), "state_fusion (cuda): h must be a CUDA tensor; got device ", h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  FusionFwdParams p;
  p.shape = check_inputs(h, taps);
  at::Tensor out = at::empty_like(h);
  p.kind = scalar_kind(h, "h");
  p.h = h.data_ptr();
  p.taps = taps.data_ptr<float>();
  p.out = out.data_ptr();
  check_launch(launch_state_fusion_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return out;
}

// (dh in h's dtype or an empty tensor, dtaps (channels, 25) float32 or an empty tensor).
std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& h, const at::Tensor& taps, const at::Tensor& dy,
                                       bool need_dh, bool need_dtaps) {
  TORCH_CHECK(h.is_cuda(), "state_fusion (cuda): h must be a CUDA tensor; got device ", h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  FusionBwdParams p;
  p.shape = check_inputs(h, taps);
  check_like(dy, "dy", h);
  TORCH_CHECK(dy.sizes() == h.sizes() && dy.scalar_type() == h.scalar_type(), "state_fusion (cuda): dy must have h's ",
              "shape ", h.sizes(), " and dtype ", h.scalar_type(), "; got ", dy.sizes(), " ", dy.scalar_type());
  at::Tensor dh = need_dh ? at::empty_like(h) : at::empty({0}, h.options());
  const int64_t tiles = fusion_tiles(p.shape);
  at::Tensor partial = need_dtaps ? at::empty({p.shape.batch, p.shape.channels, tiles, kFusionTaps},
                                              h.options().dtype(at::kFloat))
                                  : at::empty({0}, h.options().dtype(at::kFloat));
  p.kind = scalar_kind(h, "h");
  p.h = h.data_ptr();
  p.taps = taps.data_ptr<float>();
  p.dy = dy.data_ptr();
  p.dh = need_dh ? dh.data_ptr() : nullptr;
  p.dtaps_partial = need_dtaps ? partial.data_ptr<float>() : nullptr;
  check_launch(launch_state_fusion_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  at::Tensor dtaps = at::empty({0}, h.options().dtype(at::kFloat));
  if (need_dtaps) {
    dtaps = h.numel() == 0 ? at::zeros({p.shape.channels, kFusionTaps}, h.options().dtype(at::kFloat))
                           : partial.sum(at::IntArrayRef{0, 2});
  }
  return {dh, dtaps};
}

constexpr const char* kObserve = "fused_observation";

// The fusion's checks, then C (batch, H, W) and u (h's shape) in one float dtype, and D (channels,) float32.
FusionShape check_observation_inputs(const at::Tensor& h, const at::Tensor& taps, const at::Tensor& C,
                                     const at::Tensor& u, const at::Tensor& D) {
  const FusionShape shape = check_inputs(h, taps, kObserve);
  check_like(C, "C", h, kObserve);
  TORCH_CHECK(C.dim() == 3 && C.size(0) == h.size(0) && C.size(1) == h.size(2) && C.size(2) == h.size(3),
              "fused_observation (cuda): C must be (batch, height, width) = (", h.size(0), ", ", h.size(2), ", ",
              h.size(3), "); got ", C.sizes());
  scalar_kind(C, "C", kObserve);
  check_like(u, "u", h, kObserve);
  TORCH_CHECK(u.sizes() == h.sizes(), "fused_observation (cuda): u must have h's shape ", h.sizes(), "; got ",
              u.sizes());
  TORCH_CHECK(u.scalar_type() == C.scalar_type(), "fused_observation (cuda): u and C must share one dtype; got ",
              u.scalar_type(), " and ", C.scalar_type());
  check_like(D, "D", h, kObserve);
  TORCH_CHECK(D.scalar_type() == at::kFloat, "fused_observation (cuda): D must be float32; got ", D.scalar_type());
  TORCH_CHECK(D.dim() == 1 && D.size(0) == h.size(1), "fused_observation (cuda): D must be (channels=", h.size(1),
              ",); got ", D.sizes());
  TORCH_CHECK(h.numel() == 0 || shape.batch * fusion_tiles(shape) <= std::numeric_limits<int32_t>::max(),
              "fused_observation (cuda): batch x tiles beyond 2^31 - 1 are not supported; got ", h.sizes());
  return shape;
}

// y in h's dtype.
at::Tensor observe_fwd(const at::Tensor& h, const at::Tensor& taps, const at::Tensor& C, const at::Tensor& u,
                       const at::Tensor& D) {
  TORCH_CHECK(h.is_cuda(), "fused_observation (cuda): h must be a CUDA tensor; got device ", h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  ObservationFwdParams p;
  p.shape = check_observation_inputs(h, taps, C, u, D);
  at::Tensor y = at::empty_like(h);
  p.kind = scalar_kind(h, "h", kObserve);
  p.u_kind = scalar_kind(u, "u", kObserve);
  p.h = h.data_ptr();
  p.taps = taps.data_ptr<float>();
  p.C = C.data_ptr();
  p.u = u.data_ptr();
  p.D = D.data_ptr<float>();
  p.y = y.data_ptr();
  check_launch(launch_fused_observation_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), "forward", kObserve);
  return y;
}

// (dh in h's dtype, dtaps (channels, 25) float32, dC in C's dtype, du in u's dtype, dD (channels,) float32); an empty
// tensor for each gradient not asked for. The partial sums (per plane and tile for dtaps and dD, per channel group
// for dC) are summed here, in float32, then cast.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> observe_bwd(
    const at::Tensor& h, const at::Tensor& taps, const at::Tensor& C, const at::Tensor& u, const at::Tensor& D,
    const at::Tensor& dy, bool need_dh, bool need_dtaps, bool need_dC, bool need_du, bool need_dD) {
  TORCH_CHECK(h.is_cuda(), "fused_observation (cuda): h must be a CUDA tensor; got device ", h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  ObservationBwdParams p;
  p.shape = check_observation_inputs(h, taps, C, u, D);
  check_like(dy, "dy", h, kObserve);
  TORCH_CHECK(dy.sizes() == h.sizes() && dy.scalar_type() == h.scalar_type(), "fused_observation (cuda): dy must ",
              "have h's shape ", h.sizes(), " and dtype ", h.scalar_type(), "; got ", dy.sizes(), " ",
              dy.scalar_type());
  const auto f32 = h.options().dtype(at::kFloat);
  const at::Tensor none = at::empty({0}, f32);
  const int64_t tiles = fusion_tiles(p.shape);
  const int64_t groups = observation_channel_groups(p.shape);
  const bool empty = h.numel() == 0;
  at::Tensor dh = need_dh ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor du = need_du ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dtaps_partial =
      need_dtaps && !empty ? at::empty({p.shape.batch, p.shape.channels, tiles, kFusionTaps}, f32) : none;
  at::Tensor dD_partial = need_dD && !empty ? at::empty({p.shape.batch, p.shape.channels, tiles}, f32) : none;
  at::Tensor dC_partial =
      need_dC && !empty ? at::empty({groups, p.shape.batch, p.shape.height, p.shape.width}, f32) : none;
  p.channel_groups = groups;
  p.kind = scalar_kind(h, "h", kObserve);
  p.u_kind = scalar_kind(u, "u", kObserve);
  p.h = h.data_ptr();
  p.taps = taps.data_ptr<float>();
  p.C = C.data_ptr();
  p.u = u.data_ptr();
  p.D = D.data_ptr<float>();
  p.dy = dy.data_ptr();
  p.dh = need_dh ? dh.data_ptr() : nullptr;
  p.du = need_du ? du.data_ptr() : nullptr;
  p.dtaps_partial = need_dtaps && !empty ? dtaps_partial.data_ptr<float>() : nullptr;
  p.dD_partial = need_dD && !empty ? dD_partial.data_ptr<float>() : nullptr;
  p.dC_partial = need_dC && !empty ? dC_partial.data_ptr<float>() : nullptr;
  check_launch(launch_fused_observation_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), "backward", kObserve);
  at::Tensor dtaps = none, dC = at::empty({0}, C.options()), dD = none;
  if (need_dtaps) {
    dtaps = empty ? at::zeros({p.shape.channels, kFusionTaps}, f32) : dtaps_partial.sum(at::IntArrayRef{0, 2});
  }
  if (need_dD) dD = empty ? at::zeros({p.shape.channels}, f32) : dD_partial.sum(at::IntArrayRef{0, 2});
  if (need_dC) dC = empty ? at::zeros_like(C) : dC_partial.sum(0).to(C.scalar_type());
  return {dh, dtaps, dC, du, dD};
}

}  // namespace
}  // namespace spatial_mamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "One-pass 25-tap state fusion with replicate borders, alone and fused with the observation: CUDA kernels";
  m.attr("cuda_archs") = SPATIAL_MAMBA_CUDA_ARCHS_STRING;
  m.def("fwd", &spatial_mamba::fwd, "out = the 25-tap fusion of h (h's dtype)", py::arg("h"), py::arg("taps"));
  m.def("bwd", &spatial_mamba::bwd, "(dh, dtaps) from dy; empty tensors for the gradients not asked for",
        py::arg("h"), py::arg("taps"), py::arg("dy"), py::arg("need_dh"), py::arg("need_dtaps"));
  m.def("observe_fwd", &spatial_mamba::observe_fwd, "y = fusion(h) C + D u (h's dtype)", py::arg("h"),
        py::arg("taps"), py::arg("C"), py::arg("u"), py::arg("D"));
  m.def("observe_bwd", &spatial_mamba::observe_bwd,
        "(dh, dtaps, dC, du, dD) from dy; empty tensors for the gradients not asked for", py::arg("h"),
        py::arg("taps"), py::arg("C"), py::arg("u"), py::arg("D"), py::arg("dy"), py::arg("need_dh"),
        py::arg("need_dtaps"), py::arg("need_dC"), py::arg("need_du"), py::arg("need_dD"));
}
