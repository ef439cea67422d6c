// The host runtime of fastlm._C_host: fibers, the block scheduler, warp collectives and mma.sync,
// and the sanitizer behind the memory-access hooks the kernel sources are instrumented with.
// Compiled without instrumentation. See csrc/host/emulation.h for the model.
//
// Sanitizer (what compute-sanitizer's memcheck, racecheck, initcheck and synccheck report):
// - global: an access outside every extent Python registered for the launch (when any is set);
// - shared: an access crossing the end of its __shared__ variable or the dynamic allocation, or
//   landing in the module's writable memory outside every __shared__ variable;
// - race: two threads touch the same shared byte, at least one writing, with no __syncthreads
//   (or, within a warp, a full-mask __syncwarp) between them. Each byte keeps its last writer and
//   its readers since, stamped with the block's barrier epoch E and the warp's sync epoch W; an
//   access by another thread is ordered iff E advanced, or W advanced and both are in one warp;
// - uninitialised: a shared byte read before any thread of the block wrote it;
// - barriers: a __syncthreads that some thread of the block never reaches (exited, or waiting
//   elsewhere), or reached at different call sites; a warp operation whose lanes disagree on the
//   operation or mask, name a lane that does not exist or has exited, or omit the calling lane.
// The first finding stops the launch (its fibers are abandoned) and becomes its error.

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#include "host/selftest.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fastlm {
namespace emulation {

ThreadCoords g_coords;

namespace {

// ---- fibers ----------------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void fastlm_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.hidden fastlm_emu_switch
.globl fastlm_emu_switch
.type fastlm_emu_switch,@function
fastlm_emu_switch:
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
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fastlm_emu_switch, .-fastlm_emu_switch
)");
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
constexpr size_t kDynSmemCapacity = 256 * 1024;

enum class State { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  char* stack_lo = nullptr;  // usable stack: [stack_lo, stack_lo + kStackBytes)
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::kRunnable;
  uint64_t result = 0;
  const char* wait_file = nullptr;  // where it waits (a barrier or a warp operation)
  int wait_line = 0;
  struct Copy {
    void* dst;
    const void* src;
    int src_bytes;
  };
  std::vector<Copy> uncommitted;            // cp.async issued since the last commit
  std::vector<std::vector<Copy>> in_flight;  // committed groups, oldest first
};

// One warp operation in progress: lanes of `mask` that called it so far. Lanes of one warp may be
// in several at once (disjoint masks, or lanes that will join a later one).
struct Collective {
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0, arrived = 0;
  int width = 32, dtype = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t value[32];
  int arg[32];
  float* mma_d[32];
  const uint32_t* mma_a[32];
  uint32_t mma_b[32][2];
  uint32_t* ld_r[32];
};

struct WarpState {
  std::vector<Collective> open;
  uint32_t W = 0;  // sync epoch: advances at every full-mask __syncwarp and every __syncthreads
};

// Per shared byte: the block generation it was last touched in, its last writer and its readers
// since (tid -1: none, -2: several; warp -1: several warps), each with the epochs they saw.
struct Shadow {
  uint32_t gen;
  int32_t w_tid;
  uint32_t w_E, w_W;
  int32_t r_tid, r_warp;
  uint32_t r_E, r_W;
};

struct SharedVar {
  uintptr_t lo;
  size_t size;
  std::string name;
  std::vector<Shadow> shadow;
};

struct Extent {
  uintptr_t lo;
  size_t size;
  std::string label;
};

struct Image {
  uintptr_t lo = 0, hi = 0;
  std::vector<std::pair<uintptr_t, uintptr_t>> writable;
  std::vector<SharedVar> shared;  // sorted by address
  std::vector<std::pair<uintptr_t, std::string>> functions;  // sorted by address
  std::string error;
};

// ---- state (one launch at a time) ------------------------------------------------------------

std::mutex g_launch_mutex;
Image* g_image = nullptr;
std::vector<Extent> g_extents;
SharedVar* g_last_var = nullptr;  // the __shared__ variable and the extent the last access hit
uintptr_t g_last_extent_lo = 0, g_last_extent_size = 0;
uint64_t g_seed = 0;
uint64_t g_launch_index = 0;
int g_sm_count = 132;
std::string g_report;
std::map<std::string, int64_t> g_launch_counts;  // launches per kernel instantiation

struct Launch {
  std::string kernel_name;
  dim3 grid, block;
  int nthreads = 0;
  size_t dyn_bytes = 0;
  uint64_t seed = 0;
};

Launch g_launch;
std::vector<Fiber> g_fibers;
char* g_stack_pool = nullptr;
std::vector<WarpState> g_warps;
std::vector<int> g_runnable;
int g_current = -1;
int g_exited = 0, g_at_barrier = 0;
const char* g_barrier_file = nullptr;
int g_barrier_line = 0;
uint32_t g_E = 0;   // barrier epoch of the running block
uint32_t g_gen = 0;  // block generation (shadow entries of other generations are fresh)
bool g_active = false;  // hooks check accesses only while a kernel's fiber runs
int g_error = 0;
uint64_t g_rng = 0;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;

#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_ctx;
#endif

uintptr_t g_stack_lo = 0, g_stack_size = 0;  // the running fiber's stack
uintptr_t g_host_stack_lo = 0, g_host_stack_size = 0;  // the launching thread's (launch arguments)
alignas(128) unsigned char g_dyn_smem[kDynSmemCapacity];
std::vector<Shadow> g_dyn_shadow;

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string format(const char* fmt, ...) {
  va_list ap, again;
  va_start(ap, fmt);
  va_copy(again, ap);
  const int n = vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string out(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) vsnprintf(&out[0], static_cast<size_t>(n) + 1, fmt, again);
  va_end(again);
  return out;
}

// "fastlm::(anonymous namespace)::f<float>(fastlm::(anonymous namespace)::P)::red" -> "f<float>::red"
std::string short_name(std::string s) {
  if (s.compare(0, 5, "void ") == 0) s.erase(0, 5);
  for (const char* junk : {"fastlm::(anonymous namespace)::", "(anonymous namespace)::", "fastlm::"}) {
    for (size_t at; (at = s.find(junk)) != std::string::npos;) s.erase(at, strlen(junk));
  }
  std::string out;
  int depth = 0;
  for (char ch : s) {
    if (ch == '(') ++depth;
    if (depth == 0) out += ch;
    if (ch == ')') --depth;
  }
  return out;
}

std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : name;
  free(d);
  return out;
}

