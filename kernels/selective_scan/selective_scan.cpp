// Torch binding of the N = 1 selective scan kernels: checks the inputs, allocates the outputs and reduces the
// backward's partial sums. Built as spatial_mamba._selective_scan_cuda (see kernels/build.py).
// Only the headers the binding uses, rather than <torch/extension.h>: the binding compiles in half the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "selective_scan.h"
#include "common/build_info.h"

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
      TORCH_CHECK(false, "selective_scan (cuda): ", name, " must be float32, float16 or bfloat16; got ",
                  t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "selective_scan (cuda): ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), "selective_scan (cuda): ", name, " is on ", t.device(), " but u is on ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "selective_scan (cuda): ", name, " must be contiguous");
}

struct Inputs {
  ScanShape shape;
  ScalarKind kind;
};

// Checks u, delta (batch, dim, L), A (dim, 1) float32, B (batch, 1, L) in u's dtype, delta_bias (dim,) float32.
Inputs check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                    const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.is_cuda(), "selective_scan (cuda): u must be a CUDA tensor; got device ", u.device());
  TORCH_CHECK(u.dim() == 3, "selective_scan (cuda): u must be (batch, dim, length); got shape ", u.sizes());
  check_cuda(u, "u", u);
  check_cuda(delta, "delta", u);
  check_cuda(A, "A", u);
  check_cuda(B, "B", u);
  const ScalarKind kind = scalar_kind(u, "u");
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan (cuda): delta must have u's shape ", u.sizes(), "; got ",
              delta.sizes());
  TORCH_CHECK(delta.scalar_type() == u.scalar_type() && B.scalar_type() == u.scalar_type(),
              "selective_scan (cuda): delta and B must have u's dtype ", u.scalar_type(), "; got ",
              delta.scalar_type(), " and ", B.scalar_type());
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  TORCH_CHECK(length <= kScanMaxLength, "selective_scan (cuda): rows of more than ", kScanMaxLength,
              " positions are not supported; got length ", length, " (the reference backend has no limit)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective_scan (cuda): A must be (dim=", dim,
              ", d_state); got shape ", A.sizes());
  TORCH_CHECK(A.size(1) == 1, "selective_scan (cuda): the CUDA kernels support d_state N = 1 only; got A of shape ",
              A.sizes(), " (the reference and Triton backends handle N > 1)");
  TORCH_CHECK(A.scalar_type() == at::kFloat, "selective_scan (cuda): A must be float32; got ", A.scalar_type());
  TORCH_CHECK(B.dim() == 3 && B.size(0) == batch && B.size(1) == 1 && B.size(2) == length,
              "selective_scan (cuda): B must be (batch=", batch, ", 1, length=", length, "); got shape ", B.sizes());
  if (delta_bias.has_value()) {
    check_cuda(*delta_bias, "delta_bias", u);
    TORCH_CHECK(delta_bias->dim() == 1 && delta_bias->size(0) == dim,
                "selective_scan (cuda): delta_bias must be (dim=", dim, ",); got shape ", delta_bias->sizes());
    TORCH_CHECK(delta_bias->scalar_type() == at::kFloat, "selective_scan (cuda): delta_bias must be float32; got ",
                delta_bias->scalar_type());
  }
  return {{batch, dim, length}, kind};
}

// Segments per row for this input on the current device (scan_split_segments).
int64_t device_segments(const ScanShape& shape) {
  int device = 0;
  int sm_count = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "selective_scan (cuda): cannot read the device's SM count");
  return scan_split_segments(shape.batch, shape.dim, shape.length, sm_count);
}

// The (rows, segments, 2) float32 workspace of split rows; an empty tensor when rows are not split.
at::Tensor segment_workspace(const ScanShape& shape, int64_t segments, const at::TensorOptions& f32) {
  return at::empty({segments > 1 ? shape.batch * shape.dim * segments * 2 : 0}, f32);
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "selective_scan (cuda): ", what, " kernel launch failed: ",
              cudaGetErrorString(error));
}

