// Torch binding of the one-pass state fusion kernels: checks the inputs, allocates the outputs and sums the tap
// gradient's partial results. Built as spatial_mamba._state_fusion_cuda (see kernels/build.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>
#include <tuple>

#include "state_fusion.h"

namespace spatial_mamba {
namespace {

ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "state_fusion (cuda): ", name, " must be float32, float16 or bfloat16; got ",
                  t.scalar_type());
  }
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& h) {
  TORCH_CHECK(t.is_cuda(), "state_fusion (cuda): ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == h.device(), "state_fusion (cuda): ", name, " is on ", t.device(), " but ", h.device(),
              " was expected");
  TORCH_CHECK(t.is_contiguous(), "state_fusion (cuda): ", name, " must be contiguous");
}

FusionShape check_inputs(const at::Tensor& h, const at::Tensor& taps) {
  check_like(h, "h", h);
  TORCH_CHECK(h.dim() == 4, "state_fusion (cuda): h must be (batch, channels, height, width); got shape ", h.sizes());
  scalar_kind(h, "h");
  check_like(taps, "taps", h);
  TORCH_CHECK(taps.scalar_type() == at::kFloat, "state_fusion (cuda): taps must be float32; got ",
              taps.scalar_type());
  TORCH_CHECK(taps.dim() == 2 && taps.size(0) == h.size(1) && taps.size(1) == kFusionTaps,
              "state_fusion (cuda): taps must be (channels=", h.size(1), ", ", kFusionTaps, "); got ", taps.sizes());
  TORCH_CHECK(h.size(2) * h.size(3) <= std::numeric_limits<int32_t>::max(),
              "state_fusion (cuda): planes of more than 2^31 - 1 pixels are not supported; got ", h.sizes());
  TORCH_CHECK(h.size(0) * h.size(1) <= std::numeric_limits<int32_t>::max(),
              "state_fusion (cuda): more than 2^31 - 1 planes are not supported; got ", h.sizes());
  FusionShape shape;
  shape.batch = h.size(0);
  shape.channels = h.size(1);
  shape.height = h.size(2);
  shape.width = h.size(3);
  TORCH_CHECK(h.numel() == 0 || fusion_tiles(shape) <= 65535, "state_fusion (cuda): planes of ", shape.height, "x",
              shape.width, " are too large for the kernels' grid");
  return shape;
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "state_fusion (cuda): ", what, " kernel launch failed: ",
              cudaGetErrorString(error));
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

}  // namespace
}  // namespace spatial_mamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "One-pass 25-tap state fusion with replicate borders: CUDA kernels";
  m.def("fwd", &spatial_mamba::fwd, "out = the 25-tap fusion of h (h's dtype)", py::arg("h"), py::arg("taps"));
  m.def("bwd", &spatial_mamba::bwd, "(dh, dtaps) from dy; empty tensors for the gradients not asked for",
        py::arg("h"), py::arg("taps"), py::arg("dy"), py::arg("need_dh"), py::arg("need_dtaps"));
}