// ---- the module's own image: segments, __shared__ variables and function names ---------------

int find_image(dl_phdr_info* info, size_t, void* data) {
  auto* img = static_cast<Image*>(data);
  const uintptr_t self = reinterpret_cast<uintptr_t>(&find_image);
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  bool mine = false;
  std::vector<std::pair<uintptr_t, uintptr_t>> writable;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t a = info->dlpi_addr + ph.p_vaddr, b = a + ph.p_memsz;
    lo = std::min(lo, a);
    hi = std::max(hi, b);
    if (self >= a && self < b) mine = true;
    if (ph.p_flags & PF_W) writable.emplace_back(a, b);
  }
  if (!mine) return 0;
  img->lo = lo;
  img->hi = hi;
  img->writable = writable;
  return 1;
}

Image* load_image() {
  auto* img = new Image();
  dl_iterate_phdr(&find_image, img);
  Dl_info dl{};
  if (!dladdr(reinterpret_cast<void*>(&find_image), &dl) || !dl.dli_fname) {
    img->error = "dladdr cannot name the module";
    return img;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(dl.dli_fbase);
  const int fd = open(dl.dli_fname, O_RDONLY);
  if (fd < 0) {
    img->error = format("cannot open %s to read its symbol table", dl.dli_fname);
    return img;
  }
  const off_t size = lseek(fd, 0, SEEK_END);
  void* map = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    img->error = "cannot map the module file";
    return img;
  }
  const auto* file = static_cast<const unsigned char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(file);
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(file + eh->e_shoff);
  bool found = false;
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    found = true;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(file + sh[i].sh_offset);
    const char* strs = reinterpret_cast<const char*>(file + sh[sh[i].sh_link].sh_offset);
    const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t j = 0; j < n; ++j) {
      const Elf64_Sym& s = syms[j];
      const int type = ELF64_ST_TYPE(s.st_info);
      const char* name = strs + s.st_name;
      if (s.st_shndx == SHN_UNDEF || s.st_size == 0) continue;
      if (type == STT_FUNC) {
        img->functions.emplace_back(base + s.st_value, name);
      } else if (type == STT_OBJECT && strncmp(name, "_ZZ", 3) == 0) {
        const std::string full = demangle(name);
        if (full.find("fastlm::") != std::string::npos && full.find("emulation::") == std::string::npos) {
          img->shared.push_back({base + s.st_value, s.st_size, short_name(full), {}});
        }
      }
    }
  }
  munmap(map, static_cast<size_t>(size));
  if (!found) img->error = "the module has no symbol table (was it stripped?): __shared__ variables cannot be found";
  std::sort(img->shared.begin(), img->shared.end(), [](const SharedVar& a, const SharedVar& b) { return a.lo < b.lo; });
  std::sort(img->functions.begin(), img->functions.end());
  for (auto& v : img->shared) v.shadow.assign(v.size, Shadow{0, -1, 0, 0, -1, -1, 0, 0});
  return img;
}

Image& image() {
  if (!g_image) g_image = load_image();
  return *g_image;
}

const std::string& function_name(const void* fn) {
  static std::map<const void*, std::string> names;
  auto hit = names.find(fn);
  if (hit != names.end()) return hit->second;
  const uintptr_t a = reinterpret_cast<uintptr_t>(fn);
  const auto& fs = image().functions;
  auto it = std::lower_bound(fs.begin(), fs.end(), a, [](const auto& f, uintptr_t x) { return f.first < x; });
  return names[fn] = it != fs.end() && it->first == a ? short_name(demangle(it->second.c_str())) : format("kernel@%p", fn);
}

// ---- reports ---------------------------------------------------------------------------------

std::string thread_name(int tid) {
  const unsigned bx = g_launch.block.x, by = g_launch.block.y;
  return format("(%u,%u,%u)", tid % bx, tid / bx % by, tid / (bx * by));
}

std::string where() {
  const uint3 b = g_coords.block;
  return format("kernel %s, block (%u,%u,%u)", g_launch.kernel_name.c_str(), b.x, b.y, b.z);
}

void switch_to_scheduler();

void record(int code, const std::string& what) {
  if (g_error) return;
  g_error = code;
  g_report = format("fastlm host sanitizer: %s\n  in %s (grid (%u,%u,%u), block (%u,%u,%u), schedule seed %" PRIu64 ")",
                    what.c_str(), where().c_str(), g_launch.grid.x, g_launch.grid.y, g_launch.grid.z,
                    g_launch.block.x, g_launch.block.y, g_launch.block.z, g_launch.seed);
}

// Records the first finding of the launch and abandons the running fiber.
[[noreturn]] void fail(int code, const std::string& what) {
  record(code, what);
  g_active = false;
  switch_to_scheduler();
  std::abort();
}

// ---- memory checks ---------------------------------------------------------------------------

int warp_of(int tid) { return tid >> 5; }

bool ordered(uint32_t E, uint32_t W, int warp) {
  if (E < g_E) return true;
  return warp >= 0 && warp == warp_of(g_current) && W < g_warps[warp].W;
}

