// csrc/fdlinear.cpp: the FDLinear "mix on load" op (dve.py, SkinFlow DVE), C++ CPU twin + Python binding.
//
// The op, for a packed sequence of n images (tokens of image b are rows cu[b] .. cu[b+1]-1 of x):
//
//     y_t = W_b x_t,        W_b = sum_k a_bk W_k                    (forward)
//     dx_t  = W_b^T dy_t                                            (backward, input)
//     da_bk = <W_k, P_b>_F, P_b = sum_{t in b} dy_t x_t^T           (backward, band gains)
//     dW_k  = sum_b a_bk P_b                                        (backward, bands; optional)
//
// x [T, d_in], cu [n+1] int64, a [n, K] (accumulation dtype), bases W_k [K, d_out, d_in] -> y [T, d_out].
// The per-image gates c and f and the bias are applied by dve.py on the activations, outside this op.
//
// The point of the op: W_b (d_out x d_in per image, 17.5 MB in fp32 at 3420x1280) is NEVER written to
// memory. The output rows are processed in tiles of ROW_TILE rows; each tile of W_b is mixed from the
// K band tiles right when it is needed, used for the product, and dropped. In backward the tiles are
// mixed again (recomputed, not stored) and P_b is formed one tile at a time, so per-image weight
// gradients never exist in full either. csrc/fdlinear_cuda.cu does the same with shared-memory tiles.
//
// This file is built alone on a CPU machine; skinflow.build_extension adds fdlinear_cuda.cu and
// -DWITH_CUDA on a GPU machine, and then the functions below dispatch on the tensor's device.
#include <torch/extension.h>

#include <vector>

#ifdef WITH_CUDA
// Implemented in fdlinear_cuda.cu (same arguments and results as the CPU versions below).
torch::Tensor mix_apply_forward_cuda(torch::Tensor x, torch::Tensor cu, torch::Tensor a, torch::Tensor bases);
std::vector<torch::Tensor> mix_apply_backward_cuda(torch::Tensor dy, torch::Tensor x, torch::Tensor cu,
                                                   torch::Tensor a, torch::Tensor bases, bool need_bases);
#endif

namespace {

constexpr int64_t ROW_TILE = 64;  // output rows mixed at once: ROW_TILE x d_in fits in L2 (64x3420x4 B = 875 KB)

// Shape and dtype checks shared by forward and backward: a clear message instead of a crash in a loop.
void check_inputs(const torch::Tensor& x, const torch::Tensor& cu, const torch::Tensor& a, const torch::Tensor& bases) {
  TORCH_CHECK(x.dim() == 2, "fdlinear: x must be [T, d_in], got ", x.sizes());
  TORCH_CHECK(bases.dim() == 3, "fdlinear: bases must be [K, d_out, d_in], got ", bases.sizes());
  TORCH_CHECK(bases.size(2) == x.size(1), "fdlinear: d_in of x (", x.size(1), ") and bases (", bases.size(2), ") differ");
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2 && cu.scalar_type() == torch::kInt64, "fdlinear: cu must be int64 [n+1]");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == cu.size(0) - 1 && a.size(1) == bases.size(0),
              "fdlinear: a must be [n_img, K] = [", cu.size(0) - 1, ", ", bases.size(0), "], got ", a.sizes());
  TORCH_CHECK(x.scalar_type() == bases.scalar_type(), "fdlinear: x and bases must share a dtype");
  TORCH_CHECK(x.is_contiguous() && bases.is_contiguous() && a.is_contiguous() && cu.is_contiguous(),
              "fdlinear: inputs must be contiguous");
  TORCH_CHECK(x.device() == bases.device() && x.device() == a.device() && x.device() == cu.device(),
              "fdlinear: all inputs must be on one device");
}

