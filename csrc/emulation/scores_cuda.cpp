// The CUDA emulation build of csrc/cuda/scores_cuda.cu: the real source, compiled as C++ against
// cuda_emu.h (docs/emulation.md); it registers its kernels for the CPU dispatch key.
#include "../cuda/scores_cuda.cu"

// A CUDA tensor given to the emulation build (a CUDA build of torch with this package built as the
// emulation) reaches the same functions, whose DeviceGuard says what this build is.
TORCH_LIBRARY_IMPL(pddm_ext, CUDA, m) {
  m.impl("scores", &pddm_ext::cuda::scores_cuda);
  m.impl("scores_backward", &pddm_ext::cuda::scores_backward_cuda);
}