void shared_access(std::vector<Shadow>& shadow, size_t off, size_t n, bool write, uintptr_t addr,
                   const std::string& var) {
  const int tid = g_current;
  const int warp = warp_of(tid);
  const uint32_t W = g_warps[warp].W;
  Shadow before{}, after{};  // a byte in the state of the previous one ends in the same state
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = shadow[off + i];
    if (i > 0 && std::memcmp(&s, &before, sizeof(Shadow)) == 0) {
      s = after;
      continue;
    }
    before = s;
    if (s.gen != g_gen) s = Shadow{g_gen, -1, 0, 0, -1, -1, 0, 0};
    auto race = [&](int other, bool other_wrote) {
      fail(cudaErrorLaunchFailure,
           format("shared-memory race: thread %s %s %zu bytes at %s+%zu (%#" PRIxPTR "), which %s %s since the last "
                  "barrier with no __syncthreads (or __syncwarp within its warp) between",
                  thread_name(tid).c_str(), write ? "writes" : "reads", n, var.c_str(), off, addr,
                  other >= 0 ? ("thread " + thread_name(other)).c_str() : "several threads",
                  other_wrote ? "wrote" : "read"));
    };
    if (!write) {
      if (s.w_tid < 0) {
        fail(cudaErrorLaunchFailure,
             format("uninitialised shared read: thread %s reads %zu bytes at %s+%zu (%#" PRIxPTR
                    "); byte %zu was never written in this block",
                    thread_name(tid).c_str(), n, var.c_str(), off, addr, off + i));
      }
      if (s.w_tid != tid && !ordered(s.w_E, s.w_W, warp_of(s.w_tid))) race(s.w_tid, true);
      if (s.r_tid == -1 || s.r_tid == tid || ordered(s.r_E, s.r_W, s.r_warp)) {
        s.r_tid = tid;
        s.r_warp = warp;
      } else {
        s.r_tid = -2;
        if (s.r_warp != warp) s.r_warp = -1;
      }
      s.r_E = g_E;
      s.r_W = W;
    } else {
      if (s.w_tid >= 0 && s.w_tid != tid && !ordered(s.w_E, s.w_W, warp_of(s.w_tid))) race(s.w_tid, true);
      if (s.r_tid != -1 && s.r_tid != tid && !ordered(s.r_E, s.r_W, s.r_warp)) race(s.r_tid, false);
      s.w_tid = tid;
      s.w_E = g_E;
      s.w_W = W;
      s.r_tid = -1;
    }
    after = s;
  }
}

void image_access(uintptr_t a, size_t n, bool write) {
  Image& img = *g_image;
  auto it = std::upper_bound(img.shared.begin(), img.shared.end(), a,
                             [](uintptr_t x, const SharedVar& v) { return x < v.lo; });
  if (it != img.shared.begin()) {
    SharedVar& v = *(it - 1);
    if (a < v.lo + v.size) {
      if (a + n > v.lo + v.size) {
        fail(cudaErrorIllegalAddress,
             format("out-of-bounds shared %s: thread %s, %zu bytes at %s+%zu (%#" PRIxPTR ") cross the end of %s (%zu bytes)",
                    write ? "store" : "load", thread_name(g_current).c_str(), n, v.name.c_str(), a - v.lo, a,
                    v.name.c_str(), v.size));
      }
      g_last_var = &v;
      shared_access(v.shadow, a - v.lo, n, write, a, v.name);
      return;
    }
  }
  const uintptr_t coords = reinterpret_cast<uintptr_t>(&g_coords);
  if (a >= coords && a + n <= coords + sizeof(g_coords)) return;
  for (const auto& w : img.writable) {
    if (a >= w.first && a < w.second) {
      std::string near = "no __shared__ variable";
      if (it != img.shared.begin()) {
        const SharedVar& v = *(it - 1);
        near = format("%zu bytes past the end of %s (%zu bytes)", a - (v.lo + v.size), v.name.c_str(), v.size);
      }
      fail(cudaErrorIllegalAddress,
           format("out-of-bounds shared %s: thread %s, %zu bytes at %#" PRIxPTR " lie outside every __shared__ variable (%s)",
                  write ? "store" : "load", thread_name(g_current).c_str(), n, a, near.c_str()));
    }
  }
  if (write) {
    fail(cudaErrorIllegalAddress, format("store of %zu bytes by thread %s to read-only module memory at %#" PRIxPTR, n,
                                         thread_name(g_current).c_str(), a));
  }
}

void global_access(uintptr_t a, size_t n, bool write) {
  if (g_extents.empty()) return;
  auto it = std::upper_bound(g_extents.begin(), g_extents.end(), a,
                             [](uintptr_t x, const Extent& e) { return x < e.lo; });
  std::string why;
  if (it != g_extents.begin()) {
    const Extent& e = *(it - 1);
    if (a + n <= e.lo + e.size) {
      g_last_extent_lo = e.lo;
      g_last_extent_size = e.size;
      return;
    }
    why = a < e.lo + e.size ? format("crosses the end of %s ([%#" PRIxPTR ", %#" PRIxPTR "))", e.label.c_str(), e.lo, e.lo + e.size)
                            : format("%zu bytes past the end of %s ([%#" PRIxPTR ", %#" PRIxPTR "))",
                                     static_cast<size_t>(a - (e.lo + e.size)), e.label.c_str(), e.lo, e.lo + e.size);
  }
  if (it != g_extents.end()) {
    const Extent& e = *it;
    const std::string before = format("%zu bytes before the start of %s ([%#" PRIxPTR ", %#" PRIxPTR "))",
                                      static_cast<size_t>(e.lo - a), e.label.c_str(), e.lo, e.lo + e.size);
    why = why.empty() ? before : why + "; " + before;
  }
  fail(cudaErrorIllegalAddress, format("out-of-bounds global %s: thread %s, %zu bytes at %#" PRIxPTR ": %s",
                                       write ? "store" : "load", thread_name(g_current).c_str(), n, a, why.c_str()));
}

