// csrc/fdlinear_cuda.cu: the FDLinear "mix on load" op on the GPU (dve.py, SkinFlow DVE).
//
// Same op and same entry points as the CPU twin in fdlinear.cpp (read that file's header first):
//     forward   y_t = W_b x_t,  W_b = sum_k a_bk W_k          (tokens t of image b = rows cu[b]..cu[b+1]-1)
//     backward  dx_t = W_b^T dy_t,  da_bk = <W_k, P_b>_F,  dW_k = sum_b a_bk P_b,  P_b = sum_t dy_t x_t^T
//
// STATUS: written without access to a GPU. It has been compiled with nvcc only as a syntax check, never
// run: treat it as unverified until the kernel test in test_skinflow.py (CUDA twin vs float64 reference) and
// bench.py have passed on a GPU. dve.py only uses it when the extension builds with CUDA.
//
// Design (a plain tiled GEMM on CUDA cores, written to be read, not a tensor-core kernel):
//   * A thread block computes a 64 x 64 tile of the output with 256 threads, each owning 4 x 4 results.
//     The reduction dimension is walked in chunks of 16; both operand tiles are staged in shared memory.
//   * "Mix on load": when the weight tile is staged, each element is formed on the spot as
//     sum_k a_bk W_k[o, i] from the K band weights (the K gains of the image sit in shared memory). W_b is
//     therefore never written to global memory. The K band tiles of neighbouring blocks are re-read from
//     L2, which is why this pays off only for small K (dve.py sends K <= 16 here; BASIS_MAX_K = 8 by
//     default) - for large K dve.py uses a batched inverse FFT instead.
//   * forward grid: (output tiles, token tiles of the longest image, images). A block whose token tile
//     lies beyond its image's end exits at once, so images of different sizes need no padding copies.
//   * dx kernel: the same structure with W_b^T (the reduction runs over the output features).
//   * dW kernel: one block owns one 64 x 64 tile of (d_out, d_in) and loops over the images. For each
//     image it accumulates the P_b tile in registers, then (epilogue) adds <W_k tile, P_b tile> to da_bk
//     (warp shuffle + one atomicAdd per warp) and a_bk * P_b tile to dW_k. Because the block owns its
//     (o, i) tile for all images, dW_k needs no atomics, and no per-image weight gradient is ever stored.
//   * Accumulation is in float (double for double inputs); inputs may be fp32, fp64, fp16 or bf16.
#include <torch/extension.h>

#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace {

constexpr int TM = 64;        // rows of the output tile (tokens, or d_out rows in the dW kernel)
constexpr int TN = 64;        // columns of the output tile
constexpr int TK = 16;        // reduction chunk staged in shared memory
constexpr int THREADS = 256;  // 16 x 16 threads, 4 x 4 results each
constexpr int MAXK = 16;      // band gains kept in shared memory

// Stage W_b[o0 + r, i0 + c] (transposed = false) or W_b[o0 + c, i0 + r] (transposed = true) into ws[c][r],
// mixing the K band weights on the way: W_b[o, i] = sum_k a_k W_k[o, i].
template <typename scalar_t, typename acc_t, bool transposed>
__device__ __forceinline__ void load_mixed_tile(acc_t (*ws)[TN + 1], const scalar_t* __restrict__ bases,
                                                const acc_t* as, int K, int64_t d_out, int64_t d_in,
                                                int64_t row0, int64_t red0) {
  for (int e = threadIdx.x; e < TN * TK; e += THREADS) {
    // consecutive threads walk the contiguous d_in axis of the band weights (coalesced reads)
    int r, c;
    int64_t o, i;
    if (!transposed) {  // tile rows = output features o, reduction over inputs i (forward)
      r = e / TK; c = e % TK; o = row0 + r; i = red0 + c;
    } else {            // tile rows = input features i, reduction over outputs o (dx)
      r = e % TN; c = e / TN; i = row0 + r; o = red0 + c;
    }
    acc_t w = acc_t(0);
    if (o < d_out && i < d_in) {
      for (int k = 0; k < K; ++k) w += as[k] * static_cast<acc_t>(bases[(k * d_out + o) * d_in + i]);
    }
    ws[c][r] = w;
  }
}

