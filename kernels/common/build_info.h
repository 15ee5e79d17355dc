#pragma once
// What an extension was built for, exported as its `cuda_archs` attribute: kernels/build.py compiles the bindings
// with -DSPATIAL_MAMBA_CUDA_ARCHS=sm80_sm90_compute90 (machine code for sm_80 and sm_90, PTX for compute_90), and
// spatial_mamba/ops/backends/cuda/ sends a tensor to the kernels only when its GPU can run one of them.
#define SPATIAL_MAMBA_STRINGIFY_(x) #x
#define SPATIAL_MAMBA_STRINGIFY(x) SPATIAL_MAMBA_STRINGIFY_(x)
#ifdef SPATIAL_MAMBA_CUDA_ARCHS
#define SPATIAL_MAMBA_CUDA_ARCHS_STRING SPATIAL_MAMBA_STRINGIFY(SPATIAL_MAMBA_CUDA_ARCHS)
#else
#define SPATIAL_MAMBA_CUDA_ARCHS_STRING ""
#endif
