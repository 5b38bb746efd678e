// C++20 prelude of the long-convolution kernels (see long_conv.h for the dialect): runs a kernel body on the CPU
// with the threadgroup semantics of a GPU, so that tests execute the same body as the Metal and CUDA builds.
// Each thread of a threadgroup is one std::thread; the threadgroup buffer lives in an arena shared by the group,
// sized to the target's threadgroup-memory limit and filled with NaN before each group, so a read of a value that
// no thread wrote shows up in the output; as much again lies past the limit, and a value written beyond the buffer
// fails the launch. M2_BARRIER() is a real std::barrier, or in a serial schedule a hand-over of the one running
// thread's turn.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

struct alignas(8) float2 {
  float x;
  float y;
};

struct alignas(16) float4 {
  float x;
  float y;
  float z;
  float w;
};

struct uint3 {
  unsigned x;
  unsigned y;
  unsigned z;
};

using m2_half = _Float16;

// bfloat16 as MLX stores it: the top half of a float32, rounded to nearest even.
struct m2_bfloat16 {
  uint16_t bits;

  m2_bfloat16() = default;

  m2_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if (std::isnan(f)) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40);
    } else {
      bits = static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
  }

  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

#define M2_FUNC inline
#define M2_TG
#define M2_GLOBAL
#define M2_THREAD
#define M2_BARRIER() m2_emu_barrier()
#define M2_UNROLL
#define M2_UNROLL_4
#define M2_UNROLL_NONE
#define M2_THREADGROUP_BUFFER(name, count) float2* name = m2_emu_threadgroup_alloc(count)

inline float2 m2_f2(float x, float y) {
  return float2{x, y};
}

// A serial schedule (order 1: thread order, -1: its reverse) runs one thread at a time from one barrier to the next,
// each in turn, so that every access of a thread between two barriers comes before every access of the threads after
// it in the order: an access that lacks the barrier it needs sees the wrong value in one of the two orders, whatever
// the timing of the threads (which a concurrent run leaves to luck).
struct m2_emu_group {
  std::barrier<>* barrier;
  std::vector<std::atomic<int>>* turns;  // serial: the turns granted to each thread so far, else null
  int self;                              // serial: this thread, and the one whose turn follows its own
  int next;
  float2* arena;
  int capacity;
  std::atomic<int>* overflow;
};

thread_local m2_emu_group m2_emu_current;
thread_local int m2_emu_used;
thread_local int m2_emu_turn;
thread_local std::vector<float2> m2_emu_spill;

inline void m2_emu_wait_turn() {
  std::atomic<int>& granted = (*m2_emu_current.turns)[m2_emu_current.self];
  ++m2_emu_turn;
  for (int seen = granted.load(); seen < m2_emu_turn; seen = granted.load()) {
    granted.wait(seen);
  }
}

inline void m2_emu_pass_turn() {
  std::atomic<int>& granted = (*m2_emu_current.turns)[m2_emu_current.next];
  granted.fetch_add(1);
  granted.notify_one();
}

inline void m2_emu_barrier() {
  if (m2_emu_current.turns == nullptr) {
    m2_emu_current.barrier->arrive_and_wait();
  } else {
    m2_emu_pass_turn();
    m2_emu_wait_turn();
  }
}

// Past the limit the request is recorded (the launch then fails) and served from private memory, so that the
// group still runs to its end without touching memory it does not own.
inline float2* m2_emu_threadgroup_alloc(int count) {
  if (m2_emu_used + count > m2_emu_current.capacity) {
    m2_emu_current.overflow->store((m2_emu_used + count) * static_cast<int>(sizeof(float2)));
    m2_emu_spill.assign(count, float2{0.0f, 0.0f});
    return m2_emu_spill.data();
  }
  float2* p = m2_emu_current.arena + m2_emu_used;
  m2_emu_used += count;
  return p;
}

// Runs kernel(thread_position_in_threadgroup, threadgroup_position_in_grid, threads_per_threadgroup) over the
// grid of groups, one group at a time. geometry: the grid's groups (x, y, z), the threads of a group, the
// threadgroup-memory limit in bytes and the schedule (0: threads concurrent, else a serial schedule's order).
// Returns 0, the threadgroup bytes asked for beyond the limit, or -1 if a thread wrote past its buffer.
template <typename Kernel>
int m2_emu_launch(Kernel kernel, const int* geometry) {
  const int groups_x = geometry[0];
  const int groups_y = geometry[1];
  const int groups_z = geometry[2];
  const int threads = geometry[3];
  const int limit_bytes = geometry[4];
  const int order = geometry[5];
  std::barrier<> sync(threads);
  std::vector<std::atomic<int>> turns(order != 0 ? threads : 0);
  const int capacity = limit_bytes / static_cast<int>(sizeof(float2));
  std::vector<float2> arena(2 * capacity);
  std::atomic<int> overflow{0};
  bool stray = false;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto worker = [&](int tid) {
    const int step = order < 0 ? threads - 1 : 1;
    m2_emu_current = m2_emu_group{
        &sync, order != 0 ? &turns : nullptr, tid, (tid + step) % threads, arena.data(), capacity, &overflow};
    if (order != 0) {
      m2_emu_turn = 0;
      m2_emu_wait_turn();
    }
    const int groups = groups_x * groups_y * groups_z;
    for (int i = 0; i < groups; ++i) {
      // The reverse schedule runs the groups in reverse too: a write into another group's outputs then shows in one
      // of the two orders, as a barrier missing within a group does.
      const int g = order < 0 ? groups - 1 - i : i;
      const uint3 group{static_cast<unsigned>(g % groups_x), static_cast<unsigned>(g / groups_x % groups_y),
                        static_cast<unsigned>(g / (groups_x * groups_y))};
      if (tid == 0) {
        std::fill(arena.begin(), arena.end(), float2{nan, nan});
      }
      m2_emu_barrier();
      m2_emu_used = 0;
      kernel(uint3{static_cast<unsigned>(tid), 0, 0}, group, uint3{static_cast<unsigned>(threads), 1, 1});
      m2_emu_barrier();
      if (tid == 0) {
        stray = stray || std::any_of(arena.begin() + m2_emu_used, arena.end(), [](float2 f) {
                  return !std::isnan(f.x) || !std::isnan(f.y);
                });
      }
    }
    if (order != 0) {
      m2_emu_pass_turn();
    }
  };
  if (order != 0) {
    turns[order < 0 ? threads - 1 : 0].store(1);
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int tid = 0; tid < threads; ++tid) {
    pool.emplace_back(worker, tid);
  }
  for (auto& t : pool) {
    t.join();
  }
  return stray ? -1 : overflow.load();
}
