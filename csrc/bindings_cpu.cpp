// pybind11 bindings of the CPU module pyrag._C: the only file of this module that sees Python.
// Each op takes tensor addresses (tensor.data_ptr()) as integers, sizes and a dtype code; pyrag/ops/*.py
// has already checked shapes, dtypes and contiguity, and allocated every output. Kernels run without the GIL.
#include <pybind11/pybind11.h>

#include <omp.h>

#include "common.h"
// [ops: includes] one header per op, e.g. #include "rag_loss.h"
#include "rag_loss.h"
#include "topk_ip.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyrag CPU kernels (framework-free; called from pyrag.ops)";
  m.def("max_threads", [] { return omp_get_max_threads(); });
  // [ops: bindings] one block per op below, each owned by that op's files.
  // ---- rag_loss (pyrag/ops/rag_loss.py): fused RAG marginalisation; pointers are tensor.data_ptr() ----
  {
    using pyrag::RagDims;
    using P = std::uintptr_t;
    m.def(
        "rag_nll_forward",
        [](int dtype, P logits, P log_prior, P target, P nll_mask, P smooth_mask, int64_t B, int64_t K, int64_t T,
           int64_t V, bool prior_per_token, int mode, float epsilon, P loss, P lse, P w, P u, P scratch,
           int num_threads) -> int64_t {
          const RagDims d{B, K, T, V, prior_per_token};
          return pyrag::rag_dispatch_dtype(dtype, [&](auto s) {
            using S = decltype(s);
            return pyrag::rag_nll_forward_cpu<S>(
                reinterpret_cast<const S*>(logits), reinterpret_cast<const float*>(log_prior),
                reinterpret_cast<const int64_t*>(target), reinterpret_cast<const uint8_t*>(nll_mask),
                reinterpret_cast<const uint8_t*>(smooth_mask), d, mode, epsilon, reinterpret_cast<float*>(loss),
                reinterpret_cast<float*>(lse), reinterpret_cast<float*>(w), reinterpret_cast<float*>(u),
                reinterpret_cast<float*>(scratch), num_threads);
          });
        },
        py::call_guard<py::gil_scoped_release>(),
        "Marginal NLL forward; returns -1 or the flat [B,T] index of the first out-of-range target.");
    m.def(
        "rag_nll_backward",
        [](int dtype, P grad_loss, P logits, P log_prior, P target, P nll_mask, P smooth_mask, int64_t B,
           int64_t K, int64_t T, int64_t V, bool prior_per_token, int mode, float epsilon, P lse, P w, P u,
           P grad_logits, int num_threads) {
          const RagDims d{B, K, T, V, prior_per_token};
          pyrag::rag_dispatch_dtype(dtype, [&](auto s) {
            using S = decltype(s);
            pyrag::rag_nll_backward_cpu<S>(
                reinterpret_cast<const float*>(grad_loss), reinterpret_cast<const S*>(logits),
                reinterpret_cast<const float*>(log_prior), reinterpret_cast<const int64_t*>(target),
                reinterpret_cast<const uint8_t*>(nll_mask), reinterpret_cast<const uint8_t*>(smooth_mask), d,
                mode, epsilon, reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(w),
                reinterpret_cast<const float*>(u), reinterpret_cast<S*>(grad_logits), num_threads);
          });
        },
        py::call_guard<py::gil_scoped_release>(), "Marginal NLL backward: writes grad_logits (may alias logits).");
    m.def(
        "rag_token_marginal_forward",
        [](int dtype, P logits, P log_prior, int64_t B, int64_t K, int64_t T, int64_t V, bool prior_per_token,
           P out, P lse, int num_threads) {
          const RagDims d{B, K, T, V, prior_per_token};
          pyrag::rag_dispatch_dtype(dtype, [&](auto s) {
            using S = decltype(s);
            pyrag::rag_token_marginal_forward_cpu<S>(reinterpret_cast<const S*>(logits),
                                                     reinterpret_cast<const float*>(log_prior), d,
                                                     reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
                                                     num_threads);
          });
        },
        py::call_guard<py::gil_scoped_release>(), "Token marginal forward: out [B,T,V] fp32, lse [B,K,T].");
    m.def(
        "rag_token_marginal_backward",
        [](int dtype, P grad_out, P logits, P log_prior, int64_t B, int64_t K, int64_t T, int64_t V,
           bool prior_per_token, P out, P lse, P grad_logits, P grad_prior, int num_threads) {
          const RagDims d{B, K, T, V, prior_per_token};
          pyrag::rag_dispatch_dtype(dtype, [&](auto s) {
            using S = decltype(s);
            pyrag::rag_token_marginal_backward_cpu<S>(
                reinterpret_cast<const float*>(grad_out), reinterpret_cast<const S*>(logits),
                reinterpret_cast<const float*>(log_prior), d, reinterpret_cast<const float*>(out),
                reinterpret_cast<const float*>(lse), reinterpret_cast<S*>(grad_logits),
                reinterpret_cast<float*>(grad_prior), num_threads);
          });
        },
        py::call_guard<py::gil_scoped_release>(), "Token marginal backward: grad_logits, grad_prior [B,K,T].");
    m.def("rag_loss_set_isa", &pyrag::rag_loss_cpu_set_isa,
          "Cap the rag_loss CPU kernels' SIMD level (0 scalar/SSE2, 1 AVX2, 2 AVX-512, -1 best); for tests.");
  }
  // ---- end rag_loss ----
  // ---- topk_ip (pyrag/ops/topk_ip.py): fused top-k inner-product search; pointers are tensor.data_ptr() ----
  {
    using P = std::uintptr_t;
    namespace tk = pyrag::topk;
    m.def("topk_ip_best_isa", [] { return static_cast<int>(tk::best_cpu_isa()); },
          "Best CPU kernel available here: 0 scalar, 1 AVX2, 2 AVX-512.");
    m.def("topk_ip_has_amx", [] { return tk::amx_usable(); }, "Whether the AMX bf16 prefilter path can run here.");
    m.def(
        "topk_ip_sketch_bounds",
        [](P queries, int64_t nq, int64_t dim, P out) {
          return tk::sketch_bound_constants(reinterpret_cast<const float*>(queries), nq, dim,
                                            reinterpret_cast<float*>(out));
        },
        "Sketch prefilter constants ca, cb, e0, dlim [4, nq] of host fp32 queries [nq, dim] (for the CUDA sketch "
        "kernel); False if the queries cannot use a sketch.");
    m.def(
        "topk_ip",
        [](int dtype, P queries, P docs, P scale, int64_t nq, int64_t nb, int64_t dim, int64_t k, P scores, P ids,
           int threads, int64_t tile_n, int split, int parts, int isa, int path, P sk_codes, P sk_scale, P sk_norm,
           P sk_res) {
          const tk::CpuOptions opt{threads, tile_n, split, parts, isa, path};
          const tk::Sketch sk{reinterpret_cast<const int8_t*>(sk_codes), reinterpret_cast<const float*>(sk_scale),
                              reinterpret_cast<const float*>(sk_norm), reinterpret_cast<const float*>(sk_res)};
          const tk::Sketch* skp = sk_codes != 0 ? &sk : nullptr;
          const auto* q = reinterpret_cast<const float*>(queries);
          const auto* s = reinterpret_cast<const float*>(scale);
          auto* os = reinterpret_cast<float*>(scores);
          auto* oi = reinterpret_cast<int64_t*>(ids);
          switch (static_cast<pyrag::DType>(dtype)) {
            case pyrag::DType::f32:
              return tk::topk_ip_cpu(q, reinterpret_cast<const float*>(docs), s, nq, nb, dim, k, os, oi, opt, skp);
            case pyrag::DType::f16:
              return tk::topk_ip_cpu(q, reinterpret_cast<const pyrag::half_t*>(docs), s, nq, nb, dim, k, os, oi, opt, skp);
            case pyrag::DType::bf16:
              return tk::topk_ip_cpu(q, reinterpret_cast<const pyrag::bf16_t*>(docs), s, nq, nb, dim, k, os, oi, opt, skp);
            case pyrag::DType::i8:
              return tk::topk_ip_cpu(q, reinterpret_cast<const int8_t*>(docs), s, nq, nb, dim, k, os, oi, opt, skp);
          }
          throw std::invalid_argument("topk_ip: unknown dtype code " + std::to_string(dtype));
        },
        py::call_guard<py::gil_scoped_release>(),
        "Top-k inner products: queries [nq,dim] fp32, docs [nb,dim] (dtype code), scale [nb] or 0, optional int8 "
        "sketch (codes, scale, norm, res; codes 0 = none) -> scores, ids.");
  }
  // ---- end topk_ip ----
}
