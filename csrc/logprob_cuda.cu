// csrc/logprob_cuda.cu: fused selective log-softmax on the GPU (issue 7, item 1). Same contract as the CPU
// twin in csrc/logprob.cpp, which holds the binding and sends CUDA tensors here (built with -DWITH_CUDA).
//
//     forward   logp[n] = x[n, y_n] - lse_n,     lse_n = log sum_v exp(x[n, v])
//     backward  dx[n, v] = g[n] * (1[v == y_n] - exp(x[n, v] - lse_n))
//
// Layout of the work: ONE thread block per row. A Qwen row is V = 151,936 logits (297 KiB in bf16), far
// more than a block can hold, so each thread walks the row with a stride of blockDim.x "packs" of 16 bytes
// (8 bf16 values per load: full-width memory transactions) and keeps a private online (max, sum) pair.
// The pairs are then merged across the warp with shuffles and across warps through shared memory.
// This kernel is bandwidth-bound: the forward reads the logits once, the backward reads them once and
// writes the gradient once, so the floor is (bytes of logits) / (memory bandwidth) per pass.
//
// STATUS: written without access to a GPU. It is compiled and run only on a CUDA machine; the CPU twin
// is the tested one. test_skinflow.py compares this kernel with the float64 reference when CUDA is available.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <tuple>

namespace {

// 16-byte aligned bundle of VEC values: one vectorised load/store instead of VEC narrow ones.
// The alignas makes the compiler emit one 128-bit load (ld.global.v4) per Pack instead of VEC scalar
// loads; the caller checks that the addresses really are 16-byte aligned before choosing VEC > 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

// Fast-math intrinsics for fp32 (one SFU instruction each; relative error ~1e-6, far below bf16's
// rounding of the inputs); the double versions exist for the float64 test path only.
__device__ __forceinline__ float dev_exp(float x) { return __expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_log(float x) { return __logf(x); }
__device__ __forceinline__ double dev_log(double x) { return ::log(x); }

// -inf is the neutral "max" of an empty set: merging with it changes nothing.
template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() { return static_cast<acc_t>(-INFINITY); }

// Merge the online pair (m2, s2) into (m, s): both describe sum exp(x - m) over disjoint sets of x.
// NaN propagates (a comparison with NaN is false, then exp(NaN) lands in s), as on the CPU.
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 == neg_inf<acc_t>()) return;                 // the other side saw only -inf: adds 0
  if (m == neg_inf<acc_t>()) { m = m2; s = s2; return; }
  if (m2 > m) { s = s * dev_exp(m - m2) + s2; m = m2; }
  else        { s = s + s2 * dev_exp(m2 - m); }
}

// Block-wide merge. Every thread returns with the row's (max, sum).
template <typename acc_t>
__device__ __forceinline__ void block_merge(acc_t& m, acc_t& s) {
  // One slot per warp (a block has at most 1024 threads = 32 warps).
  __shared__ acc_t sh_m[32];
  __shared__ acc_t sh_s[32];
  for (int off = 16; off > 0; off >>= 1) {  // butterfly inside the warp: no shared memory, no barrier
    acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) { sh_m[warp] = m; sh_s[warp] = s; }  // each warp's result, published once
  __syncthreads();                                   // all warps have written before warp 0 reads
  if (warp == 0) {                                   // the first warp merges the per-warp pairs
    m = lane < nwarps ? sh_m[lane] : neg_inf<acc_t>();
    s = lane < nwarps ? sh_s[lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) {
      acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
      acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
      merge(m, s, m2, s2);
    }
    if (lane == 0) { sh_m[0] = m; sh_s[0] = s; }
  }
  __syncthreads();
  m = sh_m[0];  // broadcast: every thread of the block now holds the row's (max, sum)
  s = sh_s[0];
}

// Forward: one block per row. VEC = values per 16-byte load (1 when the rows are not 16-byte aligned).
template <typename scalar_t, int VEC>
__global__ void logprob_fwd_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ index,
                                   float* __restrict__ logp, float* __restrict__ lse, int64_t V) {
  using acc_t = at::opmath_type<scalar_t>;  // float for bf16/fp16/fp32: all arithmetic in fp32
  const int64_t n = blockIdx.x;              // this block's row
  const scalar_t* row = logits + n * V;
  acc_t m = neg_inf<acc_t>(), s = acc_t(0);  // this thread's online (max, sum of exp(x - max))

  const int64_t npack = V / VEC;
  const Pack<scalar_t, VEC>* rowp = reinterpret_cast<const Pack<scalar_t, VEC>*>(row);
  // Consecutive threads read consecutive Packs: each warp's loads cover one contiguous 512-byte span
  // (fully coalesced), and the loop strides by the block so the whole row is read exactly once.
  for (int64_t i = threadIdx.x; i < npack; i += blockDim.x) {
    const Pack<scalar_t, VEC> p = rowp[i];
    // Max of the pack first, then at most one rescale per pack (not one per element).
    acc_t pm = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < VEC; ++k) { const acc_t x = static_cast<acc_t>(p.val[k]); pm = x > pm ? x : pm; }
    acc_t ps = acc_t(0);
    if (pm != neg_inf<acc_t>()) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) ps += dev_exp(static_cast<acc_t>(p.val[k]) - pm);  // NaN -> ps NaN
    } else {
      // Only -inf and/or NaN in this pack (NaN never wins `x > pm`): keep a NaN alive so lse is NaN.
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t x = static_cast<acc_t>(p.val[k]);
        if (x != x) { pm = acc_t(0); ps = x; }
      }
    }
    merge(m, s, pm, ps);
  }
  for (int64_t v = npack * VEC + threadIdx.x; v < V; v += blockDim.x) {  // ragged tail (VEC > 1 only)
    merge(m, s, static_cast<acc_t>(row[v]), acc_t(1));
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {  // one thread writes the two outputs and gathers the sampled logit
    const int64_t y = index[n];
    CUDA_KERNEL_ASSERT(y >= 0 && y < V);
    const acc_t l = m + dev_log(s);
    lse[n] = static_cast<float>(l);
    logp[n] = static_cast<float>(static_cast<acc_t>(row[y]) - l);
  }
}

