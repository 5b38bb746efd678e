// CUDA prelude of the long-convolution kernels (see long_conv.h for the dialect), compiled by MLX with NVRTC.
// The threadgroup buffer is dynamic shared memory, sized by the `shared_memory` of the kernel's construction.

#define M2_FUNC __device__ __forceinline__
#define M2_TG
#define M2_GLOBAL
#define M2_THREAD
#define M2_BARRIER() __syncthreads()
#define M2_UNROLL _Pragma("unroll")
#define M2_UNROLL_4 _Pragma("unroll 4")
#define M2_UNROLL_NONE _Pragma("unroll 1")
#define M2_THREADGROUP_BUFFER(name, count) \
  static_assert((count) > 0, "empty threadgroup buffer"); \
  extern __shared__ float2 name[]

#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim

M2_FUNC float2 m2_f2(float x, float y) {
  return make_float2(x, y);
}

// MLX writes `__global__ void <kernel>(` right after this header and launches it without a launch bound, so ptxas
// is free to give a thread more registers than a block of the launch's size can hold (a block of 1024 threads has
// 64 each). Every __global__ after this point carries M2_LAUNCH_BOUND, which kernels.launch_bound defines for each
// build.
#ifndef M2_LAUNCH_BOUND
#define M2_LAUNCH_BOUND
#endif
#undef __global__
#define __global__ __location__(global) M2_LAUNCH_BOUND
