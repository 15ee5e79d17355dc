// Torch binding of the replicate-padded depthwise convolution kernels: checks the inputs, allocates the outputs
// and sums the weight gradient's partial results. Built as spatial_mamba._dwconv2d_cuda (see kernels/build.py).
// Only the headers the binding uses, rather than <torch/extension.h>: the binding compiles in half the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>

#include "dwconv2d.h"
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
      TORCH_CHECK(false, "dwconv2d (cuda): ", name, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "dwconv2d (cuda): ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), "dwconv2d (cuda): ", name, " is on ", t.device(), " but ", like.device(),
              " was expected");
  TORCH_CHECK(t.is_contiguous(), "dwconv2d (cuda): ", name, " must be contiguous (NCHW)");
}

// Checks a (batch, channels, H, W) activation and the kernel geometry; returns the shape the kernels take.
DwconvShape check_shape(const at::Tensor& x, const char* name, int64_t channels, int64_t kernel_size,
                        int64_t dilation) {
  check_cuda(x, name, x);
  TORCH_CHECK(x.dim() == 4, "dwconv2d (cuda): ", name, " must be (batch, channels, height, width); got shape ",
              x.sizes());
  TORCH_CHECK(x.size(1) == channels, "dwconv2d (cuda): ", name, " has ", x.size(1), " channels, the weight has ",
              channels);
  TORCH_CHECK(kernel_size % 2 == 1 && kernel_size >= kDwconvMinKernel && kernel_size <= kDwconvMaxKernel,
              "dwconv2d (cuda): the kernel size must be odd, from ", kDwconvMinKernel, " to ", kDwconvMaxKernel,
              "; got ", kernel_size, " (the reference backend handles other sizes)");
  TORCH_CHECK(dilation >= 1, "dwconv2d (cuda): dilation must be >= 1; got ", dilation);
  TORCH_CHECK(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
              "dwconv2d (cuda): planes of more than 2^31 - 1 pixels are not supported; got ", x.sizes());
  DwconvShape shape;
  shape.batch = x.size(0);
  shape.channels = channels;
  shape.height = x.size(2);
  shape.width = x.size(3);
  shape.kernel_size = static_cast<int>(kernel_size);
  shape.dilation = static_cast<int>(dilation);
  if (x.numel() == 0) return shape;  // nothing to launch
  TORCH_CHECK(dwconv2d_spatial_tiles(shape) <= 65535, "dwconv2d (cuda): planes of ", shape.height, "x", shape.width,
              " are too large for the kernels' grid");
  int64_t available = 0;
  const cudaError_t error = dwconv2d_max_shared_bytes(&available);
  TORCH_CHECK(error == cudaSuccess, "dwconv2d (cuda): cannot query the device: ", cudaGetErrorString(error));
  const int64_t needed = dwconv2d_shared_bytes(shape);
  TORCH_CHECK(needed <= available, "dwconv2d (cuda): dilation ", dilation, " with kernel size ", kernel_size,
              " needs ", needed, " bytes of shared memory per block; the device has ", available);
  return shape;
}

// (channels, 1, K, K) weight of any float dtype -> (channels, K, K) float32, as the kernels read it.
at::Tensor check_weight(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.is_cuda() && weight.device() == x.device(),
              "dwconv2d (cuda): weight must be on the input's device ", x.device(), "; got ", weight.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "dwconv2d (cuda): weight must be (channels, 1, k, k); got shape ", weight.sizes());
  scalar_kind(weight, "weight");
  return weight.to(at::kFloat).contiguous();
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "dwconv2d (cuda): ", what, " kernel launch failed: ", cudaGetErrorString(error));
}

at::Tensor correlate(const at::Tensor& src, const at::Tensor& weight, int64_t dilation, bool input_gradient) {
  check_cuda(src, input_gradient ? "dy" : "x", src);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor w = check_weight(weight, src);
  const DwconvShape shape = check_shape(src, input_gradient ? "dy" : "x", w.size(0), w.size(2), dilation);
  at::Tensor dst = at::empty_like(src);
  DwconvParams p;
  p.shape = shape;
  p.kind = scalar_kind(src, input_gradient ? "dy" : "x");
  p.src = src.data_ptr();
  p.weight = w.data_ptr<float>();
  p.dst = dst.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(input_gradient ? launch_dwconv2d_dgrad(p, stream) : launch_dwconv2d_fwd(p, stream),
               input_gradient ? "input-gradient" : "forward");
  return dst;
}

at::Tensor fwd(const at::Tensor& x, const at::Tensor& weight, int64_t dilation) {
  return correlate(x, weight, dilation, /*input_gradient=*/false);
}

// dx in dy's dtype.
at::Tensor dgrad(const at::Tensor& dy, const at::Tensor& weight, int64_t dilation) {
  return correlate(dy, weight, dilation, /*input_gradient=*/true);
}

// dw (channels, 1, K, K) float32.
at::Tensor wgrad(const at::Tensor& dy, const at::Tensor& x, int64_t kernel_size, int64_t dilation) {
  check_cuda(x, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 4, "dwconv2d (cuda): x must be (batch, channels, height, width); got shape ", x.sizes());
  const DwconvShape shape = check_shape(x, "x", x.size(1), kernel_size, dilation);
  check_cuda(dy, "dy", x);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dwconv2d (cuda): dy must have x's shape ", x.sizes(), "; got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dwconv2d (cuda): dy must have x's dtype ", x.scalar_type(),
              "; got ", dy.scalar_type());
  if (x.numel() == 0) return at::zeros({shape.channels, 1, kernel_size, kernel_size}, x.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({dwconv2d_wgrad_partials(shape), shape.channels, kernel_size * kernel_size},
                                 x.options().dtype(at::kFloat));
  DwconvWgradParams p;
  p.shape = shape;
  p.kind = scalar_kind(x, "x");
  p.x = x.data_ptr();
  p.dy = dy.data_ptr();
  p.dw_partial = partial.data_ptr<float>();
  check_launch(launch_dwconv2d_wgrad(p, c10::cuda::getCurrentCUDAStream().stream()), "weight-gradient");
  return partial.sum(0).view({shape.channels, 1, kernel_size, kernel_size});
}

}  // namespace
}  // namespace spatial_mamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Depthwise 2-D convolution with replicate padding (stride 1, odd kernel, dilation): CUDA kernels";
  m.attr("cuda_archs") = SPATIAL_MAMBA_CUDA_ARCHS_STRING;
  m.def("fwd", &spatial_mamba::fwd, "y = depthwise conv of x (replicate padding dilation * (k // 2))", py::arg("x"),
        py::arg("weight"), py::arg("dilation"));
  m.def("dgrad", &spatial_mamba::dgrad, "dx from dy (dy's dtype)", py::arg("dy"), py::arg("weight"),
        py::arg("dilation"));
  m.def("wgrad", &spatial_mamba::wgrad, "dw (channels, 1, k, k) float32 from dy and x", py::arg("dy"), py::arg("x"),
        py::arg("kernel_size"), py::arg("dilation"));
}
