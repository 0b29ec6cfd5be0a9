// Entry guards shared by every kernel (checks.h).
#include "checks.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace fastmeta {
namespace {

// "Float or Double".
std::string dtype_list(c10::ArrayRef<at::ScalarType> dtypes) {
  std::string out;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    out += c10::str(i == 0 ? "" : i + 1 == dtypes.size() ? " or " : ", ", dtypes[i]);
  }
  return out;
}

}  // namespace

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::string out = c10::str(t.sizes(), " ", t.scalar_type(), " on ", t.device());
  if (!t.is_contiguous()) out += c10::str(", non-contiguous (strides ", t.strides(), ")");
  return out;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                  c10::ArrayRef<at::ScalarType> dtypes) {
  bool dtype_ok = false;
  for (const at::ScalarType d : dtypes) dtype_ok |= t.defined() && t.scalar_type() == d;
  const bool ok =
      t.defined() && (dim == kAnyDim || t.dim() == dim) && dtype_ok && t.is_contiguous();
  TORCH_CHECK(ok, op, ": ", name, " must be a contiguous ",
              dim == kAnyDim ? std::string("tensor") : c10::str(dim, "-d tensor"), " of ",
              dtype_list(dtypes), ", got ", describe(t));
}

void check_same_dtype(const char* op, std::initializer_list<Arg> args) {
  const Arg& first = *args.begin();
  for (const Arg& arg : args) {
    TORCH_CHECK(arg.tensor.scalar_type() == first.tensor.scalar_type(), op, ": ", arg.name,
                " must have the dtype of ", first.name, " (", first.tensor.scalar_type(), "), got ",
                describe(arg.tensor));
  }
}

void check_same_device(const char* op, c10::DeviceType type, std::initializer_list<Arg> args) {
  const Arg& first = *args.begin();
  TORCH_CHECK(first.tensor.device().type() == type, op, ": this kernel runs on ",
              c10::DeviceTypeName(type, /*lower_case=*/true), " tensors, got ", first.name, " ",
              describe(first.tensor));
  for (const Arg& arg : args) {
    TORCH_CHECK(arg.tensor.device() == first.tensor.device(), op, ": ", arg.name,
                " must be on the device of ", first.name, " (", first.tensor.device(), "), got ",
                describe(arg.tensor));
  }
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                int64_t expected, const char* other) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, " has size ", t.size(dim), " in dim ", dim,
              " where ", other, " is ", expected, ", got ", describe(t));
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 const char* what) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must be ", shape, " (", what, "), got ",
              describe(t));
}

void check_enum(const char* op, const char* name, int64_t value,
                std::initializer_list<const char*> names) {
  std::string choices;
  for (const char* choice : names) choices += c10::str(choices.empty() ? "" : ", ", choice);
  TORCH_CHECK(value >= 0 && value < static_cast<int64_t>(names.size()), op, ": ", name,
              " must be one of ", choices, ", got ", value);
}

void check_labels(const char* op, const char* name, const at::Tensor& labels, int64_t B,
                  int64_t S) {
  TORCH_CHECK(labels.defined() && labels.scalar_type() == at::kLong && labels.dim() == 2 &&
                  labels.size(0) == B && labels.size(1) == S && labels.is_contiguous(),
              op, ": ", name, " must be a contiguous int64 [", B, ", ", S, "] tensor, got ",
              describe(labels));
}

}  // namespace fastmeta
