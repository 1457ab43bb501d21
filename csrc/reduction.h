// The `reduction` argument of every mf_ext op, parsed once for all kernels.
#pragma once

#include <c10/util/Exception.h>

#include <string_view>

namespace mf_ext {

enum class Reduction { Sum, Mean };

// op: the public name the error message starts with, e.g. "mf_ext.masked_mf_loss".
inline Reduction parse_reduction(const char* op, std::string_view reduction) {
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(false, op, ": reduction must be \"sum\" or \"mean\", got \"", reduction, "\"");
}

}  // namespace mf_ext
