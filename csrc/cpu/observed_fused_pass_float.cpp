// The fused pass of the observed CPU kernel for float (observed_fused_pass.h).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include "observed_fused_pass.h"

namespace mf_ext {

MF_EXT_RUN_CHUNKS(run_chunks_float, float, false)
MF_EXT_RUN_CHUNKS(run_chunks_keep_float, float, true)

}  // namespace mf_ext
