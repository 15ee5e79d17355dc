// Element types the kernels accept; shared by the torch bindings (C++) and the kernels (CUDA), so that the .cu
// files need no torch headers (they compile in seconds, and with any host C++ standard nvcc supports).
#pragma once

namespace spatial_mamba {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace spatial_mamba
