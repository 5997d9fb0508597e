// csrc/logprob.cpp: fused selective log-softmax, the C++ CPU twin + the Python binding (issue 7, item 1).
//
// What it computes (one row n of logits x = logits[n, :], sampled token y = index[n]):
//
//     forward   logp[n]   = x[y] - lse(x),          lse(x) = log sum_v exp(x[v])
//     backward  dx[n, v]  = g[n] * (1[v == y] - exp(x[v] - lse(x)))
//
// Why a kernel at all: GRPO needs log pi(token) for every completion token, i.e. ONE number per row of a
// [N, V] logits matrix with V = 151,936 for Qwen. The textbook `log_softmax(logits).gather(index)`
// allocates a second full [N, V] tensor (in fp32 if we want fp32 math, 2x the bf16 logits), and autograd
// keeps it for backward. Here the forward reads each row once and keeps only two floats per row (logp and
// lse); the backward recomputes softmax on the fly from the logits and lse and writes the gradient
// straight into a tensor of the logits' dtype. Extra memory: O(N) + the gradient itself.
//
// "Online" max/sum (Milakov & Gimelshein 2018): instead of one pass for the max and a second for the
// sum of exp(x - max), keep a running max m and a running sum s of exp(x - m); when a larger x arrives,
// rescale s by exp(m_old - m_new). One read of the row, numerically as safe as the two-pass form.
//
// Input dtypes: float32, bfloat16, float16 (and float64 for tests); the math is done in float32 (float64
// for float64 input), the outputs logp/lse are float32, the gradient has the logits' dtype.
//
// This file holds the CPU implementation and the binding. When built with -DWITH_CUDA (see
// skinflow.build_extension) CUDA tensors are sent to csrc/logprob_cuda.cu, which has the same contract.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <tuple>

#ifdef WITH_CUDA
// Implemented in logprob_cuda.cu. Same arguments and results as the CPU functions below.
std::tuple<torch::Tensor, torch::Tensor> logprob_forward_cuda(const torch::Tensor& logits,
                                                              const torch::Tensor& index);
torch::Tensor logprob_backward_cuda(const torch::Tensor& grad, const torch::Tensor& logits,
                                    const torch::Tensor& index, const torch::Tensor& lse);
#endif

namespace {

// Shared argument checks: a bad call must fail here with a readable message, not deep in a loop.
void check_inputs(const torch::Tensor& logits, const torch::Tensor& index) {
  TORCH_CHECK(logits.dim() == 2, "selective_log_softmax: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == logits.size(0),
              "selective_log_softmax: index must be [N] with N = ", logits.size(0), ", got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == torch::kLong, "selective_log_softmax: index must be int64");
  TORCH_CHECK(logits.size(1) > 0, "selective_log_softmax: empty vocabulary");
  TORCH_CHECK(logits.device() == index.device(), "selective_log_softmax: logits and index on different devices");
}

// CPU forward. Returns (logp [N] float32, lse [N] float32).
std::tuple<torch::Tensor, torch::Tensor> forward_cpu(const torch::Tensor& logits_in, const torch::Tensor& index_in) {
  auto logits = logits_in.contiguous();  // rows must be contiguous for the single streaming pass
  auto index = index_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  // Outputs are fp32 whatever the input dtype: log-probs feed exp(logp - old_logp) in the GRPO ratio,
  // where a bf16 rounding of 0.4 % would already look like a policy change.
  auto opts = logits.options().dtype(torch::kFloat32);
  auto logp = torch::empty({N}, opts);
  auto lse = torch::empty({N}, opts);
  const int64_t* idx = index.data_ptr<int64_t>();
  // Validate every index before touching memory: an out-of-range id would otherwise read garbage.
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(idx[n] >= 0 && idx[n] < V, "selective_log_softmax: index[", n, "] = ", idx[n],
                " is outside [0, ", V, ")");
  }
  float* out_logp = logp.data_ptr<float>();
  float* out_lse = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for bf16/fp16/fp32, double for fp64
    const scalar_t* x = logits.data_ptr<scalar_t>();
    // Rows are independent: split them over threads (grain 1: a row is already V elements of work).
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = x + n * V;
        acc_t m = neg_inf;  // running max
        acc_t s = 0;        // running sum of exp(x - m)
        for (int64_t v = 0; v < V; ++v) {
          const acc_t xv = static_cast<acc_t>(row[v]);
          if (xv > m) {           // new max: rescale what we summed so far (exp(-inf) = 0 on the first hit)
            s = s * std::exp(m - xv) + acc_t(1);
            m = xv;
          } else if (xv != neg_inf) {  // -inf adds exactly 0 (and -inf - -inf would be NaN)
            s += std::exp(xv - m);
          }
        }
        // NaN anywhere in the row: `xv > m` is false, the else-branch adds exp(NaN) = NaN, so lse is NaN
        // and the caller's non-finite-loss guard sees it instead of a silently wrong number.
        const acc_t l = m + std::log(s);
        out_lse[n] = static_cast<float>(l);
        out_logp[n] = static_cast<float>(static_cast<acc_t>(row[idx[n]]) - l);
      }
    });
  });
  return {logp, lse};
}