// Backward: one block per row, elementwise: read x once, write dx once, in the logits' dtype.
template <typename scalar_t, int VEC>
__global__ void logprob_bwd_kernel(const float* __restrict__ grad, const scalar_t* __restrict__ logits,
                                   const int64_t* __restrict__ index, const float* __restrict__ lse,
                                   scalar_t* __restrict__ dx, int64_t V) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  // Per-row scalars, read once per thread (they stay in registers for the whole row).
  const acc_t g = static_cast<acc_t>(grad[n]);
  const acc_t l = static_cast<acc_t>(lse[n]);
  const int64_t y = index[n];
  const scalar_t* row = logits + n * V;
  scalar_t* drow = dx + n * V;

  const int64_t npack = V / VEC;
  const Pack<scalar_t, VEC>* rowp = reinterpret_cast<const Pack<scalar_t, VEC>*>(row);
  Pack<scalar_t, VEC>* drowp = reinterpret_cast<Pack<scalar_t, VEC>*>(drow);
  for (int64_t i = threadIdx.x; i < npack; i += blockDim.x) {
    const Pack<scalar_t, VEC> p = rowp[i];
    Pack<scalar_t, VEC> q;  // built in registers, stored with one 128-bit write
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // softmax recomputed from the saved lse: exp(x - lse); the one-hot only hits the sampled column
      const acc_t onehot = (i * VEC + k == y) ? acc_t(1) : acc_t(0);
      q.val[k] = static_cast<scalar_t>(g * (onehot - dev_exp(static_cast<acc_t>(p.val[k]) - l)));
    }
    drowp[i] = q;
  }
  for (int64_t v = npack * VEC + threadIdx.x; v < V; v += blockDim.x) {
    const acc_t onehot = (v == y) ? acc_t(1) : acc_t(0);
    drow[v] = static_cast<scalar_t>(g * (onehot - dev_exp(static_cast<acc_t>(row[v]) - l)));
  }
}

// Threads per block: 512 keeps enough loads in flight on a 150k-wide row; small rows need fewer.
inline int threads_for(int64_t V) { return V >= 16384 ? 512 : (V >= 2048 ? 256 : 128); }

// The 16-byte path needs the base pointer AND every row start aligned (row stride V * sizeof(T)).
template <typename scalar_t>
inline bool can_vectorise(const void* p, int64_t V) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (V * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> logprob_forward_cuda(const torch::Tensor& logits_in,
                                                              const torch::Tensor& index_in) {
  const at::cuda::OptionalCUDAGuard guard(logits_in.device());  // launch on the tensors' GPU
  auto logits = logits_in.contiguous();  // a no-op for the usual contiguous [N, V] logits
  auto index = index_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(torch::kFloat32);
  auto logp = torch::empty({N}, opts);
  auto lse = torch::empty({N}, opts);
  if (N == 0) return {logp, lse};
  // PyTorch's current stream: the kernel orders correctly with the matmul that produced the logits
  // and with whatever autograd runs next, without any device synchronisation.
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = threads_for(V);
  // One block per row: N = 4096 rows give ~30 blocks per SM on an H100, enough to hide memory latency.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_forward_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    if (can_vectorise<scalar_t>(x, V)) {
      logprob_fwd_kernel<scalar_t, VEC><<<N, threads, 0, stream>>>(
          x, index.data_ptr<int64_t>(), logp.data_ptr<float>(), lse.data_ptr<float>(), V);
    } else {
      logprob_fwd_kernel<scalar_t, 1><<<N, threads, 0, stream>>>(
          x, index.data_ptr<int64_t>(), logp.data_ptr<float>(), lse.data_ptr<float>(), V);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();  // surfaces a bad launch configuration here, not at a later sync
  return {logp, lse};
}

torch::Tensor logprob_backward_cuda(const torch::Tensor& grad_in, const torch::Tensor& logits_in,
                                    const torch::Tensor& index_in, const torch::Tensor& lse_in) {
  const at::cuda::OptionalCUDAGuard guard(logits_in.device());
  auto logits = logits_in.contiguous();
  auto index = index_in.contiguous();
  auto grad = grad_in.to(torch::kFloat32).contiguous();  // [N] dL/dlogp (fp32 from autograd already)
  auto lse = lse_in.to(torch::kFloat32).contiguous();    // [N] saved by the forward
  const int64_t N = logits.size(0), V = logits.size(1);
  // The gradient has the logits' dtype: for bf16 logits it is half the bytes of an fp32 gradient, and
  // the lm_head matmul backward consumes bf16 anyway.
  auto dx = torch::empty_like(logits);  // fresh contiguous buffer from the caching allocator: 16B aligned
  if (N == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = threads_for(V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_backward_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* d = dx.data_ptr<scalar_t>();
    if (can_vectorise<scalar_t>(x, V) && can_vectorise<scalar_t>(d, V)) {
      logprob_bwd_kernel<scalar_t, VEC><<<N, threads, 0, stream>>>(
          grad.data_ptr<float>(), x, index.data_ptr<int64_t>(), lse.data_ptr<float>(), d, V);
    } else {
      logprob_bwd_kernel<scalar_t, 1><<<N, threads, 0, stream>>>(
          grad.data_ptr<float>(), x, index.data_ptr<int64_t>(), lse.data_ptr<float>(), d, V);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}
