// oneDNN's products over weights it prepacked, each held here under a number, so that a compiled graph names a weight
// by that number instead of holding it: int8 (qlinear) and float32 / bfloat16 (its linear). Written by hand because
// inductor's own way to give oneDNN a prepacked weight (freezing) makes the weight a constant of the graph: an opaque
// oneDNN tensor its graph cache cannot store, so each start traced and lowered those graphs again (int8's ready
// 91-113 s after start on an AMD EPYC against 23 s now), and each frozen graph held a prepacked copy of its own.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/types.h>

#include <mutex>
#include <unordered_map>

namespace {

std::mutex held_mutex;
std::unordered_map<int64_t, at::Tensor> held;  // number -> oneDNN's layout of a weight [N, K]
int64_t next_number = 0;

c10::OperatorHandle onednn_op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

int64_t hold(const at::Tensor& packed) {
  std::lock_guard<std::mutex> lock(held_mutex);
  held.emplace(next_number, packed);
  return next_number++;
}

at::Tensor held_weight(int64_t number, const char* op) {
  std::lock_guard<std::mutex> lock(held_mutex);
  const auto found = held.find(number);
  TORCH_CHECK(found != held.end(), op, ": no weight is held under ", number);
  return found->second;
}

// oneDNN builds a primitive for each row count it is given and keeps up to 1,024 of them (~0.5 MB each, and another
// cache of ideep's holds them too): an encoder fed prompts of every length (rows x tokens) grew a server's memory by
// ~440 MB, and each new count cost ~1 ms of building a product. Counts past kExactRows (the step's: one per row
// count) are padded to one of kSizesPerOctave sizes an octave, so few sizes recur: at most 1/16 more rows.
constexpr int64_t kExactRows = 64, kSizesPerOctave = 16;

int64_t padded_rows(int64_t m) {
  if (m <= kExactRows) return m;
  const int64_t size = (int64_t{1} << (63 - __builtin_clzll(static_cast<uint64_t>(m)))) / kSizesPerOctave;
  return (m + size - 1) / size * size;
}

// x [M, K] contiguous, with zero rows added up to `rows`
at::Tensor with_rows(const at::Tensor& x, int64_t rows) {
  if (x.size(0) == rows) return x.contiguous();
  at::Tensor out = at::empty({rows, x.size(1)}, x.options());
  out.narrow(0, 0, x.size(0)).copy_(x);
  out.narrow(0, x.size(0), rows - x.size(0)).zero_();
  return out;
}

void onednn_release(int64_t number) {
  std::lock_guard<std::mutex> lock(held_mutex);
  held.erase(number);
}

// weight [N, K] int8 -> the number its prepacked copy is held under (until onednn_release)
int64_t onednn_int8_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "onednn_int8_pack: weight must be [N, K] int8");
  static const c10::OperatorHandle prepack = onednn_op("onednn::qlinear_prepack");
  torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
  prepack.callBoxed(&stack);
  return hold(stack.at(0).toTensor());
}

// q [M, K] uint8: each row's int8 levels + 128 (oneDNN's fast kernels without AMX take unsigned activations only);
// scale [N] the weight's per channel -> [M, N] float32 = (sum_k (q - 128) w) * scale, not yet times the rows' scales
at::Tensor onednn_int8_matmul(const at::Tensor& q, int64_t number, const at::Tensor& scale,
                              const at::Tensor& zero_point) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "onednn_int8_matmul: q must be [M, K] uint8");
  at::Tensor weight = held_weight(number, "onednn_int8_matmul");
  static const c10::OperatorHandle product = onednn_op("onednn::qlinear_pointwise");
  torch::jit::Stack stack{with_rows(q, padded_rows(q.size(0))), 1.0, int64_t{128}, weight, scale, zero_point,
                          c10::IValue(), 1.0, int64_t{0}, at::kFloat, "none",
                          c10::List<std::optional<at::Scalar>>(), ""};
  product.callBoxed(&stack);
  return stack.at(0).toTensor().narrow(0, 0, q.size(0));
}

// weight [N, K] float32 or bfloat16 -> the number its copy, laid out by oneDNN for products of about `rows` rows,
// is held under (until onednn_release)
int64_t onednn_float_pack(const at::Tensor& weight, int64_t rows) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "onednn_float_pack: weight must be [N, K] float32 or bfloat16");
  static const c10::OperatorHandle reorder = onednn_op("mkldnn::_reorder_linear_weight");
  torch::jit::Stack stack{weight.contiguous(), rows};
  reorder.callBoxed(&stack);
  return hold(stack.at(0).toTensor());
}

// x [M, K] of the weight's dtype -> x @ weight.T [M, out_features] (out_features: the weight's N, for the graphs'
// shapes)
at::Tensor onednn_float_linear(const at::Tensor& x, int64_t number, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, "onednn_float_linear: x must be [M, K]");
  at::Tensor weight = held_weight(number, "onednn_float_linear");
  static const c10::OperatorHandle linear = onednn_op("mkldnn::_linear_pointwise");
  torch::jit::Stack stack{with_rows(x, padded_rows(x.size(0))), weight, c10::IValue(), "none",
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  linear.callBoxed(&stack);
  return stack.at(0).toTensor().narrow(0, 0, x.size(0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) {
  m.def("onednn_int8_pack(Tensor weight) -> int");
  m.def("onednn_int8_matmul(Tensor q, int number, Tensor scale, Tensor zero_point) -> Tensor");
  m.def("onednn_float_pack(Tensor weight, int rows) -> int");
  m.def("onednn_float_linear(Tensor x, int number, int out_features) -> Tensor");
  m.def("onednn_release(int number) -> ()", &onednn_release);  // no tensor to dispatch on
}

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) {
  m.impl("onednn_int8_pack", &onednn_int8_pack);
  m.impl("onednn_int8_matmul", &onednn_int8_matmul);
  m.impl("onednn_float_pack", &onednn_float_pack);
  m.impl("onednn_float_linear", &onednn_float_linear);
}
