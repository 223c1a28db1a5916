// The CUDA emulation's runtime (cuda_emu.h, docs/emulation.md): fibers, barriers, the block
// scheduler with its thread orders, shared memory, and the H200 device model.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace pddm_emu {

// ---- fibers: a minimal x86-64 context switch (callee-saved registers, MXCSR, x87 control word) ----
extern "C" void pddm_emu_switch(void** save_sp, void* new_sp);
extern "C" void pddm_emu_fiber_entry();
extern "C" __attribute__((visibility("hidden"), used)) void pddm_emu_fiber_main(ThreadState* t);

asm(R"(
  .text
  .globl pddm_emu_switch
  .hidden pddm_emu_switch
  .type pddm_emu_switch,@function
pddm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pddm_emu_switch, .-pddm_emu_switch

  .globl pddm_emu_fiber_entry
  .hidden pddm_emu_fiber_entry
  .type pddm_emu_fiber_entry,@function
pddm_emu_fiber_entry:
  movq %r12, %rdi
  call pddm_emu_fiber_main
  ud2
  .size pddm_emu_fiber_entry, .-pddm_emu_fiber_entry
)");

enum class Wait { None, Block, Warp, Yield, Done };

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread, plus one guard page below it
constexpr int kShuffleSlot = 16;
constexpr unsigned char kPoison = 0xff;  // 0xffffffff / 0xffff...ff: NaN as float and as double
constexpr long kMaxIdleRounds = 1L << 16;  // rounds in which only __nanosleep spinners ran

const char* wait_name(Wait w) {
  switch (w) {
    case Wait::None: return "running";
    case Wait::Block: return "waiting at __syncthreads";
    case Wait::Warp: return "waiting at a warp barrier (shuffle / __syncwarp)";
    case Wait::Yield: return "spinning in __nanosleep";
    case Wait::Done: return "returned";
  }
  return "?";
}

}  // namespace

// One asynchronous copy in flight (copy_async): its destination and the source bytes read at its start.
struct PendingCopy {
  unsigned char* dst;
  unsigned char bytes[16];
  size_t size;
};

struct ThreadState {
  void* sp = nullptr;
  BlockState* block = nullptr;
  dim3 idx;
  int linear = 0;
  Wait wait = Wait::None;
  unsigned warp_mask = 0;
  int exchanges = 0;  // warp exchanges done (double-buffered slots)
  uint64_t votes = 0;  // block votes (__syncthreads_or / _count / _and) done
  size_t static_cursor = 0;
  bool probe = false;  // the attribute probe: returns at PDDM_SHARED_DECLARED
  bool probe_reached = false;
  std::vector<PendingCopy> copies;  // started, not yet landed (copy_async)
};

struct BlockState {
  const Launch* launch = nullptr;
  dim3 idx, dim, grid;
  int threads = 0;
  unsigned char* dynamic = nullptr;
  unsigned char* statics = nullptr;
  size_t dynamic_bytes = 0;
  size_t static_capacity = 0;
  size_t static_used = 0;
  size_t static_limit = 0;
  std::vector<unsigned char> exchange;  // 2 x threads x kShuffleSlot
  struct Vote {
    int sum = 0, readers = 0;
  };
  std::unordered_map<uint64_t, Vote> votes;  // open block votes by round (erased once all have read)
  void* scheduler_sp = nullptr;
  std::exception_ptr error;
};

thread_local ThreadState* tl_thread = nullptr;

namespace {

// ---- per-OS-thread memory: fiber stacks and shared memory, reused across blocks and launches ----
struct Arena {
  std::vector<void*> stacks;  // each kStackBytes + a guard page, top of stack = base + size
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> dynamic, statics;

