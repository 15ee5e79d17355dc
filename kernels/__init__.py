"""CUDA sources of the optional compiled kernels and their build plan (``kernels.build``); see README.md."""