// y[t, o] = sum_i x[t, i] W_b[o, i] for the token tile blockIdx.y of image blockIdx.z, outputs tile blockIdx.x.
// The register-tile micro-kernel all three kernels share. A thread owns a 4x4 block of the 64x64 output
// tile (rows ty*4.., columns tx*4..) and adds TK rank-1 updates from the two staged shared-memory tiles:
//     acc[p][q] += sum_c A[c][ty*4 + p] * B[c][tx*4 + q]
// Per step it reads 4 + 4 values and does 16 FMAs, which keeps the CUDA cores busy without tensor cores.
template <typename acc_t>
__device__ __forceinline__ void tile_rank1_updates(acc_t (&acc)[4][4], const acc_t (*A)[TM + 1],
                                                   const acc_t (*B)[TN + 1], int ty, int tx) {
#pragma unroll
  for (int c = 0; c < TK; ++c) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) { av[q] = A[c][ty * 4 + q]; bv[q] = B[c][tx * 4 + q]; }
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[p][q] += av[p] * bv[q];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fwd_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ cu, const acc_t* __restrict__ a,
                           const scalar_t* __restrict__ bases, scalar_t* __restrict__ y,
                           int64_t d_in, int64_t d_out, int K) {
  const int b = blockIdx.z;
  const int64_t start = cu[b], len = cu[b + 1] - cu[b];
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TM;
  if (t0 >= len) return;  // the whole block leaves together, before any __syncthreads
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * TN;
  __shared__ acc_t xs[TK][TM + 1];  // +1 column: fewer shared-memory bank conflicts
  __shared__ acc_t ws[TK][TN + 1];
  __shared__ acc_t as[MAXK];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if (threadIdx.x < K) as[threadIdx.x] = a[b * K + threadIdx.x];
  __syncthreads();
  // acc[p][q] = y[t0 + ty*4 + p, o0 + tx*4 + q], accumulated over the whole d_in axis in registers
  acc_t acc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = acc_t(0);
  for (int64_t i0 = 0; i0 < d_in; i0 += TK) {  // walk the reduction axis in chunks of TK
    // stage x[t0 .. t0+TM, i0 .. i0+TK] transposed (xs[c][r]); out-of-range entries are 0 so they add nothing
    for (int e = threadIdx.x; e < TM * TK; e += THREADS) {
      const int r = e / TK, c = e % TK;
      const int64_t t = t0 + r, i = i0 + c;
      xs[c][r] = (t < len && i < d_in) ? static_cast<acc_t>(x[(start + t) * d_in + i]) : acc_t(0);
    }
    // stage the W_b tile, mixed from the K band tiles on the way (W_b is never stored)
    load_mixed_tile<scalar_t, acc_t, false>(ws, bases, as, K, d_out, d_in, o0, i0);
    __syncthreads();  // both tiles complete before anyone reads them
    // rank-1 updates: each thread reads 4 x values and 4 w values per step and does 16 FMAs
    tile_rank1_updates(acc, xs, ws, ty, tx);
    __syncthreads();  // everyone done reading before the next chunk overwrites the tiles
  }
  // write back, skipping rows past the image's end and columns past d_out
  for (int p = 0; p < 4; ++p) {
    const int64_t t = t0 + ty * 4 + p;
    if (t >= len) continue;
    for (int q = 0; q < 4; ++q) {
      const int64_t o = o0 + tx * 4 + q;
      if (o < d_out) y[(start + t) * d_out + o] = static_cast<scalar_t>(acc[p][q]);
    }
  }
}

