// pybind11 bindings of the CUDA module pyrag._C_cuda. Same conventions as bindings_cpu.cpp, plus the
// caller's stream (torch.cuda.current_stream().cuda_stream) as an integer: kernels launch on it, never on 0.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
// [ops: includes]
#include "rag_loss_cuda.h"
#include "topk_ip_cuda.h"

namespace py = pybind11;

// The same bindings build pyrag._C_cudasim, the kernels compiled for the CUDA simulator (csrc/sim/).
#ifndef PYRAG_CUDA_MODULE
#define PYRAG_CUDA_MODULE _C_cuda
#endif

namespace {
cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Calls f with docs as a pointer of the element type the dtype code names (int8 only where the entry takes it).
template <bool Int8, class F>
void with_doc_type(int dtype, std::uintptr_t docs, const char* who, F&& f) {
  switch (static_cast<pyrag::DType>(dtype)) {
    case pyrag::DType::f32:
      return f(reinterpret_cast<const float*>(docs));
    case pyrag::DType::f16:
      return f(reinterpret_cast<const pyrag::half_t*>(docs));
    case pyrag::DType::bf16:
      return f(reinterpret_cast<const pyrag::bf16_t*>(docs));
    case pyrag::DType::i8:
      if constexpr (Int8) return f(reinterpret_cast<const int8_t*>(docs));
      break;
  }
  throw std::invalid_argument(std::string(who) + ": unsupported docs dtype code " + std::to_string(dtype));
}
}  // namespace

PYBIND11_MODULE(PYRAG_CUDA_MODULE, m) {
  m.doc() = "pyrag CUDA kernels (framework-free; called from pyrag.ops)";
  // Number of visible devices, 0 (not an exception) without a driver or GPU so import stays cheap and safe.
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return n;
  });
  (void)as_stream;
#ifdef PYRAG_CUDA_SIM
  m.def("sim_configure", &pyrag_sim::configure, py::arg("order"), py::arg("seed"), py::arg("sms"),
        "Simulator settings: thread/block order (0 forward, 1 reverse, 2 shuffled by seed) and the SM count.");
  m.def("sim_stats", [] {
    const pyrag_sim::Stats s = pyrag_sim::stats();
    py::dict kernels;
    for (const auto& [name, count] : s.kernels) kernels[py::str(name)] = count;
    return py::dict(py::arg("launches") = s.launches, py::arg("blocks") = s.blocks, py::arg("kernels") = kernels);
  });
  pyrag_sim::bind_selftests(&m);
