// Entry guards: the argument checks every kernel entry (CPU and CUDA) runs first.
//
// The Python ops check arguments and give users their error messages, but
// torch.ops.fastmeta_C.* can be called directly, so each kernel checks for itself,
// with these helpers, everything it relies on to stay in bounds: each tensor's
// dimensions, dtype and contiguity, the sizes the arguments share, one device of the
// kernel's type, and 0-d scalar tensors (tau, b2, a learning rate). A failed check is
// a TORCH_CHECK (RuntimeError in Python) naming the kernel, the argument and what it
// got (shape, dtype, device). All checks are O(1) host work on the tensors' metadata:
// no element is read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace fastmeta {

// The dtypes a kernel is compiled for (AT_DISPATCH_FLOATING_TYPES and _AND2 half).
inline constexpr at::ScalarType kFloating[] = {at::kFloat, at::kDouble};
inline constexpr at::ScalarType kFloatingOrHalf[] = {at::kFloat, at::kDouble, at::kHalf,
                                                     at::kBFloat16};
inline constexpr at::ScalarType kInt64[] = {at::kLong};
inline constexpr at::ScalarType kUint8[] = {at::kByte};

// One tensor argument and its name in the schema.
struct Arg {
  const char* name;
  const at::Tensor& tensor;
};

// "[2, 3] Float on cpu", plus the strides when not contiguous ("an undefined tensor").
std::string describe(const at::Tensor& t);

// t is a defined, contiguous tensor of `dim` dimensions (any number for kAnyDim; 0
// for a scalar tensor: tau, b2, a learning rate) with a dtype of `dtypes`.
constexpr int64_t kAnyDim = -1;
void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                  c10::ArrayRef<at::ScalarType> dtypes);

// Every tensor has the first one's dtype.
void check_same_dtype(const char* op, std::initializer_list<Arg> args);

// Every tensor is on the first one's device, which is of the kernel's type (kCPU,
// kCUDA). A CPU kernel handed a meta or CUDA tensor would read a pointer it cannot.
void check_same_device(const char* op, c10::DeviceType type, std::initializer_list<Arg> args);

// t.size(dim) == expected, the size `other` gives it (e.g. "B of queries").
void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                int64_t expected, const char* other);

// t has exactly `shape` (`what` names it in the message, e.g. "[B, M] like labels").
void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 const char* what);

// value is an index into `names`, the choices of an enum argument (e.g. "cosine (2)"),
// which the message lists.
void check_enum(const char* op, const char* name, int64_t value,
                std::initializer_list<const char*> names);

// labels: contiguous int64 [B, S] (the values are the kernels' business).
void check_labels(const char* op, const char* name, const at::Tensor& labels, int64_t B, int64_t S);

}  // namespace fastmeta