  unsigned char* stack_top(int i) {
    while (int(stacks.size()) <= i) {
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
      mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
      stacks.push_back(p);
    }
    return static_cast<unsigned char*>(stacks[i]) + page + kStackBytes;
  }
  ~Arena() {
    for (void* p : stacks) munmap(p, kStackBytes + page);
  }
};
thread_local Arena tl_arena;

// ---- thread order ----------------------------------------------------------------------------------
enum class Order { Forward, Reverse, Random };
struct OrderSetting {
  Order order = Order::Random;
  uint64_t seed = 0x5eed;
};

OrderSetting read_order() {
  OrderSetting s;
  const char* env = std::getenv("PDDM_EMU_ORDER");
  if (env == nullptr || *env == '\0') return s;
  const std::string v(env);
  if (v == "forward") {
    s.order = Order::Forward;
  } else if (v == "reverse") {
    s.order = Order::Reverse;
  } else if (v.rfind("random", 0) == 0) {
    s.order = Order::Random;
    if (v.size() > 6) {
      TORCH_CHECK(v[6] == ':' && v.size() > 7, "PDDM_EMU_ORDER: expected random or random:SEED, got '", v, "'");
      s.seed = std::stoull(v.substr(7), nullptr, 0);
    }
  } else {
    TORCH_CHECK(false, "PDDM_EMU_ORDER must be forward, reverse, random or random:SEED, got '", v, "'");
  }
  return s;
}

std::atomic<uint64_t> g_launches{0};
std::mutex g_log_mutex;
std::deque<std::pair<std::string, int64_t>> g_launch_log;  // take_launch_log

// ---- the device model's per-kernel state ------------------------------------------------------
struct FuncInfo {
  int max_dynamic = int(kDefaultDynamicSmem);
  size_t static_bytes = 0;
  bool probed = false;
};
std::mutex g_funcs_mutex;
std::unordered_map<const void*, FuncInfo> g_funcs;
std::unordered_map<std::string, int64_t> g_last_smem;  // by kernel name (last_launch_smem), under g_funcs_mutex

thread_local cudaError_t tl_last_error = cudaSuccess;
thread_local std::string tl_last_message;

cudaError_t fail(cudaError_t err, std::string message) {
  tl_last_error = err;
  tl_last_message = std::move(message);
  return err;
}

ThreadState& current(const char* what) {
  if (tl_thread == nullptr) {
    std::fprintf(stderr, "CUDA emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return *tl_thread;
}

void suspend(ThreadState& t, Wait w) {
  if (t.probe) {
    TORCH_CHECK(false, "CUDA emulation: the attribute probe of a kernel reached a barrier: every kernel must declare ",
                "its shared memory and then PDDM_SHARED_DECLARED() before anything else");
  }
  t.wait = w;
  pddm_emu_switch(&t.sp, t.block->scheduler_sp);
}

std::string dim_str(const dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}

}  // namespace

extern "C" void pddm_emu_fiber_main(ThreadState* t) {
  BlockState* b = t->block;
  try {
    b->launch->body(b->launch->ctx);
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  t->wait = Wait::Done;
  pddm_emu_switch(&t->sp, b->scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

const dim3& thread_idx() { return current("threadIdx").idx; }
const dim3& block_idx() { return current("blockIdx").block->idx; }
const dim3& block_dim() { return current("blockDim").block->dim; }
const dim3& grid_dim() { return current("gridDim").block->grid; }
int lane_id() { return current("lane").linear % 32; }

void syncthreads() { suspend(current("__syncthreads"), Wait::Block); }

// __syncthreads_count and friends: a barrier that also sums one predicate over the block. Each
// thread adds its vote to this round's tally before the barrier and reads it after; the tally is
// dropped when the last thread has read it, so rounds never share a counter.
int syncthreads_count(int predicate) {
  ThreadState& t = current("__syncthreads_count");
  BlockState* b = t.block;
  const uint64_t round = t.votes++;
  b->votes[round].sum += predicate != 0;
  suspend(t, Wait::Block);
  auto it = b->votes.find(round);
  const int sum = it->second.sum;
  if (++it->second.readers == b->threads) b->votes.erase(it);
  return sum;
}
void yield_thread() {
  ThreadState& t = current("__nanosleep");
  if (t.probe) return;
  suspend(t, Wait::Yield);
}
void syncwarp(unsigned mask) {
  ThreadState& t = current("__syncwarp");
  TORCH_CHECK(mask & (1u << (t.linear % 32)), "CUDA emulation: __syncwarp mask excludes the calling lane");
  t.warp_mask = mask;
  suspend(t, Wait::Warp);
}

void warp_exchange(const void* mine, void* theirs, size_t bytes, int src_lane, unsigned mask) {
  ThreadState& t = current("__shfl_sync");
  BlockState& b = *t.block;
  TORCH_CHECK(mask & (1u << (t.linear % 32)), "CUDA emulation: shuffle mask excludes the calling lane");
  TORCH_CHECK(mask & (1u << src_lane), "CUDA emulation: shuffle reads lane ", src_lane, " outside the mask");
  // Double-buffered slots: a lane rewrites a slot only two exchanges later, when every lane of the
  // warp has passed the barrier of the exchange in between (and so has read the slot).
  const size_t buffer = size_t(t.exchanges++ & 1) * size_t(b.threads) * kShuffleSlot;
  std::memcpy(&b.exchange[buffer + size_t(t.linear) * kShuffleSlot], mine, bytes);
  t.warp_mask = mask;
  suspend(t, Wait::Warp);
  const int src = (t.linear / 32) * 32 + src_lane;
  TORCH_CHECK(src < b.threads, "CUDA emulation: shuffle reads lane ", src_lane, " of a partial warp");
  std::memcpy(theirs, &b.exchange[buffer + size_t(src) * kShuffleSlot], bytes);
}

unsigned char* dynamic_shared() {
  ThreadState& t = current("extern __shared__");
  return t.block->dynamic;
}

void* static_shared(size_t bytes, size_t align, const char* name) {
  ThreadState& t = current("__shared__");
  BlockState& b = *t.block;
  const size_t offset = (t.static_cursor + align - 1) / align * align;
  t.static_cursor = offset + bytes;
  b.static_used = std::max(b.static_used, t.static_cursor);
  TORCH_CHECK(b.static_used <= b.static_capacity && b.static_used <= kMaxStaticSmem,
              "CUDA emulation: kernel '", b.launch->name, "': static shared memory exceeds 48 KB at '", name, "'");
  TORCH_CHECK(b.static_limit == 0 || b.static_used <= b.static_limit, "CUDA emulation: kernel '", b.launch->name,
              "': static (", b.static_used, " bytes) plus dynamic shared memory exceed the block's 227 KB");
  return b.statics + offset;
}

bool probing() {
  ThreadState& t = current("PDDM_SHARED_DECLARED");
  if (t.probe) t.probe_reached = true;
  return t.probe;
}

void copy_async(void* dst, const void* src, size_t bytes) {
  ThreadState& t = current("cp.async");
  BlockState& b = *t.block;
  const auto d = static_cast<unsigned char*>(dst);
  const auto s = static_cast<const unsigned char*>(src);
  const auto in = [](const unsigned char* p, size_t n, const unsigned char* base, size_t size) {
    return p >= base && p + n <= base + size;
  };
  const bool d_shared = in(d, bytes, b.dynamic, b.dynamic_bytes) || in(d, bytes, b.statics, b.static_capacity);
  const bool s_shared = in(s, 1, b.dynamic, b.dynamic_bytes) || in(s, 1, b.statics, b.static_capacity);
  TORCH_CHECK(bytes == 4 || bytes == 8 || bytes == 16, "CUDA emulation: cp.async copies 4, 8 or 16 bytes, not ", bytes);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(d) % bytes == 0 && reinterpret_cast<uintptr_t>(s) % bytes == 0,
              "CUDA emulation: cp.async of ", bytes, " bytes needs both addresses aligned to ", bytes, " bytes");
  TORCH_CHECK(d_shared, "CUDA emulation: cp.async: the destination is not in the block's shared memory");
  TORCH_CHECK(!s_shared, "CUDA emulation: cp.async: the source is in shared memory, not global memory");
  PendingCopy c;
  c.dst = d;
  c.size = bytes;
  std::memcpy(c.bytes, s, bytes);
  std::memset(d, kPoison, bytes);
  t.copies.push_back(c);
}

// Groups matter only to a wait for all but the newest groups (cp.async.wait_group N > 0), which
// the kernels do not use: wait_all lands every copy, committed or not, as on a GPU.
void copy_async_commit() { current("cp.async.commit_group"); }

void copy_async_wait_all() {
  ThreadState& t = current("cp.async.wait_all");
  for (const PendingCopy& c : t.copies) std::memcpy(c.dst, c.bytes, c.size);
  t.copies.clear();
}

namespace {

// Runs the kernel body once on the calling OS thread with default-constructed parameters, up to its
// PDDM_SHARED_DECLARED(): the static shared memory the kernel declares.
size_t probe_static_bytes(const char* name, void (*probe)(const void*), const void* func) {
  Launch l{name, func, dim3(1), dim3(1), 0, nullptr, nullptr, probe};
  BlockState b;
  b.launch = &l;
  b.threads = 1;
  std::vector<unsigned char> dyn(16, kPoison);
  std::vector<unsigned char> stat(kMaxStaticSmem + 64, kPoison);
  b.dynamic = dyn.data();
  b.statics = stat.data();
  b.static_capacity = kMaxStaticSmem;
  ThreadState t;
  t.block = &b;
  t.probe = true;
  ThreadState* saved = tl_thread;
  tl_thread = &t;
  try {
    probe(func);
  } catch (...) {
    tl_thread = saved;
    throw;
  }
  tl_thread = saved;
  TORCH_CHECK(t.probe_reached, "CUDA emulation: kernel '", name,
              "' has no PDDM_SHARED_DECLARED() after its shared memory declarations");
  return b.static_used;
}

FuncInfo& func_info_locked(const void* func, const char* name, void (*probe)(const void*)) {
  FuncInfo& info = g_funcs[func];
  if (!info.probed && probe != nullptr) {
    info.static_bytes = probe_static_bytes(name, probe, func);
    info.probed = true;
  }
  return info;
}

// Runs one block to completion; returns an error message (empty: success).
std::string run_block(BlockState& b, const OrderSetting& order, std::mt19937_64& rng) {
  const int n = b.threads;
  std::vector<ThreadState> threads(n);
  for (int i = 0; i < n; ++i) {
    ThreadState& t = threads[i];
    t.block = &b;
    t.linear = i;
    t.idx = dim3(unsigned(i) % b.dim.x, (unsigned(i) / b.dim.x) % b.dim.y, unsigned(i) / (b.dim.x * b.dim.y));
    // Initial frame for pddm_emu_switch: FPU control word, MXCSR, r15..r12 (r12 = the thread), rbx,
    // rbp, then the return address (the entry trampoline). The top is 16-byte aligned.
    auto* top = reinterpret_cast<uint64_t*>(tl_arena.stack_top(i));
    uint64_t* frame = top - 9;
    frame[0] = 0x037f;           // x87 control word (default)
    frame[1] = 0x1f80;           // MXCSR (default: all exceptions masked, round to nearest)
    frame[2] = frame[3] = frame[4] = 0;  // r15, r14, r13
    frame[5] = reinterpret_cast<uint64_t>(&t);  // r12
    frame[6] = frame[7] = 0;     // rbx, rbp
    frame[8] = reinterpret_cast<uint64_t>(&pddm_emu_fiber_entry);
    t.sp = frame;
  }
  std::vector<int> order_ix(n);
  int done = 0;
  long idle_rounds = 0;
  ThreadState* const saved = tl_thread;
  while (done < n) {
    for (int i = 0; i < n; ++i) order_ix[i] = order.order == Order::Reverse ? n - 1 - i : i;
    if (order.order == Order::Random) std::shuffle(order_ix.begin(), order_ix.end(), rng);
    bool progress = false;
    for (int i : order_ix) {
      ThreadState& t = threads[i];
      if (t.wait != Wait::None && t.wait != Wait::Yield) continue;
      t.wait = Wait::None;
      tl_thread = &t;
      pddm_emu_switch(&b.scheduler_sp, t.sp);
      tl_thread = saved;
      if (t.wait != Wait::Yield) progress = true;
      if (t.wait == Wait::Done) ++done;
      if (b.error) break;
    }
    if (b.error) {
      try {
        std::rethrow_exception(b.error);
      } catch (const c10::Error& e) {
        return e.what_without_backtrace();
      } catch (const std::exception& e) {
        return e.what();
      }
    }
    if (done == n) break;
    // Barriers: a warp barrier opens when every lane of its mask waits at one; __syncthreads when
    // every thread of the block waits at it.
    int at_block = 0, runnable = 0;
    for (int w0 = 0; w0 < n; w0 += 32) {
      const int lanes = std::min(32, n - w0);
      unsigned waiting = 0, mask = 0;
      for (int l = 0; l < lanes; ++l) {
        const ThreadState& t = threads[w0 + l];
        if (t.wait == Wait::Warp) waiting |= 1u << l, mask |= t.warp_mask;
      }
      if (waiting == 0) continue;
      const unsigned present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      mask &= present;
      if ((waiting & mask) == mask) {
        for (int l = 0; l < lanes; ++l) {
          if (waiting & (1u << l)) threads[w0 + l].wait = Wait::None;
        }
        progress = true;
      }
    }
    for (const ThreadState& t : threads) {
      at_block += t.wait == Wait::Block;
      runnable += t.wait == Wait::None || t.wait == Wait::Yield;
    }
    if (at_block == n) {
      for (ThreadState& t : threads) t.wait = Wait::None;
      continue;
    }
    idle_rounds = progress ? 0 : idle_rounds + 1;
    if (runnable == 0 || idle_rounds > kMaxIdleRounds) {
      std::ostringstream msg;
      msg << "CUDA emulation: deadlock in kernel '" << b.launch->name << "', block " << dim_str(b.idx)
          << (runnable == 0 ? ": no thread can proceed" : ": threads spin in __nanosleep and nothing changes") << ";";
      int counts[5] = {0, 0, 0, 0, 0};
      int first[5] = {-1, -1, -1, -1, -1};
      for (const ThreadState& t : threads) {
        const int k = int(t.wait);
        if (counts[k]++ == 0) first[k] = t.linear;
      }
      for (int k = 0; k < 5; ++k) {
        if (counts[k]) msg << " " << counts[k] << " of " << n << " threads " << wait_name(Wait(k)) << " (first: thread "
                           << first[k] << ");";
      }
      return msg.str();
    }
  }
  return {};
}

}  // namespace

cudaError_t launch(const Launch& l) {
  void (*const probe)(const void*) = l.probe;
  tl_last_error = cudaSuccess;
  const uint64_t threads = uint64_t(l.block.x) * l.block.y * l.block.z;
  const std::string where = std::string("kernel '") + l.name + "' (grid " + dim_str(l.grid) + ", block " +
                            dim_str(l.block) + ", " + std::to_string(l.smem) + " bytes of dynamic shared memory)";
  if (threads == 0 || threads > uint64_t(kMaxThreadsPerBlock) || l.block.x > kMaxBlockXY || l.block.y > kMaxBlockXY ||
      l.block.z > kMaxBlockZ || l.grid.x == 0 || l.grid.y == 0 || l.grid.z == 0 || l.grid.x > kMaxGridX ||
      l.grid.y > kMaxGridYZ || l.grid.z > kMaxGridYZ) {
    return fail(cudaErrorInvalidConfiguration, "invalid configuration argument: " + where);
  }
  FuncInfo info;
  try {
    std::lock_guard<std::mutex> lock(g_funcs_mutex);
    info = func_info_locked(l.func, l.name, probe);
    g_last_smem[l.name] = int64_t(l.smem);
  } catch (const c10::Error& e) {
    return fail(cudaErrorInvalidDeviceFunction, e.what_without_backtrace());
  }
  if (l.smem > size_t(info.max_dynamic)) {
    return fail(cudaErrorInvalidValue, "invalid argument: " + where + " exceeds the kernel's maximum of " +
                                           std::to_string(info.max_dynamic) +
                                           " bytes (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  }
  if (l.smem + info.static_bytes > kMaxSmemPerBlockOptin) {
    return fail(cudaErrorLaunchOutOfResources, "too many resources requested for launch: " + where + " plus " +
                                                   std::to_string(info.static_bytes) + " bytes of static shared memory");
  }
  {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_launch_log.emplace_back(l.name, int64_t(l.grid.x));
    if (g_launch_log.size() > 4096) g_launch_log.pop_front();
  }
  static const OrderSetting order = read_order();
  std::mt19937_64 rng(order.seed * 0x9e3779b97f4a7c15ull + g_launches.fetch_add(1));
  Arena& arena = tl_arena;
  // Dynamic shared memory 128-byte aligned (the kernels' __align__(128)), static 16-byte; both
  // buffers poisoned per block.
  arena.dynamic.resize(l.smem + 128);
  arena.statics.resize(kMaxStaticSmem + 16);
  auto align16 = [](unsigned char* p) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t(15));
  };
  const uint64_t blocks = uint64_t(l.grid.x) * l.grid.y * l.grid.z;
  std::vector<uint64_t> block_order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) block_order[i] = order.order == Order::Reverse ? blocks - 1 - i : i;
  if (order.order == Order::Random) std::shuffle(block_order.begin(), block_order.end(), rng);
  BlockState b;
  b.launch = &l;
  b.dim = l.block;
  b.grid = l.grid;
  b.threads = int(threads);
  b.dynamic = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(arena.dynamic.data()) + 127) &
                                               ~uintptr_t(127));
  b.statics = align16(arena.statics.data());
  b.dynamic_bytes = l.smem;
  b.static_capacity = kMaxStaticSmem;
  b.static_limit = kMaxSmemPerBlockOptin - l.smem;
  b.exchange.assign(2 * threads * kShuffleSlot, kPoison);
  for (uint64_t k : block_order) {
    b.idx = dim3(unsigned(k % l.grid.x), unsigned((k / l.grid.x) % l.grid.y), unsigned(k / (uint64_t(l.grid.x) * l.grid.y)));
    b.static_used = 0;
    b.error = nullptr;
    std::memset(b.dynamic, kPoison, l.smem);
    std::memset(b.statics, kPoison, kMaxStaticSmem);
    std::string err = run_block(b, order, rng);
    if (!err.empty()) return fail(cudaErrorLaunchFailure, err + " [" + where + "]");
  }
  return cudaSuccess;
}

void check_launch(const char* file, int line) {
  const cudaError_t err = tl_last_error;
  tl_last_error = cudaSuccess;
  if (err != cudaSuccess) {
    TORCH_CHECK(false, "CUDA error (emulated): ", cudaGetErrorString(err), ": ", tl_last_message, " at ", file, ":",
                line);
  }
}

void check_call(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) {
    const std::string detail = tl_last_message;
    tl_last_error = cudaSuccess;
    TORCH_CHECK(false, "CUDA error (emulated): ", cudaGetErrorString(err), " in ", expr, " (", detail, ") at ", file,
                ":", line);
  }
}

