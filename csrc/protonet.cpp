// Argument checks shared by the CPU and CUDA Prototypical-Networks kernels.
#include "protonet.h"

#include <c10/util/Exception.h>

namespace fastmeta {

void check_queries_prototypes(const char* op, const at::Tensor& queries,
                              const at::Tensor& prototypes) {
  TORCH_CHECK(prototypes.device() == queries.device(), op,
              ": queries and prototypes must be on one device, got ", queries.device(), " and ",
              prototypes.device());
  TORCH_CHECK(queries.dim() == 3 && prototypes.dim() == 3 && queries.is_contiguous() &&
                  prototypes.is_contiguous() && queries.size(0) == prototypes.size(0) &&
                  queries.size(2) == prototypes.size(2) &&
                  queries.scalar_type() == prototypes.scalar_type(),
              op, ": queries [B, M, D] and prototypes [B, C, D] must be contiguous and agree, got ",
              queries.sizes(), " and ", prototypes.sizes());
}

}  // namespace fastmeta
