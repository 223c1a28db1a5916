// The CUDA emulation build of csrc/cuda/scores_cuda.cu: the real source, compiled as C++ against
// cuda_emu.h (docs/emulation.md). Nothing here but the include.
#include "../cuda/scores_cuda.cu"