// CPU backward. grad [N] float32 (dL/dlogp), lse from forward. Returns dL/dlogits [N, V] in logits' dtype.
torch::Tensor backward_cpu(const torch::Tensor& grad_in, const torch::Tensor& logits_in,
                           const torch::Tensor& index_in, const torch::Tensor& lse_in) {
  auto logits = logits_in.contiguous();
  auto index = index_in.contiguous();
  auto grad = grad_in.to(torch::kFloat32).contiguous();  // [N] dL/dlogp
  auto lse = lse_in.to(torch::kFloat32).contiguous();    // [N] saved by the forward
  const int64_t N = logits.size(0), V = logits.size(1);
  auto out = torch::empty_like(logits);  // [N, V] in the logits' dtype: the only big allocation
  const int64_t* idx = index.data_ptr<int64_t>();
  const float* g = grad.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* dx = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = x + n * V;  // read once ...
        scalar_t* drow = dx + n * V;      // ... written once: the backward is purely bandwidth-bound
        const acc_t gn = static_cast<acc_t>(g[n]);
        const acc_t ln = static_cast<acc_t>(l[n]);
        // d logp / d x_v = onehot_v - softmax_v ; softmax recomputed from the saved lse (no [N, V] cache).
        for (int64_t v = 0; v < V; ++v) {
          drow[v] = static_cast<scalar_t>(-gn * std::exp(static_cast<acc_t>(row[v]) - ln));
        }
        const int64_t y = idx[n];  // the sampled column gets the +g of the one-hot (rewritten, not added,
                                   // so the value is computed in fp32 before the single rounding)
        drow[y] = static_cast<scalar_t>(gn * (acc_t(1) - std::exp(static_cast<acc_t>(row[y]) - ln)));
      }
    });
  });
  return out;
}

}  // namespace

// Device dispatch: the Python side calls these two; tensors decide where the work runs. Arguments are
// validated once here, so the CPU and CUDA halves can assume well-formed inputs.
std::tuple<torch::Tensor, torch::Tensor> logprob_forward(const torch::Tensor& logits, const torch::Tensor& index) {
  check_inputs(logits, index);
  if (logits.is_cuda()) {
#ifdef WITH_CUDA
    return logprob_forward_cuda(logits, index);
#else
    TORCH_CHECK(false, "selective_log_softmax: this build of the extension has no CUDA part");
#endif
  }
  return forward_cpu(logits, index);
}

torch::Tensor logprob_backward(const torch::Tensor& grad, const torch::Tensor& logits, const torch::Tensor& index,
                               const torch::Tensor& lse) {
  check_inputs(logits, index);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0), "selective_log_softmax: grad must be [N]");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == logits.size(0), "selective_log_softmax: lse must be [N]");
  if (logits.is_cuda()) {
#ifdef WITH_CUDA
    return logprob_backward_cuda(grad, logits, index, lse);
#else
    TORCH_CHECK(false, "selective_log_softmax: this build of the extension has no CUDA part");
#endif
  }
  return backward_cpu(grad, logits, index, lse);
}

// The Python module: rl._SelectiveLogSoftmaxExt (an autograd.Function) calls forward() and keeps lse
// for backward(). TORCH_EXTENSION_NAME is set by torch.utils.cpp_extension (skinflow_logprob_cpu/cuda).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SkinFlow fused selective log-softmax (forward: logp, lse; backward: (onehot - softmax) * grad)";
  m.def("forward", &logprob_forward, "logits [N,V], index [N] -> (logp [N] f32, lse [N] f32)");
  m.def("backward", &logprob_backward, "grad [N], logits [N,V], index [N], lse [N] -> dlogits [N,V]");
}
