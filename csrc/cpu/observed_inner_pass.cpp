// The second pass of the observed CPU kernel on path "units" (observed_inner_pass.h): its entry
// points (observed_kernels.h), cloned per instruction set.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include "observed_inner_pass.h"

namespace mf_ext {

MF_EXT_TARGET_CLONES void run_inner_unit_float(const ObservedProblem<float>& pb,
                                               const Bucketed<float>& bk, int64_t unit) {
  run_inner_unit_nv(pb, bk, unit);
}
MF_EXT_TARGET_CLONES void run_inner_unit_double(const ObservedProblem<double>& pb,
                                                const Bucketed<double>& bk, int64_t unit) {
  run_inner_unit_nv(pb, bk, unit);
}

}  // namespace mf_ext