__attribute__((noinline)) void slow_access(uintptr_t a, size_t n, bool write) {
  if (a - g_host_stack_lo < g_host_stack_size) return;
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(g_dyn_smem);
  if (a - dyn < kDynSmemCapacity) {
    if (a + n > dyn + g_launch.dyn_bytes) {
      fail(cudaErrorIllegalAddress,
           format("out-of-bounds shared %s: thread %s, %zu bytes at dynamic shared memory+%zu cross its end (%zu bytes)",
                  write ? "store" : "load", thread_name(g_current).c_str(), n, static_cast<size_t>(a - dyn),
                  g_launch.dyn_bytes));
    }
    shared_access(g_dyn_shadow, a - dyn, n, write, a, "dynamic shared memory");
    return;
  }
  if (a - g_image->lo < g_image->hi - g_image->lo) return image_access(a, n, write);
  global_access(a, n, write);
}

inline void on_access(uintptr_t a, size_t n, bool write) {
  if (!g_active) return;
  if (a - g_stack_lo < g_stack_size) return;
  if (g_last_var && a - g_last_var->lo < g_last_var->size && a + n <= g_last_var->lo + g_last_var->size) {
    return shared_access(g_last_var->shadow, a - g_last_var->lo, n, write, a, g_last_var->name);
  }
  if (a - g_last_extent_lo < g_last_extent_size && a + n <= g_last_extent_lo + g_last_extent_size) return;
  slow_access(a, n, write);
}

// ---- scheduling ------------------------------------------------------------------------------

void switch_to_scheduler() {
  Fiber& f = g_fibers[g_current];
#if defined(__x86_64__)
  fastlm_emu_switch(&f.sp, g_sched_sp);
#else
  swapcontext(&f.ctx, &g_sched_ctx);
#endif
}

void make_runnable(int tid) {
  g_fibers[tid].state = State::kRunnable;
  g_runnable.push_back(tid);
}

// A waiting warp collective that can no longer complete because lane `tid` left (or waits elsewhere).
const char* op_name(WarpOp op);

// A warp operation of lane `tid`'s warp that names it and can no longer complete, because the lane
// exited (file null) or waits at the __syncthreads at (file, line).
void check_warp_lost(int tid, const char* file, int line) {
  const unsigned bit = 1u << (tid & 31);
  for (const Collective& c : g_warps[warp_of(tid)].open) {
    if ((c.mask & bit) && !(c.arrived & bit)) {
      const std::string now = file ? format("is at __syncthreads (%s:%d)", file, line) : "exited";
      fail(cudaErrorLaunchFailure,
           format("divergent warp operation: lanes %#x of warp %d wait at %s (%s:%d, mask %#x), but lane %d %s", c.arrived,
                  warp_of(tid), op_name(c.op), c.file, c.line, c.mask, tid & 31, now.c_str()));
    }
  }
}

void release_barrier() {
  for (int t = 0; t < g_launch.nthreads; ++t) {
    if (g_fibers[t].state == State::kBarrier) make_runnable(t);
  }
  g_at_barrier = 0;
  ++g_E;
  for (auto& w : g_warps) ++w.W;
}

std::string barrier_message(const std::string& why) {
  return format("divergent __syncthreads (%s:%d): %d of %d threads wait there, %s", g_barrier_file,
                                      g_barrier_line, g_at_barrier, g_launch.nthreads, why.c_str());
}

void perform_copies(std::vector<Fiber::Copy>& copies);

void fiber_main() {
  g_active = true;
  g_body(g_body_ctx);
  const int tid = g_current;
  Fiber& self = g_fibers[tid];
  for (auto& group : self.in_flight) perform_copies(group);
  perform_copies(self.uncommitted);
  self.in_flight.clear();
  g_active = false;
  g_fibers[tid].state = State::kExited;
  ++g_exited;
  g_active = true;
  check_warp_lost(tid, nullptr, 0);
  if (g_at_barrier > 0) fail(cudaErrorLaunchFailure, barrier_message(format("thread %s exited without reaching it", thread_name(tid).c_str())));
  g_active = false;
  switch_to_scheduler();
  std::abort();
}

#if !defined(__x86_64__)
void fiber_entry_uc() { fiber_main(); }
#endif

void init_fiber(Fiber& f) {
#if defined(__x86_64__)
  auto top = reinterpret_cast<uintptr_t>(f.stack_lo + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 96);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memset(sp, 0, 96);
  std::memcpy(reinterpret_cast<char*>(sp), &fpucw, 2);
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, 4);
  sp[8] = reinterpret_cast<uint64_t>(&fiber_main);  // the return address at top - 32
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack_lo;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_entry_uc, 0);
#endif
  f.state = State::kRunnable;
  f.uncommitted.clear();
  f.in_flight.clear();
}

void ensure_fibers() {
  if (!g_stack_pool) {
    const size_t bytes = static_cast<size_t>(kMaxThreads) * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) std::abort();
    g_stack_pool = static_cast<char*>(p);
    g_fibers.resize(kMaxThreads);
    for (int i = 0; i < kMaxThreads; ++i) {
      char* base = g_stack_pool + static_cast<size_t>(i) * (kStackBytes + kGuardBytes);
      mprotect(base, kGuardBytes, PROT_NONE);
      g_fibers[i].stack_lo = base + kGuardBytes;
    }
  }
}

void run_fiber(int tid) {
  g_current = tid;
  const unsigned bx = g_launch.block.x, by = g_launch.block.y;
  g_coords.thread = {tid % bx, tid / bx % by, tid / (bx * by)};
  g_stack_lo = reinterpret_cast<uintptr_t>(g_fibers[tid].stack_lo);
  g_stack_size = kStackBytes;
  g_active = true;
#if defined(__x86_64__)
  fastlm_emu_switch(&g_sched_sp, g_fibers[tid].sp);
#else
  swapcontext(&g_sched_ctx, &g_fibers[tid].ctx);
#endif
  g_active = false;
}

