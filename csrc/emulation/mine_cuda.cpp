// The CUDA emulation build of csrc/cuda/mine_cuda.cu: the real source, compiled as C++ against
// cuda_emu.h (docs/emulation.md); it registers its kernels for the CPU dispatch key.
#include "../cuda/mine_cuda.cu"

// A CUDA tensor given to the emulation build reaches the same functions, whose DeviceGuard says
// what this build is.
TORCH_LIBRARY_IMPL(pddm_ext, CUDA, m) {
  m.impl("mine_pddm", &pddm_ext::cuda::mine_pddm_cuda);
  m.impl("mine_euclidean", &pddm_ext::cuda::mine_euclidean_cuda);
}