// dx[t, i] = sum_o dy[t, o] W_b[o, i]: tokens tile blockIdx.y of image blockIdx.z, inputs tile blockIdx.x.
template <typename scalar_t, typename acc_t>
__global__ void dx_kernel(const scalar_t* __restrict__ dy, const int64_t* __restrict__ cu, const acc_t* __restrict__ a,
                          const scalar_t* __restrict__ bases, scalar_t* __restrict__ dx,
                          int64_t d_in, int64_t d_out, int K) {
  const int b = blockIdx.z;
  const int64_t start = cu[b], len = cu[b + 1] - cu[b];
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TM;
  if (t0 >= len) return;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TN;
  __shared__ acc_t gs[TK][TM + 1];
  __shared__ acc_t ws[TK][TN + 1];
  __shared__ acc_t as[MAXK];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if (threadIdx.x < K) as[threadIdx.x] = a[b * K + threadIdx.x];
  __syncthreads();
  acc_t acc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = acc_t(0);
  // same structure as fwd_kernel; the reduction now runs over the output features o
  for (int64_t o0 = 0; o0 < d_out; o0 += TK) {
    // stage dy[t0 .. t0+TM, o0 .. o0+TK] transposed
    for (int e = threadIdx.x; e < TM * TK; e += THREADS) {
      const int r = e / TK, c = e % TK;
      const int64_t t = t0 + r, o = o0 + c;
      gs[c][r] = (t < len && o < d_out) ? static_cast<acc_t>(dy[(start + t) * d_out + o]) : acc_t(0);
    }
    // stage W_b[o0 .. o0+TK, i0 .. i0+TN], mixed on load (the transposed view of the forward tile)
    load_mixed_tile<scalar_t, acc_t, true>(ws, bases, as, K, d_out, d_in, i0, o0);
    __syncthreads();
#pragma unroll
    tile_rank1_updates(acc, gs, ws, ty, tx);
    __syncthreads();
  }
  for (int p = 0; p < 4; ++p) {
    const int64_t t = t0 + ty * 4 + p;
    if (t >= len) continue;
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + tx * 4 + q;
      if (i < d_in) dx[(start + t) * d_in + i] = static_cast<scalar_t>(acc[p][q]);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// One block owns the (o, i) tile (blockIdx.y, blockIdx.x) for ALL images:
//   P_b tile = sum_{t in b} dy[t, o] x[t, i];  da[b, k] += <W_k tile, P_b tile>;  dW_k tile += a_bk P_b tile.
template <typename scalar_t, typename acc_t>
__global__ void dw_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                          const int64_t* __restrict__ cu, const acc_t* __restrict__ a,
                          const scalar_t* __restrict__ bases, acc_t* __restrict__ da, acc_t* __restrict__ dbases,
                          int64_t n, int64_t d_in, int64_t d_out, int K, bool need_bases) {
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * TM, i0 = static_cast<int64_t>(blockIdx.x) * TN;
  __shared__ acc_t gs[TK][TM + 1];
  __shared__ acc_t xs[TK][TN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t b = 0; b < n; ++b) {  // images one after another; the tile of P_b lives in registers
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    acc_t acc[4][4];  // acc[p][q] = P_b[o0 + ty*4 + p, i0 + tx*4 + q]
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[p][q] = acc_t(0);
    for (int64_t tc = 0; tc < len; tc += TK) {  // reduction over the image's tokens, TK at a time
      for (int e = threadIdx.x; e < TM * TK; e += THREADS) {
        const int r = e % TM, c = e / TM;  // consecutive threads read consecutive o (coalesced)
        const int64_t t = tc + c, o = o0 + r;
        gs[c][r] = (t < len && o < d_out) ? static_cast<acc_t>(dy[(start + t) * d_out + o]) : acc_t(0);
      }
      for (int e = threadIdx.x; e < TN * TK; e += THREADS) {
        const int r = e % TN, c = e / TN;
        const int64_t t = tc + c, i = i0 + r;
        xs[c][r] = (t < len && i < d_in) ? static_cast<acc_t>(x[(start + t) * d_in + i]) : acc_t(0);
      }
      __syncthreads();
      tile_rank1_updates(acc, gs, xs, ty, tx);
      __syncthreads();
    }
    // epilogue: the P_b tile is complete in registers (acc[p][q] = P_b[o0 + ty*4 + p, i0 + tx*4 + q])
    for (int k = 0; k < K; ++k) {
      const acc_t a_bk = a[b * K + k];
      acc_t dot = acc_t(0);
      for (int p = 0; p < 4; ++p) {
        const int64_t o = o0 + ty * 4 + p;
        if (o >= d_out) continue;
        for (int q = 0; q < 4; ++q) {
          const int64_t i = i0 + tx * 4 + q;
          if (i >= d_in) continue;
          const int64_t idx = (k * d_out + o) * d_in + i;
          dot += static_cast<acc_t>(bases[idx]) * acc[p][q];
          if (need_bases) dbases[idx] += a_bk * acc[p][q];  // this block alone owns idx: no race
        }
      }
      dot = warp_sum(dot);  // every lane reaches this (the skips above are inside the loops)
      if ((threadIdx.x & 31) == 0) atomicAdd(&da[b * K + k], dot);
    }
  }
}

// ----- host side ----------------------------------------------------------------------------------------
// Sizes shared by the launchers. cu stays on the GPU for the kernels; only its longest segment is read
// back, because it fixes how many token tiles the grid needs.
struct Dims {
  int64_t T, d_in, d_out, n, max_len;
  int K;
};

Dims dims_of(const torch::Tensor& x, const torch::Tensor& cu, const torch::Tensor& bases) {
  Dims d;
  d.T = x.size(0);
  d.d_in = x.size(1);
  d.d_out = bases.size(1);
  d.K = static_cast<int>(bases.size(0));
  d.n = cu.size(0) - 1;
  TORCH_CHECK(d.K <= MAXK, "fdlinear (CUDA): at most ", MAXK, " bands, got ", d.K);
  // the longest image sets the token-tile grid (one host sync per call)
  d.max_len = d.n > 0 ? (cu.slice(0, 1) - cu.slice(0, 0, d.n)).max().item<int64_t>() : 0;
  return d;
}

}  // namespace