// Every fiber of the block waits and none can run: name the operation that can never complete.
void deadlock() {
  for (size_t w = 0; w < g_warps.size(); ++w) {
    for (const Collective& c : g_warps[w].open) {
      std::map<std::string, unsigned> where_lanes;
      for (int l = 0; l < 32; ++l) {
        if (!((c.mask & ~c.arrived) >> l & 1)) continue;
        const Fiber& f = g_fibers[(w << 5) + l];
        where_lanes[f.state == State::kExited    ? std::string("exited")
                    : f.state == State::kBarrier ? format("at __syncthreads %s:%d", f.wait_file, f.wait_line)
                                                 : format("at another warp operation, %s:%d", f.wait_file, f.wait_line)] |= 1u << l;
      }
      std::string who;
      for (const auto& [at, lanes] : where_lanes) who += format(" lanes %#x (%s)", lanes, at.c_str());
      return record(cudaErrorLaunchFailure,
                    format("divergent warp operation: %s (%s:%d, mask %#x) in warp %zu: lanes %#x arrived; never arriving:%s",
                           op_name(c.op), c.file, c.line, c.mask, w, c.arrived, who.c_str()));
    }
  }
  record(cudaErrorLaunchFailure, barrier_message("the others exited or wait at a warp operation"));
}

cudaError_t run_block() {
  const int n = g_launch.nthreads;
  g_warps.assign((n + 31) / 32, WarpState{});
  g_runnable.clear();
  for (int t = 0; t < n; ++t) {
    init_fiber(g_fibers[t]);
    g_runnable.push_back(t);
  }
  g_exited = g_at_barrier = 0;
  g_E = 1;
  ++g_gen;
  while (!g_error) {
    if (g_runnable.empty()) {
      if (g_exited < n) deadlock();
      break;
    }
    const size_t i = static_cast<size_t>(splitmix(g_rng) % g_runnable.size());
    const int tid = g_runnable[i];
    g_runnable[i] = g_runnable.back();
    g_runnable.pop_back();
    run_fiber(tid);
  }
  return g_error ? static_cast<cudaError_t>(g_error) : cudaSuccess;
}

}  // namespace

// ---- the device functions the kernels call ---------------------------------------------------

unsigned char* dynamic_smem() { return g_dyn_smem; }

cudaError_t sm_count(int* sms) {
  *sms = g_sm_count;
  return cudaSuccess;
}

void syncthreads(const char* file, int line) {
  const int tid = g_current;
  check_warp_lost(tid, file, line);
  if (g_at_barrier == 0) {
    g_barrier_file = file;
    g_barrier_line = line;
  } else if (g_barrier_line != line || strcmp(g_barrier_file, file) != 0) {
    fail(cudaErrorLaunchFailure, format("divergent __syncthreads (%s:%d): thread %s reaches it while %d threads wait at %s:%d", file,
                                        line, thread_name(tid).c_str(), g_at_barrier, g_barrier_file, g_barrier_line));
  }
  if (g_exited > 0) {
    fail(cudaErrorLaunchFailure, format("divergent __syncthreads (%s:%d): thread %s reaches it after %d threads of the block exited",
                                        file, line, thread_name(tid).c_str(), g_exited));
  }
  g_fibers[tid].state = State::kBarrier;
  g_fibers[tid].wait_file = file;
  g_fibers[tid].wait_line = line;
  ++g_at_barrier;
  if (g_at_barrier == g_launch.nthreads) release_barrier();
  g_active = false;
  switch_to_scheduler();
}

[[noreturn]] void trap(const char* file, int line) {
  fail(cudaErrorLaunchFailure, format("__trap() at %s:%d by thread %s", file, line, thread_name(g_current).c_str()));
}

namespace {

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16 A and B, .f32 C/D), g = lane / 4, c = lane % 4:
//   A element i of 8 (register i / 2, half i % 2): row g + 8 * ((i / 2) % 2), col 2c + (i % 2) + 8 * (i / 4)
//   B element i of 4: row (k) 2c + (i % 2) + 8 * (i / 2), col (n) g
//   C/D element i of 4: row g + 8 * (i / 2), col 2c + (i % 2)
float half_value(int dtype, uint16_t bits) {
  return dtype == kFloat16 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

void complete_mma(Collective& ws) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, c = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const uint32_t reg = ws.mma_a[lane][i / 2];
      A[g + 8 * ((i / 2) % 2)][2 * c + (i % 2) + 8 * (i / 4)] = half_value(ws.dtype, static_cast<uint16_t>(reg >> (16 * (i % 2))));
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = ws.mma_b[lane][i / 2];
      B[2 * c + (i % 2) + 8 * (i / 2)][g] = half_value(ws.dtype, static_cast<uint16_t>(reg >> (16 * (i % 2))));
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * c + (i % 2)] = ws.mma_d[lane][i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, c = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i / 2), n = 2 * c + (i % 2);
      double acc = C[r][n];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[r][k]) * B[k][n];
      ws.mma_d[lane][i] = static_cast<float>(acc);
    }
  }
}

bool is_shared(uintptr_t a, size_t n) {
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(g_dyn_smem);
  if (a - dyn < kDynSmemCapacity) return a + n <= dyn + g_launch.dyn_bytes;
  auto it = std::upper_bound(g_image->shared.begin(), g_image->shared.end(), a,
                             [](uintptr_t x, const SharedVar& v) { return x < v.lo; });
  return it != g_image->shared.begin() && a + n <= (it - 1)->lo + (it - 1)->size;
}

// The access of `n` bytes at a checked as lane `tid`'s own.
void access_as(int tid, uintptr_t a, size_t n, bool write) {
  const int saved = g_current;
  g_current = tid;
  on_access(a, n, write);
  g_current = saved;
}

