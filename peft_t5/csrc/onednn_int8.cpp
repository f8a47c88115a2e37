// oneDNN's int8 product over weights it prepacked, each held here under a number, so that a compiled graph names a
// weight by that number instead of holding it. Written by hand because inductor's own way to give oneDNN a prepacked
// weight (freezing) makes the weight a constant of the graph: an opaque oneDNN tensor its graph cache cannot store,
// so each start traced and lowered those graphs again (int8's ready 91-113 s after start on an AMD EPYC against
// float32's 34), and held a second prepacked copy beside the eager one (+251 MiB for t5-small).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/types.h>

#include <mutex>
#include <unordered_map>

namespace {

std::mutex held_mutex;
std::unordered_map<int64_t, at::Tensor> held;  // number -> oneDNN's layout of an int8 weight [N, K]
int64_t next_number = 0;

c10::OperatorHandle onednn_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// weight [N, K] int8 -> the number its prepacked copy is held under (until onednn_int8_release)
int64_t onednn_int8_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "onednn_int8_pack: weight must be [N, K] int8");
  static const c10::OperatorHandle prepack = onednn_op("onednn::qlinear_prepack");
  torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
  prepack.callBoxed(&stack);
  std::lock_guard<std::mutex> lock(held_mutex);
  held.emplace(next_number, stack.at(0).toTensor());
  return next_number++;
}

void onednn_int8_release(int64_t number) {
  std::lock_guard<std::mutex> lock(held_mutex);
  held.erase(number);
}

// q [M, K] uint8: each row's int8 levels + 128 (oneDNN's fast kernels without AMX take unsigned activations only);
// scale [N] the weight's per channel -> [M, N] float32 = (sum_k (q - 128) w) * scale, not yet times the rows' scales
at::Tensor onednn_int8_matmul(const at::Tensor& q, int64_t number, const at::Tensor& scale,
                              const at::Tensor& zero_point) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "onednn_int8_matmul: q must be [M, K] uint8");
  at::Tensor weight;
  {
    std::lock_guard<std::mutex> lock(held_mutex);
    const auto found = held.find(number);
    TORCH_CHECK(found != held.end(), "onednn_int8_matmul: no weight is held under ", number);
    weight = found->second;
  }
  static const c10::OperatorHandle product = onednn_op("onednn::qlinear_pointwise");
  torch::jit::Stack stack{q.contiguous(), 1.0, int64_t{128}, weight, scale, zero_point, c10::IValue(), 1.0,
                          int64_t{0}, at::kFloat, "none", c10::List<std::optional<at::Scalar>>(), ""};
  product.callBoxed(&stack);
  return stack.at(0).toTensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) {
  m.def("onednn_int8_pack(Tensor weight) -> int");
  m.def("onednn_int8_release(int number) -> ()", &onednn_int8_release);  // no tensor to dispatch on
  m.def("onednn_int8_matmul(Tensor q, int number, Tensor scale, Tensor zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) {
  m.impl("onednn_int8_pack", &onednn_int8_pack);
  m.impl("onednn_int8_matmul", &onednn_int8_matmul);
}