at::Tensor fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  const Inputs in = check_inputs(u, delta, A, B, delta_bias);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor hs = at::empty({in.shape.batch, in.shape.dim, 1, in.shape.length}, u.options().dtype(at::kFloat));
  ScanFwdParams p;
  p.shape = in.shape;
  p.kind = in.kind;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.delta_softplus = delta_softplus;
  p.hs = hs.data_ptr<float>();
  p.segments = device_segments(in.shape);
  const at::Tensor totals = segment_workspace(in.shape, p.segments, u.options().dtype(at::kFloat));
  p.segment_totals = p.segments > 1 ? totals.data_ptr<float>() : nullptr;
  check_launch(launch_selective_scan_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return hs;
}

// Returns [du, ddelta, dA, dB, ddelta_bias] in the dtypes of u, delta, A, B and float32.
std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus, const at::Tensor& hs,
                            const at::Tensor& dhs) {
  const Inputs in = check_inputs(u, delta, A, B, delta_bias);
  const std::vector<int64_t> hs_shape = {in.shape.batch, in.shape.dim, 1, in.shape.length};
  const auto check_state = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, name, u);
    TORCH_CHECK(t.sizes() == at::IntArrayRef(hs_shape), "selective_scan (cuda): ", name, " must have shape ",
                at::IntArrayRef(hs_shape), "; got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "selective_scan (cuda): ", name, " must be float32; got ",
                t.scalar_type());
  };
  check_state(hs, "hs");
  check_state(dhs, "dhs");
  const c10::cuda::CUDAGuard guard(u.device());
  const at::TensorOptions f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty_like(u);
  at::Tensor ddelta = at::empty_like(delta);
  at::Tensor dB_partial = at::empty({in.shape.batch, scan_bwd_dim_groups(in.shape.dim), in.shape.length}, f32);
  const int64_t segments = device_segments(in.shape);
  const at::Tensor totals = segment_workspace(in.shape, segments, f32);
  // One slice per segment; zero-filled: the kernel writes nothing for rows of length 0.
  at::Tensor dA_partial = at::zeros({segments, in.shape.batch, in.shape.dim}, f32);
  at::Tensor ddelta_bias_partial = at::zeros({segments, in.shape.batch, in.shape.dim}, f32);
  ScanBwdParams p;
  p.segments = segments;
  p.segment_totals = segments > 1 ? totals.data_ptr<float>() : nullptr;
  p.shape = in.shape;
  p.kind = in.kind;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.delta_softplus = delta_softplus;
  p.hs = hs.data_ptr<float>();
  p.dhs = dhs.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dB_partial = dB_partial.data_ptr<float>();
  p.dA_partial = dA_partial.data_ptr<float>();
  p.ddelta_bias_partial = ddelta_bias_partial.data_ptr<float>();
  check_launch(launch_selective_scan_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  at::Tensor dB = dB_partial.sum(1, /*keepdim=*/true).to(B.scalar_type());
  at::Tensor dA = dA_partial.sum(0).sum(0).view({in.shape.dim, 1});
  at::Tensor ddelta_bias = ddelta_bias_partial.sum(0).sum(0);
  return {du, ddelta, dA, dB, ddelta_bias};
}

}  // namespace
}  // namespace spatial_mamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Hidden-state selective scan (d_state N = 1) of Spatial-Mamba: CUDA kernels";
  m.attr("cuda_archs") = SPATIAL_MAMBA_CUDA_ARCHS_STRING;
  m.def("fwd", &spatial_mamba::fwd, "hs (batch, dim, 1, L) float32 from u, delta, A, B, delta_bias, delta_softplus",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("delta_bias"),
        py::arg("delta_softplus"));
  m.def("bwd", &spatial_mamba::bwd, "[du, ddelta, dA, dB, ddelta_bias] from the forward inputs, hs and dhs",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("delta_bias"),
        py::arg("delta_softplus"), py::arg("hs"), py::arg("dhs"));
  m.def("split_segments", &spatial_mamba::scan_split_segments,
        "segments per row that the kernels use for (batch, dim, length) rows on a GPU with sm_count SMs",
        py::arg("batch"), py::arg("dim"), py::arg("length"), py::arg("sm_count"));
}