// Performs this thread's cp.async copies: reads src_bytes of global memory, writes 16 shared bytes.
void perform_copies(std::vector<Fiber::Copy>& copies) {
  for (const Fiber::Copy& c : copies) {
    const uintptr_t d = reinterpret_cast<uintptr_t>(c.dst);
    if (c.src_bytes > 0) on_access(reinterpret_cast<uintptr_t>(c.src), static_cast<size_t>(c.src_bytes), false);
    on_access(d, 16, true);
    unsigned char buf[16] = {};
    if (c.src_bytes > 0) std::memcpy(buf, c.src, static_cast<size_t>(c.src_bytes));
    std::memcpy(c.dst, buf, 16);
  }
  copies.clear();
}

// PTX ISA, ldmatrix: lane 8i + j holds the address of row j of matrix i; without .trans lane l
// receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1; with .trans the same of the transpose.
void complete_ldmatrix(Collective& ws, int warp) {
  const int num = ws.arg[0] & 7;
  const bool trans = ws.arg[0] >> 4;
  uint16_t M[4][8][8];
  for (int i = 0; i < num; ++i) {
    for (int j = 0; j < 8; ++j) {
      const int lane = 8 * i + j;
      const uintptr_t a = static_cast<uintptr_t>(ws.value[lane]);
      if (a % 16 != 0 || !is_shared(a, 16)) {
        g_current = (warp << 5) + lane;
        fail(cudaErrorIllegalAddress, format("ldmatrix (%s:%d): lane %d gives row address %#" PRIxPTR
                                             ", which is not a 16-byte aligned row inside shared memory",
                                             ws.file, ws.line, lane, a));
      }
      access_as((warp << 5) + lane, a, 16, false);
      std::memcpy(M[i][j], reinterpret_cast<const void*>(a), 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int r = lane / 4, c = 2 * (lane % 4);
    for (int i = 0; i < num; ++i) {
      const uint16_t lo = trans ? M[i][c][r] : M[i][r][c];
      const uint16_t hi = trans ? M[i][c + 1][r] : M[i][r][c + 1];
      ws.ld_r[lane][i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

uint64_t complete(Collective& ws, int warp) {
  const int base = warp << 5;
  uint64_t own = 0;
  const int me = g_current & 31;
  auto give = [&](int lane, uint64_t v) {
    if (lane == me) {
      own = v;
    } else {
      g_fibers[base + lane].result = v;
      make_runnable(base + lane);
    }
  };
  const unsigned mask = ws.mask;
  const uint64_t poison = 0x7fc0dead7fc0deadull;  // an inactive source lane: undefined on the GPU
  switch (ws.op) {
    case WarpOp::kShflIdx:
    case WarpOp::kShflUp:
    case WarpOp::kShflDown:
    case WarpOp::kShflXor:
      for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1)) continue;
        const int w = ws.width, seg = lane & ~(w - 1), a = ws.arg[lane];
        int src = lane;
        if (ws.op == WarpOp::kShflIdx) src = seg + (a & (w - 1));
        if (ws.op == WarpOp::kShflUp) src = (lane - seg) >= a ? lane - a : lane;
        if (ws.op == WarpOp::kShflDown) src = (lane - seg) + a < w ? lane + a : lane;
        if (ws.op == WarpOp::kShflXor) src = ((lane ^ a) - seg) < w && ((lane ^ a) - seg) >= 0 ? lane ^ a : lane;
        give(lane, (mask >> src & 1) ? ws.value[src] : poison);
      }
      break;
    case WarpOp::kBallot:
    case WarpOp::kAny:
    case WarpOp::kAll: {
      unsigned ballot = 0;
      for (int lane = 0; lane < 32; ++lane) {
        if ((mask >> lane & 1) && ws.value[lane]) ballot |= 1u << lane;
      }
      const uint64_t v = ws.op == WarpOp::kBallot ? ballot : ws.op == WarpOp::kAny ? (ballot != 0) : (ballot == mask);
      for (int lane = 0; lane < 32; ++lane) {
        if (mask >> lane & 1) give(lane, v);
      }
      break;
    }
    case WarpOp::kSync:
      if (mask == 0xffffffffu) ++g_warps[warp].W;
      for (int lane = 0; lane < 32; ++lane) {
        if (mask >> lane & 1) give(lane, 0);
      }
      break;
    case WarpOp::kMma:
      complete_mma(ws);
      for (int lane = 0; lane < 32; ++lane) give(lane, 0);
      break;
    case WarpOp::kLdmatrix:
      complete_ldmatrix(ws, warp);
      for (int lane = 0; lane < 32; ++lane) give(lane, 0);
      break;
  }
  return own;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kMma: return "mma.sync";
    case WarpOp::kLdmatrix: return "ldmatrix";
  }
  return "?";
}

// Lane g_current joins the oldest operation of its warp with the same op, mask and width that it
// is not yet in, or opens one; *done when that completed its mask.
Collective& arrive(WarpOp op, unsigned mask, int width, const char* file, int line, bool* done) {
  const int tid = g_current, warp = warp_of(tid), lane = tid & 31;
  WarpState& ws = g_warps[warp];
  const int lanes_here = std::min(32, g_launch.nthreads - (warp << 5));
  const unsigned present = lanes_here == 32 ? 0xffffffffu : (1u << lanes_here) - 1u;
  const unsigned bit = 1u << lane;
  if (!(mask & bit)) {
    fail(cudaErrorLaunchFailure, format("%s (%s:%d): thread %s calls it with mask %#x, which omits its own lane %d",
                                        op_name(op), file, line, thread_name(tid).c_str(), mask, lane));
  }
  if (mask & ~present) {
    fail(cudaErrorLaunchFailure, format("%s (%s:%d): mask %#x names lanes %#x that do not exist in warp %d (block of %d threads)",
                                        op_name(op), file, line, mask, mask & ~present, warp, g_launch.nthreads));
  }
  if (width < 1 || width > 32 || (width & (width - 1))) {
    fail(cudaErrorLaunchFailure, format("%s (%s:%d): width %d is not a power of two up to 32", op_name(op), file, line, width));
  }
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1) && g_fibers[(warp << 5) + l].state == State::kExited) {
      fail(cudaErrorLaunchFailure, format("divergent warp operation: thread %s calls %s (%s:%d, mask %#x), but lane %d exited",
                                          thread_name(tid).c_str(), op_name(op), file, line, mask, l));
    }
  }
  Collective* c = nullptr;
  for (Collective& o : ws.open) {
    if (o.op == op && o.mask == mask && o.width == width && !(o.arrived & bit)) {
      c = &o;
      break;
    }
  }
  if (!c) {
    ws.open.emplace_back();
    c = &ws.open.back();
    c->op = op;
    c->mask = mask;
    c->width = width;
    c->file = file;
    c->line = line;
  }
  c->arrived |= bit;
  *done = c->arrived == c->mask;
  return *c;
}

