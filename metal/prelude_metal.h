// Metal prelude of the long-convolution kernels (see long_conv.h for the dialect).
#include <metal_stdlib>
using namespace metal;

#define M2_FUNC inline
#define M2_TG threadgroup
#define M2_GLOBAL device
#define M2_THREAD thread
#define M2_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define M2_UNROLL _Pragma("clang loop unroll(full)")
#define M2_UNROLL_4 _Pragma("clang loop unroll_count(4)")
#define M2_UNROLL_NONE _Pragma("clang loop unroll(disable)")
#define M2_THREADGROUP_BUFFER(name, count) threadgroup float2 name[count]

M2_FUNC float2 m2_f2(float x, float y) {
  return float2(x, y);
}