#endif
  // [ops: bindings] one block per op below, each owned by that op's files.
  // ---- rag_loss (pyrag/ops/rag_loss.py): fused RAG marginalisation on the caller's stream ----
  {
    using pyrag::RagDims;
    using P = std::uintptr_t;
    m.def(
        "rag_nll_forward",
        [](int dtype, P logits, P log_prior, P target, P nll_mask, P smooth_mask, int64_t B, int64_t K, int64_t T,
           int64_t V, bool prior_per_token, int mode, float epsilon, P loss, P lse, P w, P u, P scratch, P stream) {
          pyrag::rag_nll_forward_cuda(
              dtype, reinterpret_cast<const void*>(logits), reinterpret_cast<const float*>(log_prior),
              reinterpret_cast<const int64_t*>(target), reinterpret_cast<const uint8_t*>(nll_mask),
              reinterpret_cast<const uint8_t*>(smooth_mask), RagDims{B, K, T, V, prior_per_token}, mode, epsilon,
              reinterpret_cast<float*>(loss), reinterpret_cast<float*>(lse), reinterpret_cast<float*>(w),
              reinterpret_cast<float*>(u), reinterpret_cast<float*>(scratch), as_stream(stream));
        },
        py::call_guard<py::gil_scoped_release>(), "Marginal NLL forward (see pyrag/ops/rag_loss.py).");
    m.def(
        "rag_nll_backward",
        [](int dtype, P grad_loss, P logits, P log_prior, P target, P nll_mask, P smooth_mask, int64_t B,
           int64_t K, int64_t T, int64_t V, bool prior_per_token, int mode, float epsilon, P lse, P w, P u,
           P grad_logits, P stream) {
          pyrag::rag_nll_backward_cuda(
              dtype, reinterpret_cast<const float*>(grad_loss), reinterpret_cast<const void*>(logits),
              reinterpret_cast<const float*>(log_prior), reinterpret_cast<const int64_t*>(target),
              reinterpret_cast<const uint8_t*>(nll_mask), reinterpret_cast<const uint8_t*>(smooth_mask),
              RagDims{B, K, T, V, prior_per_token}, mode, epsilon, reinterpret_cast<const float*>(lse),
              reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(u),
              reinterpret_cast<void*>(grad_logits), as_stream(stream));
        },
        py::call_guard<py::gil_scoped_release>(), "Marginal NLL backward (grad_logits may alias logits).");
    m.def(
        "rag_token_marginal_forward",
        [](int dtype, P logits, P log_prior, int64_t B, int64_t K, int64_t T, int64_t V, bool prior_per_token,
           P out, P lse, P stream) {
          pyrag::rag_token_marginal_forward_cuda(dtype, reinterpret_cast<const void*>(logits),
                                                 reinterpret_cast<const float*>(log_prior),
                                                 RagDims{B, K, T, V, prior_per_token}, reinterpret_cast<float*>(out),
                                                 reinterpret_cast<float*>(lse), as_stream(stream));
        },
        py::call_guard<py::gil_scoped_release>(), "Token marginal forward.");
    m.def(
        "rag_token_marginal_backward",
        [](int dtype, P grad_out, P logits, P log_prior, int64_t B, int64_t K, int64_t T, int64_t V,
           bool prior_per_token, P out, P lse, P grad_logits, P grad_prior, P stream) {
          pyrag::rag_token_marginal_backward_cuda(
              dtype, reinterpret_cast<const float*>(grad_out), reinterpret_cast<const void*>(logits),
              reinterpret_cast<const float*>(log_prior), RagDims{B, K, T, V, prior_per_token},
              reinterpret_cast<const float*>(out), reinterpret_cast<const float*>(lse),
              reinterpret_cast<void*>(grad_logits), reinterpret_cast<float*>(grad_prior), as_stream(stream));
        },
        py::call_guard<py::gil_scoped_release>(), "Token marginal backward.");
  }
  // ---- end rag_loss ----
  // ---- topk_ip (pyrag/ops/topk_ip.py): fused top-k inner-product search on the caller's stream ----
  {
    using P = std::uintptr_t;
    namespace tk = pyrag::topk;
    m.attr("topk_ip_max_k") = tk::kCudaMaxK;
    m.attr("topk_ip_max_dim") = tk::kCudaMaxDim;
    m.attr("topk_ip_max_n") = tk::kCudaMaxN;
    m.def(
        "topk_ip_workspace_bytes",
        [](int64_t nq, int64_t nb, int64_t dim, int64_t k, int dtype, bool exact_queries) {
          return tk::cuda_workspace_bytes(nq, nb, dim, k, dtype, exact_queries);
        },
        "Bytes of scratch topk_ip needs on the current device.");
    m.def(
        "topk_ip",
        [](int dtype, P queries, P docs, P scale, int64_t nq, int64_t nb, int64_t dim, int64_t k, bool exact_queries,
           P scores, P ids, P workspace, size_t workspace_bytes, P stream) {
          with_doc_type<true>(dtype, docs, "topk_ip", [&](const auto* d) {
            tk::topk_ip_cuda(reinterpret_cast<const float*>(queries), d, reinterpret_cast<const float*>(scale), nq, nb,
                             dim, k, exact_queries, reinterpret_cast<float*>(scores), reinterpret_cast<int64_t*>(ids),
                             reinterpret_cast<void*>(workspace), workspace_bytes, as_stream(stream));
          });
        },
        py::call_guard<py::gil_scoped_release>(), "Top-k inner products on the GPU (see csrc/topk_ip_cuda.h).");
    m.attr("topk_ip_sketch_max_q") = tk::kCudaSketchMaxQ;
    m.def(
        "topk_ip_sketch",
        [](int dtype, P queries, P docs, P codes, P sk_scale, P sk_norm, P sk_res, P coef, int64_t nq, int64_t nb,
           int64_t dim, int64_t k, P scores, P ids, P workspace, size_t workspace_bytes, P stream) {
          with_doc_type<false>(dtype, docs, "topk_ip_sketch", [&](const auto* d) {
            tk::topk_ip_sketch_cuda(
                reinterpret_cast<const float*>(queries), d, reinterpret_cast<const int8_t*>(codes),
                reinterpret_cast<const float*>(sk_scale), reinterpret_cast<const float*>(sk_norm),
                reinterpret_cast<const float*>(sk_res), reinterpret_cast<const float*>(coef), nq, nb, dim, k,
                reinterpret_cast<float*>(scores), reinterpret_cast<int64_t*>(ids), reinterpret_cast<void*>(workspace),
                workspace_bytes, as_stream(stream));
          });
        },
        py::call_guard<py::gil_scoped_release>(),
        "Top-k inner products of few queries over float docs with an int8 sketch (see csrc/topk_ip_cuda.h).");
    m.def("topk_select_workspace_bytes", &tk::cuda_select_workspace_bytes, py::arg("nq"), py::arg("k"),
          py::arg("chunk"), py::arg("variant") = 0,
          "Bytes of scratch the chunked-GEMM selection needs on the current device (variant 0 block, 1 warp).");
    m.def(
        "topk_select",
        [](P scores, int64_t ld, P qmul, int64_t nq, int64_t doc0, int64_t n, int64_t k, int64_t chunk, bool first,
           bool last, P workspace, size_t workspace_bytes, P stream, int variant) {
          tk::topk_select_cuda(reinterpret_cast<const float*>(scores), ld, reinterpret_cast<const float*>(qmul), nq,
                               doc0, n, k, chunk, first, last, reinterpret_cast<void*>(workspace), workspace_bytes,
                               as_stream(stream), variant);
        },
        py::arg("scores"), py::arg("ld"), py::arg("qmul"), py::arg("nq"), py::arg("doc0"), py::arg("n"), py::arg("k"),
        py::arg("chunk"), py::arg("first"), py::arg("last"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"), py::arg("variant") = 0, py::call_guard<py::gil_scoped_release>(),
        "Folds one chunk of precomputed scores into the candidate lists.");
    m.def(
        "topk_select_finish",
        [](int64_t nq, int64_t k, int64_t chunk, P scores, P ids, P workspace, size_t workspace_bytes, P stream,
           int variant) {
          tk::topk_select_finish_cuda(nq, k, chunk, reinterpret_cast<float*>(scores), reinterpret_cast<int64_t*>(ids),
                                      reinterpret_cast<void*>(workspace), workspace_bytes, as_stream(stream), variant);
        },
        py::arg("nq"), py::arg("k"), py::arg("chunk"), py::arg("scores"), py::arg("ids"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"), py::arg("variant") = 0, py::call_guard<py::gil_scoped_release>(),
        "Merges the candidate lists into sorted scores and ids.");
  }
  // ---- end topk_ip ----
}