// Completes c (lane g_current arrived last), removes it from its warp, returns this lane's result.
uint64_t finish(Collective& c) {
  const int warp = warp_of(g_current);
  const uint64_t own = complete(c, warp);
  auto& open = g_warps[warp].open;
  open.erase(open.begin() + (&c - open.data()));
  return own;
}

uint64_t wait_for(const char* file, int line) {
  Fiber& f = g_fibers[g_current];
  f.state = State::kWarp;
  f.wait_file = file;
  f.wait_line = line;
  g_active = false;
  switch_to_scheduler();
  return f.result;
}

}  // namespace

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  bool done = false;
  Collective& c = arrive(op, mask, width, file, line, &done);
  c.value[g_current & 31] = value;
  c.arg[g_current & 31] = arg;
  if (done) return finish(c);
  return wait_for(file, line);
}

void mma_m16n8k16_sync(int dtype, float* d, const uint32_t* a, uint32_t b0, uint32_t b1, const char* file, int line) {
  const int lane = g_current & 31;
  bool done = false;
  Collective& c = arrive(WarpOp::kMma, 0xffffffffu, 32, file, line, &done);
  if (c.arrived != (1u << lane) && c.dtype != dtype) {
    fail(cudaErrorLaunchFailure, format("mma.sync (%s:%d): lanes disagree on the operand type", file, line));
  }
  c.dtype = dtype;
  c.mma_d[lane] = d;
  c.mma_a[lane] = a;
  c.mma_b[lane][0] = b0;
  c.mma_b[lane][1] = b1;
  if (done) {
    finish(c);
    return;
  }
  wait_for(file, line);
}

void ldmatrix_sync(int num, bool trans, uint32_t* r, const void* row, const char* file, int line) {
  const int lane = g_current & 31;
  bool done = false;
  Collective& c = arrive(WarpOp::kLdmatrix, 0xffffffffu, 32, file, line, &done);
  const int arg = num | (trans ? 16 : 0);
  if (c.arrived == (1u << lane)) {
    c.arg[0] = arg;
  } else if (c.arg[0] != arg) {
    fail(cudaErrorLaunchFailure, format("ldmatrix (%s:%d): lanes disagree on .x%d / .trans", file, line, num));
  }
  c.value[lane] = reinterpret_cast<uintptr_t>(row);
  c.ld_r[lane] = r;
  if (done) {
    finish(c);
    return;
  }
  wait_for(file, line);
}

void cp_async(void* dst, const void* src, int src_bytes, const char* file, int line) {
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst);
  if (src_bytes < 0 || src_bytes > 16 || d % 16 != 0 || !is_shared(d, 16) ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    fail(cudaErrorIllegalAddress,
         format("cp.async (%s:%d): thread %s copies %d bytes from %p to %p; expected 0..16 bytes from a 16-byte aligned "
                "global address into a 16-byte aligned shared one",
                file, line, thread_name(g_current).c_str(), src_bytes, src, dst));
  }
  g_fibers[g_current].uncommitted.push_back({dst, src, src_bytes});
}

void cp_async_commit() {
  Fiber& f = g_fibers[g_current];
  f.in_flight.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void cp_async_wait(int n) {
  Fiber& f = g_fibers[g_current];
  while (static_cast<int>(f.in_flight.size()) > n) {
    perform_copies(f.in_flight.front());
    f.in_flight.erase(f.in_flight.begin());
  }
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t dyn_bytes, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Image& img = image();
  g_report.clear();
  if (!img.error.empty()) {
    g_report = "fastlm host emulation: " + img.error;
    return cudaErrorLaunchFailure;
  }
  const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (nthreads < 1 || nthreads > kMaxThreads || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu ||
      block.z > 64 || dyn_bytes > kDynSmemCapacity) {
    g_report = format("invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic shared memory",
                      grid.x, grid.y, grid.z, block.x, block.y, block.z, dyn_bytes);
    return cudaErrorInvalidValue;
  }
  if (nblocks == 0) return cudaSuccess;
  g_launch.kernel_name = function_name(kernel);
  ++g_launch_counts[g_launch.kernel_name];
  g_launch.grid = grid;
  g_launch.block = block;
  g_launch.nthreads = static_cast<int>(nthreads);
  g_launch.dyn_bytes = dyn_bytes;
  g_launch.seed = g_seed;
  uint64_t s = g_seed ^ (0x51ed270b2f0b7b4dull * ++g_launch_index);
  g_rng = splitmix(s);
  g_body = body;
  g_body_ctx = ctx;
  g_error = 0;
  ensure_fibers();
  if (g_dyn_shadow.empty()) g_dyn_shadow.assign(kDynSmemCapacity, Shadow{0, -1, 0, 0, -1, -1, 0, 0});

  // The launching thread's stack, once per thread (pthread_getattr_np reads /proc on the main thread).
  thread_local const std::pair<uintptr_t, size_t> host_stack = [] {
    pthread_attr_t attr;
    void* lo = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &lo, &size);
      pthread_attr_destroy(&attr);
    }
    return std::pair<uintptr_t, size_t>(reinterpret_cast<uintptr_t>(lo), size);
  }();
  g_host_stack_lo = host_stack.first;
  g_host_stack_size = host_stack.second;

  std::vector<int64_t> order(static_cast<size_t>(nblocks));
  for (int64_t i = 0; i < nblocks; ++i) order[static_cast<size_t>(i)] = i;
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[splitmix(g_rng) % i]);
  g_coords.block_dim = block;
  g_coords.grid_dim = grid;
  cudaError_t code = cudaSuccess;
  for (int64_t b : order) {
    g_coords.block = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                         static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y))};
    code = run_block();
    if (code != cudaSuccess) break;
  }
  g_active = false;
  g_current = -1;
  return code;
}