// tile[r, i] = sum_k a_k * bases[k, row0 + r, i] for r < rows: one ROW_TILE slice of W_b, built in place.
template <typename scalar_t, typename acc_t>
void mix_tile(const scalar_t* bases, const acc_t* a_b, int64_t K, int64_t d_out, int64_t d_in,
              int64_t row0, int64_t rows, scalar_t* tile) {
  const int64_t len = rows * d_in;
  for (int64_t e = 0; e < len; ++e) tile[e] = scalar_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* src = bases + (k * d_out + row0) * d_in;  // band k, rows row0 .. row0+rows-1
    const scalar_t w = static_cast<scalar_t>(a_b[k]);
    for (int64_t e = 0; e < len; ++e) tile[e] += w * src[e];
  }
}

// Forward, CPU: for each image b and each ROW_TILE-row slice of the output features,
//   1. mix the slice of W_b from the K band slices (mix_tile),
//   2. multiply the image's tokens by it with BLAS (the slice is cache-resident),
//   3. write the [N_b, rows] block of y.
// Images are independent: nothing of image b is read while image b' is computed.
torch::Tensor forward_cpu(torch::Tensor x, torch::Tensor cu, torch::Tensor a, torch::Tensor bases) {
  const int64_t d_in = x.size(1), K = bases.size(0), d_out = bases.size(1), n = cu.size(0) - 1;
  auto y = torch::empty({x.size(0), d_out}, x.options());  // [T, d_out]
  const auto cu_h = cu.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fdlinear_forward_cpu", [&] {
    const auto* pa = a.data_ptr<scalar_t>();
    const auto* pb = bases.data_ptr<scalar_t>();
    auto tile = torch::empty({ROW_TILE, d_in}, x.options());  // the only weight memory: one tile
    for (int64_t b = 0; b < n; ++b) {
      const int64_t t0 = cu_h[b], len = cu_h[b + 1] - cu_h[b];
      if (len <= 0) continue;
      auto xb = x.narrow(0, t0, len);  // [N_b, d_in]
      for (int64_t r0 = 0; r0 < d_out; r0 += ROW_TILE) {
        const int64_t rows = std::min(ROW_TILE, d_out - r0);
        auto t = tile.narrow(0, 0, rows);  // [rows, d_in]
        mix_tile<scalar_t, scalar_t>(pb, pa + b * K, K, d_out, d_in, r0, rows, t.data_ptr<scalar_t>());
        // y[t0:t0+len, r0:r0+rows] = X_b tile^T  (BLAS on a cache-resident tile)
        y.narrow(0, t0, len).narrow(1, r0, rows).copy_(torch::mm(xb, t.t()));
      }
    }
  });
  return y;
}