// Forward launcher: grid = (d_out tiles, token tiles of the longest image, images); a in acc dtype.
torch::Tensor mix_apply_forward_cuda(torch::Tensor x, torch::Tensor cu, torch::Tensor a, torch::Tensor bases) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = dims_of(x, cu, bases);
  auto y = torch::empty({d.T, d.d_out}, x.options());
  if (d.T == 0 || d.max_len <= 0) return y;
  const dim3 grid((d.d_out + TN - 1) / TN, (d.max_len + TM - 1) / TM, d.n);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fdlinear_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    TORCH_CHECK(a.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "fdlinear (CUDA): a must be in the accumulation dtype");
    fwd_kernel<scalar_t, acc_t><<<grid, THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), cu.data_ptr<int64_t>(), a.data_ptr<acc_t>(), bases.data_ptr<scalar_t>(),
        y.data_ptr<scalar_t>(), d.d_in, d.d_out, d.K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// Backward launcher: dx_kernel (one block per (d_in tile, token tile, image)) then dw_kernel (one block
// per (d_in tile, d_out tile), looping over the images). dW is accumulated in the acc dtype and cast at
// the end; da is accumulated by atomics, so its last bits may differ from run to run in fp32.
std::vector<torch::Tensor> mix_apply_backward_cuda(torch::Tensor dy, torch::Tensor x, torch::Tensor cu,
                                                   torch::Tensor a, torch::Tensor bases, bool need_bases) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Dims d = dims_of(x, cu, bases);
  auto dx = torch::zeros_like(x);
  auto da = torch::zeros_like(a);  // accumulation dtype, filled by atomicAdd
  auto dbases_acc = need_bases ? torch::zeros(bases.sizes(), a.options()) : torch::empty({0}, a.options());
  if (d.T == 0 || d.max_len <= 0) {
    return {dx, da, need_bases ? dbases_acc.to(bases.scalar_type()) : dbases_acc};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid_dx((d.d_in + TN - 1) / TN, (d.max_len + TM - 1) / TM, d.n);
  const dim3 grid_dw((d.d_in + TN - 1) / TN, (d.d_out + TM - 1) / TM);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fdlinear_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    TORCH_CHECK(a.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "fdlinear (CUDA): a must be in the accumulation dtype");
    dx_kernel<scalar_t, acc_t><<<grid_dx, THREADS, 0, stream>>>(
        dy.data_ptr<scalar_t>(), cu.data_ptr<int64_t>(), a.data_ptr<acc_t>(), bases.data_ptr<scalar_t>(),
        dx.data_ptr<scalar_t>(), d.d_in, d.d_out, d.K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw_kernel<scalar_t, acc_t><<<grid_dw, THREADS, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), cu.data_ptr<int64_t>(), a.data_ptr<acc_t>(),
        bases.data_ptr<scalar_t>(), da.data_ptr<acc_t>(), need_bases ? dbases_acc.data_ptr<acc_t>() : nullptr,
        d.n, d.d_in, d.d_out, d.K, need_bases);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, da, need_bases ? dbases_acc.to(bases.scalar_type()) : dbases_acc};
}