void set_extents(const std::vector<std::tuple<uintptr_t, size_t, std::string>>& extents) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_extents.clear();
  g_last_extent_lo = g_last_extent_size = 0;
  for (const auto& e : extents) g_extents.push_back({std::get<0>(e), std::get<1>(e), std::get<2>(e)});
  std::sort(g_extents.begin(), g_extents.end(), [](const Extent& a, const Extent& b) { return a.lo < b.lo; });
}

void bind(pybind11::module_& m) {
  namespace py = pybind11;
  const char* env = std::getenv("FASTLM_HOST_SEED");
  g_seed = env && *env ? std::strtoull(env, nullptr, 0)
                       : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  m.attr("EMULATION") = true;
  m.def("emulation_set_extents", &set_extents, py::arg("extents"),
        "global-memory regions (address, nbytes, label) kernels may touch; [] turns the check off");
  m.def("emulation_clear_extents", []() { set_extents({}); });
  m.def("emulation_set_seed", [](uint64_t seed) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_seed = seed;
    g_launch_index = 0;
  }, py::arg("seed"), "the fiber-schedule seed; restarts the per-launch schedule sequence");
  m.def("emulation_seed", []() { return g_seed; });
  m.def("emulation_set_sm_count", [](int n) {
    if (n < 1) throw py::value_error("emulation_set_sm_count: expected a positive SM count, got " + std::to_string(n));
    g_sm_count = n;
  }, py::arg("n"));
  m.def("emulation_sm_count", []() { return g_sm_count; });
  m.def("emulation_last_report", []() { return g_report; });
  m.def("emulation_shared_variables", []() {
    std::vector<std::pair<std::string, size_t>> out;
    for (const auto& v : image().shared) out.emplace_back(v.name, v.size);
    return out;
  }, "the __shared__ variables found in the module's symbol table (name, bytes)");
  m.def("emulation_kernels", []() {
    std::vector<std::string> out;
    for (const auto& f : image().functions) {
      const std::string name = short_name(demangle(f.second.c_str()));
      const std::string base = name.substr(0, name.find('<'));
      if (name.find("{lambda") != std::string::npos) continue;  // a lambda inside a kernel, not a kernel
      if (base.size() > 7 && base.compare(base.size() - 7, 7, "_kernel") == 0) out.push_back(name);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }, "every kernel instantiation in the module (functions named *_kernel), by name");
  m.def("emulation_launch_counts", []() { return g_launch_counts; },
        "launches per kernel instantiation since the module loaded");
  m.def("selftest_mma", &selftest_mma, py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"));
  m.def("selftest_planted", &selftest_planted, py::arg("kind"));
  m.def("selftest_warp", &selftest_warp, py::arg("out"));
  m.def("selftest_ldmatrix", &selftest_ldmatrix, py::arg("out"));
  m.def("selftest_cp_async", &selftest_cp_async, py::arg("out"), py::arg("src"), py::arg("planted"));
  m.def("selftest_convert", &selftest_convert, py::arg("dtype"), py::arg("src"), py::arg("out_bits"), py::arg("back"),
        py::arg("n"));
}

}  // namespace emulation
}  // namespace fastlm

// ---- the CUDA runtime API the launchers and bindings use --------------------------------------

const char* cudaGetErrorString(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  return fastlm::emulation::sm_count(value);
}

// ---- the hooks -fsanitize=kernel-address (outline) calls before every access -------------------

#define FASTLM_HOOK(n)                                                                                      \
  extern "C" __attribute__((visibility("hidden"))) void __asan_load##n##_noabort(uintptr_t a) {             \
    fastlm::emulation::on_access(a, n, false);                                                              \
  }                                                                                                         \
  extern "C" __attribute__((visibility("hidden"))) void __asan_store##n##_noabort(uintptr_t a) {            \
    fastlm::emulation::on_access(a, n, true);                                                               \
  }                                                                                                         \
  extern "C" __attribute__((visibility("hidden"))) void __asan_load##n(uintptr_t a) {                        \
    fastlm::emulation::on_access(a, n, false);                                                              \
  }                                                                                                         \
  extern "C" __attribute__((visibility("hidden"))) void __asan_store##n(uintptr_t a) {                       \
    fastlm::emulation::on_access(a, n, true);                                                               \
  }
FASTLM_HOOK(1)
FASTLM_HOOK(2)
FASTLM_HOOK(4)
FASTLM_HOOK(8)
FASTLM_HOOK(16)
#undef FASTLM_HOOK

extern "C" __attribute__((visibility("hidden"))) void __asan_loadN_noabort(uintptr_t a, size_t n) {
  fastlm::emulation::on_access(a, n, false);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_storeN_noabort(uintptr_t a, size_t n) {
  fastlm::emulation::on_access(a, n, true);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_loadN(uintptr_t a, size_t n) {
  fastlm::emulation::on_access(a, n, false);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_storeN(uintptr_t a, size_t n) {
  fastlm::emulation::on_access(a, n, true);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_handle_no_return() {}
// -fsanitize=kernel-address with asan-globals=1 puts redzones after every global (so a __shared__
// overflow lands outside every variable) and registers them; the symbol table serves instead.
extern "C" __attribute__((visibility("hidden"))) void __asan_register_globals(void*, size_t) {}
extern "C" __attribute__((visibility("hidden"))) void __asan_unregister_globals(void*, size_t) {}