// Backward, CPU: the same tile walk. For every slice (rows r0..r0+rows-1 of W_b):
//   dx_b      += dY_b[:, slice] W_b[slice, :]       (the slice is mixed again, not stored from forward)
//   P         =  dY_b[:, slice]^T X_b               (this slice of P_b only: [rows, d_in])
//   da_bk     += <W_k[slice], P>_F                  (for every band k)
//   dW_k[slice] += a_bk P                           (only when the bands train)
// Memory: one weight slice and one P slice, whatever the number of images.
std::vector<torch::Tensor> backward_cpu(torch::Tensor dy, torch::Tensor x, torch::Tensor cu, torch::Tensor a,
                                        torch::Tensor bases, bool need_bases) {
  const int64_t d_in = x.size(1), K = bases.size(0), d_out = bases.size(1), n = cu.size(0) - 1;
  auto dx = torch::zeros_like(x);                  // [T, d_in]
  auto da = torch::zeros_like(a);                  // [n, K]
  auto dbases = need_bases ? torch::zeros_like(bases) : torch::empty({0}, bases.options());
  const auto cu_h = cu.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fdlinear_backward_cpu", [&] {
    const auto* pa = a.data_ptr<scalar_t>();
    const auto* pb = bases.data_ptr<scalar_t>();
    auto* pda = da.data_ptr<scalar_t>();
    auto tile = torch::empty({ROW_TILE, d_in}, x.options());
    for (int64_t b = 0; b < n; ++b) {
      const int64_t t0 = cu_h[b], len = cu_h[b + 1] - cu_h[b];
      if (len <= 0) continue;
      auto xb = x.narrow(0, t0, len);    // [N_b, d_in]
      auto dyb = dy.narrow(0, t0, len);  // [N_b, d_out]
      auto dxb = dx.narrow(0, t0, len);  // [N_b, d_in], contiguous rows
      for (int64_t r0 = 0; r0 < d_out; r0 += ROW_TILE) {
        const int64_t rows = std::min(ROW_TILE, d_out - r0);
        auto t = tile.narrow(0, 0, rows);
        mix_tile<scalar_t, scalar_t>(pb, pa + b * K, K, d_out, d_in, r0, rows, t.data_ptr<scalar_t>());
        auto g = dyb.narrow(1, r0, rows);  // [N_b, rows]
        dxb.addmm_(g, t);                  // dx_b += dY_b[:, tile] W_b[tile, :]
        auto P = torch::mm(g.t(), xb).contiguous();  // [rows, d_in] tile of P_b = dY_b^T X_b
        const auto* pP = P.data_ptr<scalar_t>();
        const int64_t len_tile = rows * d_in;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* Wk = pb + (k * d_out + r0) * d_in;
          scalar_t dot = 0;  // <W_k tile, P tile>_F
          for (int64_t e = 0; e < len_tile; ++e) dot += Wk[e] * pP[e];
          pda[b * K + k] += dot;
          if (need_bases) {  // dW_k tile += a_bk P tile
            scalar_t* dWk = dbases.data_ptr<scalar_t>() + (k * d_out + r0) * d_in;
            const scalar_t w = pa[b * K + k];
            for (int64_t e = 0; e < len_tile; ++e) dWk[e] += w * pP[e];
          }
        }
      }
    }
  });
  return {dx, da, dbases};
}

}  // namespace

// ----- entry points: check, then dispatch on the device.
// The CPU twin takes `a` in x's dtype (fp32 or fp64); the CUDA version takes it in the accumulation dtype
// (fp32 for fp16/bf16/fp32, fp64 for fp64). dve.py passes fp32 / fp64 accordingly. -------------------------------------------------
torch::Tensor mix_apply_forward(torch::Tensor x, torch::Tensor cu, torch::Tensor a, torch::Tensor bases) {
  check_inputs(x, cu, a, bases);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return mix_apply_forward_cuda(x, cu, a, bases);
#else
    TORCH_CHECK(false, "fdlinear: built without CUDA");
#endif
  }
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "fdlinear (CPU): a must have x's dtype");
  return forward_cpu(x, cu, a, bases);
}

std::vector<torch::Tensor> mix_apply_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor cu, torch::Tensor a,
                                              torch::Tensor bases, bool need_bases) {
  check_inputs(x, cu, a, bases);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == bases.size(1) && dy.is_contiguous() &&
                  dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "fdlinear: dy must be contiguous [T, d_out] with x's dtype and device");
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return mix_apply_backward_cuda(dy, x, cu, a, bases, need_bases);
#else
    TORCH_CHECK(false, "fdlinear: built without CUDA");
#endif
  }
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "fdlinear (CPU): a must have x's dtype");
  return backward_cpu(dy, x, cu, a, bases, need_bases);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FDLinear mix-on-load op: y_t = (sum_k a_bk W_k) x_t per image, and its backward (SkinFlow DVE)";
  m.def("mix_apply_forward", &mix_apply_forward, "y = (sum_k a_bk W_k) x per image (x, cu, a, bases)");
  m.def("mix_apply_backward", &mix_apply_backward, "(dx, da, dbases) of mix_apply_forward (dy, x, cu, a, bases, need_bases)");
  m.def("has_cuda", &has_cuda, "whether this build includes the CUDA kernels");
}
