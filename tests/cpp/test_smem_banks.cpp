// Bank conflicts of the tile kernels' shared-memory accesses (csrc/cuda/smem_layout.h), checked on the
// host: every access pattern of pair_gemm (but the WMMA loads and stores of its tensor-core path, whose
// per-lane pattern is not documented) and of the workspace epilogues is evaluated for the 32 lanes
// of each warp with the same layout functions the kernels call, and its conflict degree computed
// under the hardware's rule (32 banks of 4 bytes; 4-, 8- and 16-byte accesses served per 32, 16
// and 8 lanes; lanes touching the same 4-byte word share it). Every pattern must be conflict-free
// (degree 1). The layout before the bank-conflict fix is modelled too, and must show its known conflicts (2-way
// weight loads, 8-way workspace stores): the check can fail. Built and run by CMakeLists.txt
// (ctest); no GPU, nvcc or torch needed.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <string>

#include "../../csrc/cuda/smem_layout.h"

namespace L = pddm_ext::cuda::layout;

namespace {

int failures = 0, checks = 0;

// (byte address, or -1 for an inactive lane) of lane `lane` of warp `warp` for one access.
using Access = std::function<int64_t(int warp, int lane)>;

// Conflict degree of one warp-wide access of `width` bytes: the worst, over the warp's phases, of the
// number of distinct 4-byte words that fall into one bank.
int degree(const Access& access, int width, int warp) {
  const int lanes_per_phase = width == 16 ? 8 : (width == 8 ? 16 : 32);
  int worst = 1;
  for (int phase = 0; phase < 32; phase += lanes_per_phase) {
    std::map<int, std::set<int64_t>> words_of_bank;
    for (int lane = phase; lane < phase + lanes_per_phase; ++lane) {
      const int64_t address = access(warp, lane);
      if (address < 0) continue;
      for (int b = 0; b < width; b += 4) {
        const int64_t word = (address + b) / 4;
        words_of_bank[int(word % 32)].insert(word);
      }
    }
    for (const auto& [bank, words] : words_of_bank) worst = std::max(worst, int(words.size()));
  }
  return worst;
}

// Worst degree over the block's warps.
int block_degree(const Access& access, int width) {
  int worst = 1;
  for (int warp = 0; warp < L::kThreads / 32; ++warp) worst = std::max(worst, degree(access, width, warp));
  return worst;
}

void expect_degree(const std::string& what, const Access& access, int width, int want) {
  const int got = block_degree(access, width);
  ++checks;
  if (got != want) {
    std::printf("FAIL %s: %d-way bank conflicts, expected %d\n", what.c_str(), got, want);
    ++failures;
  }
}

int tid_of(int warp, int lane) { return warp * 32 + lane; }

template <typename T>
void check_current_layout(const char* type) {
  const std::string t = std::string(" <") + type + ">";
  constexpr int S = int(sizeof(T)), per = L::vec_elems<T>();
  // pair_gemm: the staging fills (one store per element e = tid + j * kThreads).
  for (int j = 0; j < L::kPairs * L::kChunk / L::kThreads; ++j) {
    expect_degree("operand fill store, iteration " + std::to_string(j) + t, [&](int w, int l) {
      const int e = tid_of(w, l) + j * L::kThreads;
      return int64_t(L::fill_k(e) * L::a_stride<T>() + L::fill_col(e)) * S;
    }, S, 1);
  }
  for (int j = 0; j < L::kOutBlock * L::kChunk / L::kThreads; ++j) {
    expect_degree("weight fill store (rows contiguous), iteration " + std::to_string(j) + t, [&](int w, int l) {
      const int e = tid_of(w, l) + j * L::kThreads;
      return int64_t(L::fill_k(e) * L::w_stride<T>() + L::fill_col(e)) * S;
    }, S, 1);
    expect_degree("weight fill store (columns contiguous), iteration " + std::to_string(j) + t, [&](int w, int l) {
      const int e = tid_of(w, l) + j * L::kThreads;
      return int64_t((e / L::kOutBlock) * L::w_stride<T>() + e % L::kOutBlock) * S;
    }, S, 1);
  }
  // pair_gemm's inner loop: 16-byte loads of the thread's 4 operands and 8 weights of row kk.
  for (int kk = 0; kk < L::kChunk; ++kk) {
    for (int v = 0; v < 4 / per; ++v) {
      expect_degree("operand load kk=" + std::to_string(kk) + " vector " + std::to_string(v) + t, [&](int w, int l) {
        const int pg = tid_of(w, l) / L::kOutGroups;
        return int64_t(kk * L::a_stride<T>() + pg * 4 + v * per) * S;
      }, 16, 1);
    }
    for (int v = 0; v < 8 / per; ++v) {
      expect_degree("weight load kk=" + std::to_string(kk) + " vector " + std::to_string(v) + t, [&](int w, int l) {
        const int og = tid_of(w, l) % L::kOutGroups;
        return int64_t(kk * L::w_stride<T>() + L::out_column<T>(og, v * per)) * S;
      }, 16, 1);
    }
  }
  // The tensor-core path's read-back of its outputs, pass by pass (float only; not its WMMA loads and
  // stores, whose per-lane pattern is not documented). Also: the passes hand every thread exactly the
  // outputs out_column gives it in the FP32 path.
  if (sizeof(T) == 4) {
    for (int f = 0; f < 4; ++f) {
      for (int q = 0; q < 4; ++q) {
        for (int v = 0; v < 2; ++v) {
          expect_degree("tensor-core output read pass " + std::to_string(f) + " q=" + std::to_string(q) + " vector " +
                            std::to_string(v) + t,
                        [&](int w, int l) {
                          const int tid = tid_of(w, l), pg = tid / L::kOutGroups, og = tid % L::kOutGroups;
                          if (L::tensor_output_pass(og) != f) return int64_t(-1);
                          return int64_t(L::tensor_output_index(pg, og, q, v)) * S;
                        },
                        16, 1);
        }
      }
    }
    for (int tid = 0; tid < L::kThreads; ++tid) {
      const int pg = tid / L::kOutGroups, og = tid % L::kOutGroups, f = L::tensor_output_pass(og);
      for (int q = 0; q < 4; ++q) {
        for (int t8 = 0; t8 < 8; ++t8) {
          // the output (pair, column) stored at the element this thread reads
          const int e = L::tensor_output_index(pg, og, q, t8 / 4) + t8 % 4;
          int pair = -1, column = -1;
          for (int w = 0; w < L::kThreads / 32 && pair < 0; ++w) {
            const int local = e - L::tensor_output_offset(w), r = local / L::tensor_output_stride(),
                      c = local % L::tensor_output_stride();
            if (local >= 0 && r < 16 && c < 16) pair = 16 * (w % 4) + r, column = 64 * (w / 4) + 16 * f + c;
          }
          ++checks;
          if (pair != pg * 4 + q || column != L::out_column<T>(og, t8)) {
            std::printf("FAIL tensor-core pass %d: thread %d reads (%d, %d) for output (%d, %d)\n", f, tid, pair,
                        column, pg * 4 + q, L::out_column<T>(og, t8));
            ++failures;
          }
        }
      }
    }
  }
  // The workspace matrices (Z, dZ, Q, dU) for several column counts: the epilogues' stores (each
  // step (q, t) of pair_gemm's epilogue) and the staging fill's reads of them as operands.
  for (const int64_t n : {1, 7, 13, 26, 64, 100, 128, 130, 256, 257}) {
    const int64_t ld = L::workspace_stride(n);
    for (int q = 0; q < 4; ++q) {
      for (int step = 0; step < 8; ++step) {
        expect_degree("epilogue store n=" + std::to_string(n) + " q=" + std::to_string(q) + " step=" +
                          std::to_string(step) + t,
                      [&](int w, int l) {
                        const int tid = tid_of(w, l), pg = tid / L::kOutGroups, og = tid % L::kOutGroups;
                        const int col = L::out_column<T>(og, L::epilogue_slot<T>(pg, og, step));
                        return col < n ? int64_t((pg * 4 + q) * ld + col) * S : int64_t(-1);
                      },
                      S, 1);
      }
    }
    for (int j = 0; j < L::kPairs * L::kChunk / L::kThreads; ++j) {
      for (int64_t k0 = 0; k0 < n; k0 += L::kChunk) {
        expect_degree("operand fill read n=" + std::to_string(n) + " k0=" + std::to_string(k0) + " iteration " +
                          std::to_string(j) + t,
                      [&](int w, int l) {
                        const int e = tid_of(w, l) + j * L::kThreads;
                        const int64_t k = k0 + L::fill_k(e);
                        return k < n ? int64_t(L::fill_col(e) * ld + k) * S : int64_t(-1);
                      },
                      S, 1);
      }
    }
  }
  // epilogue_slot is a permutation of a thread's 8 outputs.
  for (int tid = 0; tid < L::kThreads; ++tid) {
    std::set<int> slots;
    for (int step = 0; step < 8; ++step) slots.insert(L::epilogue_slot<T>(tid / L::kOutGroups, tid % L::kOutGroups, step));
    if (slots.size() != 8 || *slots.begin() != 0 || *slots.rbegin() != 7) {
      std::printf("FAIL epilogue_slot is not a permutation for thread %d%s\n", tid, t.c_str());
      ++failures;
    }
  }
  // out_column covers the kOutBlock columns once.
  std::set<int> columns;
  for (int og = 0; og < L::kOutGroups; ++og) {
    for (int o = 0; o < 8; ++o) columns.insert(L::out_column<T>(og, o));
  }
  if (columns.size() != size_t(L::kOutBlock) || *columns.rbegin() != L::kOutBlock - 1) {
    std::printf("FAIL out_column does not cover the %d outputs%s\n", L::kOutBlock, t.c_str());
    ++failures;
  }
}

// The layout before the bank-conflict fix, modelled with the same rule: the model must see its
// conflicts.
void check_old_layout_is_caught() {
  constexpr int S = 4, a_stride = L::kPairs + 4, w_stride = L::kOutBlock + 4;
  expect_degree("old layout: weight load (8 adjacent columns per thread) <float>", [&](int w, int l) {
    const int og = tid_of(w, l) % L::kOutGroups;
    return int64_t(0 * w_stride + og * 8) * S;
  }, 16, 2);
  expect_degree("old layout: operand fill store (16 k of 2 pairs per warp) <float>", [&](int w, int l) {
    const int e = tid_of(w, l);
    return int64_t((e % L::kChunk) * a_stride + e / L::kChunk) * S;
  }, S, 2);
  expect_degree("old layout: Z store, h = 64 (ld 2h) <float>", [&](int w, int l) {
    const int tid = tid_of(w, l), pg = tid / L::kOutGroups, og = tid % L::kOutGroups;
    return int64_t((pg * 4) * 128 + og * 8) * S;
  }, S, 8);
}

}  // namespace

int main() {
  check_current_layout<float>("float");
  check_current_layout<double>("double");
  check_old_layout_is_caught();
  if (failures != 0) {
    std::printf("%d of %d check(s) failed\n", failures, checks);
    return 1;
  }
  std::printf("%d checks (access patterns, and where the tensor-core passes hand each output): the current layout "
              "is free of bank conflicts and hands every output to its FP32-path thread; the old one's conflicts are "
              "caught\n",
              checks);
  return 0;
}
