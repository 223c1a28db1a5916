// The CUDA emulation build of csrc/cuda/mine_cuda.cu: the real source, compiled as C++ against
// cuda_emu.h (docs/emulation.md). Nothing here but the include.
#include "../cuda/mine_cuda.cu"