void log_note(const char* what, int64_t value) {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_launch_log.emplace_back(what, value);
  if (g_launch_log.size() > 4096) g_launch_log.pop_front();
}

std::vector<std::pair<std::string, int64_t>> take_launch_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<std::pair<std::string, int64_t>> log(g_launch_log.begin(), g_launch_log.end());
  g_launch_log.clear();
  return log;
}

int sm_count() {
  const char* env = std::getenv("PDDM_EMU_SM_COUNT");
  if (env == nullptr || *env == '\0') return kSmCount;
  const int sms = std::atoi(env);
  TORCH_CHECK(sms >= 1 && sms <= 4096, "PDDM_EMU_SM_COUNT must be an integer in [1, 4096], got '", env, "'");
  return sms;
}

int64_t backward_budget_bytes(int64_t fallback) {
  const char* env = std::getenv("PDDM_EMU_BACKWARD_BUDGET");
  if (env == nullptr || *env == '\0') return fallback;
  const long long bytes = std::atoll(env);
  TORCH_CHECK(bytes >= 1, "PDDM_EMU_BACKWARD_BUDGET must be a positive number of bytes, got '", env, "'");
  return int64_t(bytes);
}

// The architecture the emulated kernels count as compiled for (cudaFuncAttributes::ptxVersion):
// PDDM_EMU_PTX_VERSION, default 90 (sm_90, the H200 of the device model).
int ptx_version() {
  static const int version = [] {
    const char* env = std::getenv("PDDM_EMU_PTX_VERSION");
    return env != nullptr && *env != '\0' ? std::atoi(env) : 90;
  }();
  return version;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* func, void (*probe)(const void*)) {
  std::lock_guard<std::mutex> lock(g_funcs_mutex);
  FuncInfo* info;
  try {
    info = &func_info_locked(func, "kernel", probe);
  } catch (const c10::Error& e) {
    return fail(cudaErrorInvalidDeviceFunction, e.what_without_backtrace());
  }
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = attr->binaryVersion = ptx_version();
  attr->sharedSizeBytes = info->static_bytes;
  attr->maxThreadsPerBlock = kMaxThreadsPerBlock;
  attr->maxDynamicSharedSizeBytes = info->max_dynamic;
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value, void (*probe)(const void*)) {
  std::lock_guard<std::mutex> lock(g_funcs_mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return fail(cudaErrorInvalidValue, "the emulation models cudaFuncAttributeMaxDynamicSharedMemorySize only");
  }
  FuncInfo* info;
  try {
    info = &func_info_locked(func, "kernel", probe);
  } catch (const c10::Error& e) {
    return fail(cudaErrorInvalidDeviceFunction, e.what_without_backtrace());
  }
  if (value < 0 || size_t(value) + info->static_bytes > kMaxSmemPerBlockOptin) {
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                                           "): above the device's 227 KB less " + std::to_string(info->static_bytes) +
                                           " bytes of static shared memory");
  }
  info->max_dynamic = value;
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void* func, int threads, size_t smem, void (*probe)(const void*)) {
  cudaFuncAttributes attr;
  const cudaError_t err = func_get_attributes(&attr, func, probe);
  if (err != cudaSuccess) return err;
  if (threads <= 0 || threads > kMaxThreadsPerBlock) {
    *blocks = 0;
    return cudaSuccess;
  }
  const size_t per_block = smem + attr.sharedSizeBytes + 1024;  // 1 KB reserved per block on sm_90
  int by_smem = int(kSmemPerSm / per_block);
  int by_threads = kMaxThreadsPerSm / (((threads + 31) / 32) * 32);
  *blocks = std::max(0, std::min({by_smem, by_threads, kMaxBlocksPerSm}));
  return cudaSuccess;
}

int64_t last_launch_smem(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_funcs_mutex);
  const auto it = g_last_smem.find(name);
  return it == g_last_smem.end() ? -1 : it->second;
}

void check_device(const c10::Device& device) {
  TORCH_CHECK(device.is_cpu(), "pddm_ext was built as the CUDA emulation (PDDM_EXT_CUDA_EMULATION=1, "
              "docs/emulation.md): its CUDA kernels run on CPU tensors only, got a tensor on ", device,
              "; build the package normally for a real GPU");
}

}  // namespace pddm_emu

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = pddm_emu::tl_last_error;
  pddm_emu::tl_last_error = cudaSuccess;
  return err;
}
