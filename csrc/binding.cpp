// Python binding of the p2pkv CUDA core: validates a segment table against the
// region sizes, cuts it into rows and launches the copy in one call (so a transfer
// costs one pass over the table on the host), plus the CUDA IPC helpers.
#include <torch/extension.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <thread>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_copy.h"
#include "net/cuda_api.h"

namespace py = pybind11;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

struct Side {
  const int64_t* base;
  const int64_t* size;
  int64_t n;
  const int64_t* off;  // nullptr: segments follow each other from offset 0 (a gather/scatter buffer)
  const char* name;
};

// Checks every segment and returns the total byte count.
int64_t validate(const Side& s, const Side& d, const int64_t* region, const int64_t* len, int64_t n) {
  int64_t total = 0, run_s = 0, run_d = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = region[i], l = len[i];
    if (l < 0) throw std::invalid_argument("segment " + std::to_string(i) + " has a negative length " + std::to_string(l));
    for (const Side* side : {&s, &d}) {
      const int64_t ri = side->off ? r : 0;
      int64_t& run = side == &s ? run_s : run_d;
      const int64_t o = side->off ? side->off[i] : run;
      if (ri < 0 || ri >= side->n)
        throw std::invalid_argument("segment " + std::to_string(i) + " names " + side->name + " region " +
                                    std::to_string(ri) + ", but only " + std::to_string(side->n) + " are registered");
      if (o < 0 || o + l > side->size[ri])
        throw std::invalid_argument("segment " + std::to_string(i) + ": " + side->name + " bytes [" + std::to_string(o) +
                                    ", " + std::to_string(o + l) + ") run past the end of " + side->name + " region " +
                                    std::to_string(ri) + " (" + std::to_string(side->size[ri]) + " bytes)");
      run += l;
    }
    total += l;
  }
  return total;
}

// Makes `device` current for one call and restores the caller's device after it.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev == device) {
      prev = -1;
    } else {
      check(cudaSetDevice(device), "cudaSetDevice");
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

// Orders `stream` after the peer's last "ready" record. A record the host already sees completed needs
// no device-side wait (the query costs a fraction of cudaStreamWaitEvent on an interprocess event).
void wait_for(cudaStream_t stream, int64_t event) {
  cudaEvent_t ev = reinterpret_cast<cudaEvent_t>(event);
  const cudaError_t q = cudaEventQuery(ev);
  if (q == cudaSuccess) return;
  if (q != cudaErrorNotReady) check(q, "cudaEventQuery");
  if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();  // not an error: keep launch checks clean
  check(cudaStreamWaitEvent(stream, ev, 0), "cudaStreamWaitEvent");
}

int64_t count_rows(const int64_t* len, int64_t n, int64_t chunk) {
  int64_t rows = 0;
  for (int64_t i = 0; i < n; ++i) rows += len[i] <= chunk ? 1 : (len[i] + chunk - 1) / chunk;
  return rows;
}

void fill_rows(p2pkv::CopyRow* out, const Side& s, const Side& d, const int64_t* region, const int64_t* len,
               int64_t n, int64_t chunk) {
  int64_t k = 0, run = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = region[i], l = len[i];
    uint64_t sa = (uint64_t)(s.off ? s.base[r] + s.off[i] : s.base[0] + run);
    uint64_t da = (uint64_t)(d.off ? d.base[r] + d.off[i] : d.base[0] + run);
    run += l;
    for (int64_t o = 0; o < l; o += chunk) {
      const uint64_t m = (uint64_t)std::min(chunk, l - o);
      out[k++] = p2pkv::CopyRow{sa + (uint64_t)o, da + (uint64_t)o, m};
    }
  }
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Side streams that run the pieces of one large copy, so that a piece's tail overlaps the
// next piece instead of idling the GPU; joined back into the caller's stream.
constexpr int kSide = 3;
struct SideStreams {
  cudaStream_t stream[kSide] = {};
  cudaEvent_t start = nullptr, done[kSide] = {};
};

SideStreams& side_streams() {
  static std::mutex m;
  static SideStreams per_device[64];
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) throw std::runtime_error("device index out of range");
  std::lock_guard<std::mutex> g(m);
  SideStreams& ss = per_device[dev];
  if (ss.start == nullptr) {
    check(cudaEventCreateWithFlags(&ss.start, cudaEventDisableTiming), "cudaEventCreate");
    for (int j = 0; j < kSide; ++j) {
      check(cudaStreamCreateWithFlags(&ss.stream[j], cudaStreamNonBlocking), "cudaStreamCreate");
      check(cudaEventCreateWithFlags(&ss.done[j], cudaEventDisableTiming), "cudaEventCreate");
    }
  }
  return ss;
}

std::mutex g_copy_mutex;
int64_t g_last_steps[4] = {0, 0, 0, 0};  // ns into the last copy_blocks: checked, waited, launched, recorded

// copy(tables, region, src_off|None, dst_off|None, length, start, run,
//      pinned, pinned_rows, stream, hint, min_chunk, max_chunk, small, grid, dry, first_piece, max_piece,
//      nside, wait_event, done_event, slot_event) -> (rows, next, run)
// The copy waits for `wait_event` on the device first; `done_event` and `slot_event` are recorded once
// every piece is done (raw cudaEvent_t handles; 0 for none).
// Copies segments start.. (run: the byte offset of segment `start` in a gather/scatter buffer). Up to
// kSmallRows rows go in the kernel's parameters. Larger tables are cut into rows in `pinned` (read by
// the GPU through UVA) piece by piece, each piece launched as soon as it is written, so the host's
// work overlaps the copy. Stops early when `pinned_rows` is reached: `next` is then the first segment
// not copied. A bad segment raises ValueError; pieces before it may already have been copied.
// `dry` does all host work but launches nothing.
py::tuple copy(I64 tables, py::array region_arr, py::object src_off_obj, py::object dst_off_obj, I64 length,
               int64_t start, int64_t run, int64_t pinned, int64_t pinned_rows, int64_t stream_ptr, int hint,
               int64_t min_chunk, int64_t max_chunk, bool small, int grid, bool dry, int64_t first_piece,
               int64_t max_piece, int nside, int64_t wait_event, int64_t done_event, int64_t slot_event) {
  const int64_t n = length.size();
  // tables = [n_src, n_dst, src bases..., src sizes..., dst bases..., dst sizes...]
  const int64_t* tab = tables.data();
  if (tables.size() < 2 || tab[0] < 0 || tab[1] < 0 || tables.size() != 2 + 2 * (tab[0] + tab[1]))
    throw std::invalid_argument("malformed region table");
  const int64_t ns = tab[0], nd = tab[1];
  // Region ids arrive as int32 (what plan_segments makes) or int64; only other types are converted.
  I64 region64;
  std::vector<int64_t> widened;
  const int64_t* reg = nullptr;
  if (py::isinstance<py::array_t<int32_t>>(region_arr) && (region_arr.flags() & py::array::c_style)) {
    auto r32 = region_arr.unchecked<int32_t, 1>();
    if (r32.shape(0) != n) throw std::invalid_argument("region and length arrays differ in size");
    widened.resize(n);
    for (int64_t i = 0; i < n; ++i) widened[i] = r32(i);
    reg = widened.data();
  } else {
    region64 = region_arr.cast<I64>();
    if (region64.size() != n) throw std::invalid_argument("region and length arrays differ in size");
    reg = region64.data();
  }
  I64 src_off, dst_off;
  const bool has_src = !src_off_obj.is_none(), has_dst = !dst_off_obj.is_none();
  if (has_src) src_off = src_off_obj.cast<I64>();
  if (has_dst) dst_off = dst_off_obj.cast<I64>();
  if ((has_src && src_off.size() != n) || (has_dst && dst_off.size() != n))
    throw std::invalid_argument("offset and length arrays differ in size");
  Side s{tab + 2, tab + 2 + ns, ns, has_src ? src_off.data() : nullptr, "source"};
  Side d{tab + 2 + 2 * ns, tab + 2 + 2 * ns + nd, nd, has_dst ? dst_off.data() : nullptr, "destination"};
  const int64_t* len = length.data();
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  auto record = [&]() {
    if (dry) return;
    if (done_event) check(cudaEventRecord(reinterpret_cast<cudaEvent_t>(done_event), stream), "cudaEventRecord");
    if (slot_event) check(cudaEventRecord(reinterpret_cast<cudaEvent_t>(slot_event), stream), "cudaEventRecord");
  };
  if (wait_event && !dry) wait_for(stream, wait_event);

  if (small && start == 0 && n <= p2pkv::kSmallRows) {
    const int64_t total = validate(s, d, reg, len, n);
    if (total == 0) {
      record();
      return py::make_tuple(0, n, 0);
    }
    // Each segment gets at most kSmallRows / n rows, so the table always fits the kernel parameters.
    int64_t longest = 0;
    for (int64_t i = 0; i < n; ++i) longest = std::max(longest, len[i]);
    const int64_t per = p2pkv::kSmallRows / n;
    const int64_t chunk = std::max({min_chunk, round_up((longest + per - 1) / per, 16), (int64_t)16});
    const int64_t rows = count_rows(len, n, chunk);
    p2pkv::CopyRow buf[p2pkv::kSmallRows];
    fill_rows(buf, s, d, reg, len, n, chunk);
    if (!dry) check(p2pkv::launch_small(buf, (int)rows, hint, stream), "p2pkv copy kernel launch");
    record();
    return py::make_tuple(rows, n, total);
  }
  if (start >= n) {
    record();
    return py::make_tuple(0, n, run);
  }
  if (pinned == 0 || pinned_rows <= 0) throw std::invalid_argument("a pinned row table is needed for this copy");

  const int64_t wave = (int64_t)p2pkv::sm_count() * 8;
  int64_t chunk = max_chunk;
  if (n - start < wave) {  // few segments: cut them finer so every multiprocessor gets work
    int64_t total = 0;
    for (int64_t i = start; i < n; ++i) total += std::max<int64_t>(len[i], 0);
    chunk = std::min(max_chunk, std::max(min_chunk, round_up((total + wave - 1) / wave, 16)));
  }
  std::lock_guard<std::mutex> guard(g_copy_mutex);
  SideStreams* ss = nullptr;
  bool used[kSide] = {false, false, false};
  int next_side = 0;
  auto* rows = reinterpret_cast<p2pkv::CopyRow*>(pinned);
  int64_t k = 0, launched = 0, piece = std::max<int64_t>(first_piece, 1), i = start;
  nside = std::min(std::max(nside, 1), kSide);

  auto launch = [&](bool last) {
    if (k == launched || dry) {
      launched = k;
      return;
    }
    if (last && ss == nullptr) {  // everything fit in one piece: launch on the caller's stream
      check(p2pkv::launch_rows(rows + launched, k - launched, grid, hint, stream), "p2pkv copy kernel launch");
      launched = k;
      return;
    }
    if (ss == nullptr) {
      ss = &side_streams();
      check(cudaEventRecord(ss->start, stream), "cudaEventRecord");
    }
    const int j = next_side;
    next_side = (next_side + 1) % nside;
    if (!used[j]) {
      check(cudaStreamWaitEvent(ss->stream[j], ss->start, 0), "cudaStreamWaitEvent");
      used[j] = true;
    }
    check(p2pkv::launch_rows(rows + launched, k - launched, grid, hint, ss->stream[j]), "p2pkv copy kernel launch");
    launched = k;
  };
  auto join = [&]() {
    if (ss == nullptr) return;
    for (int j = 0; j < kSide; ++j) {
      if (!used[j]) continue;
      check(cudaEventRecord(ss->done[j], ss->stream[j]), "cudaEventRecord");
      check(cudaStreamWaitEvent(stream, ss->done[j], 0), "cudaStreamWaitEvent");
    }
  };

  try {
    for (; i < n; ++i) {
      const int64_t r = reg[i], l = len[i];
      const int64_t need = l <= chunk ? 1 : (l + chunk - 1) / chunk;
      if (k + need > pinned_rows) break;  // the caller continues from segment i with a larger table
      if (l < 0) throw std::invalid_argument("segment " + std::to_string(i) + " has a negative length " + std::to_string(l));
      uint64_t addr[2];
      for (int side = 0; side < 2; ++side) {
        const Side& sd = side == 0 ? s : d;
        const int64_t ri = sd.off ? r : 0;
        const int64_t o = sd.off ? sd.off[i] : run;
        if (ri < 0 || ri >= sd.n)
          throw std::invalid_argument("segment " + std::to_string(i) + " names " + sd.name + " region " +
                                      std::to_string(ri) + ", but only " + std::to_string(sd.n) + " are registered");
        if (o < 0 || o + l > sd.size[ri])
          throw std::invalid_argument("segment " + std::to_string(i) + ": " + sd.name + " bytes [" + std::to_string(o) +
                                      ", " + std::to_string(o + l) + ") run past the end of " + sd.name + " region " +
                                      std::to_string(ri) + " (" + std::to_string(sd.size[ri]) + " bytes)");
        addr[side] = (uint64_t)(sd.base[ri] + o);
      }
      run += l;
      for (int64_t o = 0; o < l; o += chunk) {
        rows[k++] = p2pkv::CopyRow{addr[0] + (uint64_t)o, addr[1] + (uint64_t)o, (uint64_t)std::min(chunk, l - o)};
      }
      if (k - launched >= piece && n - i > piece / 2) {
        launch(false);
        piece = std::min<int64_t>(piece * 2, std::max(max_piece, piece));
      }
    }
    launch(true);
  } catch (...) {
    join();
    record();
    throw;
  }
  join();
  record();
  return py::make_tuple(k, i, run);
}

// copy_blocks(regions_ptr, nreg, npieces, max_src, max_dst, item_len, pair_bytes, hint, min_chunk, max_chunk, grid,
//             src_blocks, dst_blocks, stream, wait_event, done_event, device) -> bytes copied
// Whole-block copy of a request: checks every id against the largest block the registered memory holds
// on each side (max_src/max_dst, computed once per region table), then waits for `wait_event`, launches
// (one launch per kLargePairs pairs) and records `done_event`, all in this one call, on `device`.
int64_t copy_blocks(int64_t regions_ptr, int nreg, int npieces, int64_t max_src, int64_t max_dst, int64_t item_len,
                    int64_t pair_bytes, int hint, int64_t min_chunk, int64_t max_chunk, int grid, I64 src_blocks,
                    I64 dst_blocks, int64_t stream_ptr, int64_t wait_event, int64_t done_event, int device) {
  const auto t0 = std::chrono::steady_clock::now();
  auto mark = [&](int k) {
    g_last_steps[k] = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  };
  DeviceGuard on(device);
  const int64_t n = src_blocks.size();
  if (dst_blocks.size() != n) throw std::invalid_argument("source and destination block lists differ in length");
  if (nreg <= 0 || npieces <= 0 || npieces > p2pkv::kMaxPieces) throw std::invalid_argument("malformed block table");
  const int64_t* sb = src_blocks.data();
  const int64_t* db = dst_blocks.data();
  std::vector<int32_t> pairs(2 * (size_t)n);
  for (int64_t i = 0; i < n; ++i) {
    if (sb[i] < 0 || sb[i] > max_src)
      throw std::invalid_argument("source block id " + std::to_string(sb[i]) + " is outside the registered memory (ids 0.." +
                                  std::to_string(max_src) + ")");
    if (db[i] < 0 || db[i] > max_dst)
      throw std::invalid_argument("destination block id " + std::to_string(db[i]) +
                                  " is outside the registered memory (ids 0.." + std::to_string(max_dst) + ")");
    pairs[2 * i] = (int32_t)sb[i];
    pairs[2 * i + 1] = (int32_t)db[i];
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  mark(0);
  if (wait_event) wait_for(stream, wait_event);
  mark(1);
  if (n > 0 && item_len > 0) {
    // Units small enough that every multiprocessor gets work, large enough to keep 16-byte loads streaming.
    const int64_t wave = (int64_t)p2pkv::sm_count() * 8;
    int64_t chunk = round_up(std::max<int64_t>((pair_bytes * std::min<int64_t>(n, p2pkv::kLargePairs) + wave - 1) / wave, 16), 16);
    chunk = std::min(std::max(chunk, round_up(min_chunk, 16)), round_up(max_chunk, 16));
    chunk = std::min(chunk, round_up(item_len, 16));
    const int split = (int)((item_len + chunk - 1) / chunk);
    for (int64_t at = 0; at < n; at += p2pkv::kLargePairs) {
      const int m = (int)std::min<int64_t>(n - at, p2pkv::kLargePairs);
      check(p2pkv::launch_blocks(reinterpret_cast<const p2pkv::BlockRegion*>(regions_ptr), nreg, npieces,
                                 pairs.data() + 2 * at, m, chunk, split, grid, hint, stream),
            "p2pkv block copy launch");
    }
  }
  mark(2);
  if (done_event) check(cudaEventRecord(reinterpret_cast<cudaEvent_t>(done_event), stream), "cudaEventRecord");
  mark(3);
  return n * pair_bytes;
}

// copy_blocks with everything but the block ids, the stream and the done event bound once per peer,
// spec pair and knob set: a request's call converts four arguments instead of seventeen.
struct BlockCopier {
  int64_t regions_ptr;
  int nreg;
  int npieces;
  int64_t max_src, max_dst, item_len, pair_bytes;
  int hint;
  int64_t min_chunk, max_chunk;
  int grid;
  int64_t wait_event;
  int device;

  int64_t call(I64 src_blocks, I64 dst_blocks, int64_t stream_ptr, int64_t done_event) const {
    return copy_blocks(regions_ptr, nreg, npieces, max_src, max_dst, item_len, pair_bytes, hint, min_chunk, max_chunk,
                       grid, std::move(src_blocks), std::move(dst_blocks), stream_ptr, wait_event, done_event, device);
  }
};

py::tuple last_steps() {
  return py::make_tuple(g_last_steps[0], g_last_steps[1], g_last_steps[2], g_last_steps[3]);
}

// Waits for a CUDA event without the GIL: spins on cudaEventQuery for the first 200 us (a copy of a
// few MiB ends in that time), then yields the core, then after 2 ms sleeps between queries.
// True once the event has completed, False when `timeout` seconds passed first.
bool wait_event(int64_t event, double timeout) {
  cudaEvent_t ev = reinterpret_cast<cudaEvent_t>(event);
  cudaError_t q;
  {
    py::gil_scoped_release unlocked;
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      q = cudaEventQuery(ev);
      if (q != cudaErrorNotReady) break;
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (timeout >= 0 && waited > timeout) break;
      if (waited > 2e-3) {  // sleeps grow with the wait (1% of it, 20..200 us): long waits cost little CPU
        const double nap = std::min(2e-4, std::max(2e-5, waited / 100));
        std::this_thread::sleep_for(std::chrono::duration<double>(nap));
      } else if (waited > 2e-4) {
        std::this_thread::yield();
      }
    }
  }
  if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();
  if (q == cudaErrorNotReady) return false;
  check(q, "cudaEventQuery");
  return true;
}

py::tuple ipc_export(int64_t ptr) {
  cudaIpcMemHandle_t h;
  uint64_t base = 0, size = 0;
  check(p2pkv::ipc_export((uint64_t)ptr, &h, &base, &size), "cudaIpcGetMemHandle");
  return py::make_tuple(py::bytes(reinterpret_cast<const char*>(&h), sizeof(h)), (int64_t)base, (int64_t)size);
}

int64_t ipc_open(py::bytes handle) {
  std::string raw = handle;
  if (raw.size() != sizeof(cudaIpcMemHandle_t))
    throw std::invalid_argument("an IPC memory handle has " + std::to_string(sizeof(cudaIpcMemHandle_t)) +
                                " bytes, got " + std::to_string(raw.size()));
  cudaIpcMemHandle_t h;
  std::memcpy(&h, raw.data(), sizeof(h));
  uint64_t base = 0;
  check(p2pkv::ipc_open(h, &base), "cudaIpcOpenMemHandle");
  return (int64_t)base;
}

void ipc_close(int64_t base) { check(p2pkv::ipc_close((uint64_t)base), "cudaIpcCloseMemHandle"); }

}  // namespace

// The table of CUDA calls the native data path (csrc/net/cuda_staging.cpp) makes from its own threads.
int api_set_device(int d) { return int(cudaSetDevice(d)); }
int api_stream_create(void** s) { return int(cudaStreamCreateWithFlags(reinterpret_cast<cudaStream_t*>(s), cudaStreamNonBlocking)); }
int api_stream_sync(void* s) { return int(cudaStreamSynchronize(static_cast<cudaStream_t>(s))); }
int api_host_alloc(void** p, size_t n) { return int(cudaHostAlloc(p, n, cudaHostAllocPortable | cudaHostAllocMapped)); }
int api_host_free(void* p) { return int(cudaFreeHost(p)); }
int api_launch_rows(const void* rows, int64_t n, void* s) {
  return int(p2pkv::launch_rows(static_cast<const p2pkv::CopyRow*>(rows), n, 0, 2, static_cast<cudaStream_t>(s)));
}
const char* api_error_string(int e) { return cudaGetErrorString(static_cast<cudaError_t>(e)); }
int api_event_sync(void* ev) { return int(cudaEventSynchronize(static_cast<cudaEvent_t>(ev))); }

const p2pkv::CudaApi kNativeApi{1, api_set_device, api_stream_create, api_stream_sync, api_host_alloc, api_host_free,
                                api_launch_rows, api_error_string, api_event_sync};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("native_api", [] { return reinterpret_cast<int64_t>(&kNativeApi); },
        "address of the CUDA call table (csrc/net/cuda_api.h) for the native data path");
  m.doc() = "p2pkv CUDA core: one-launch segment copies and CUDA IPC helpers";
  m.attr("ROW_BYTES") = (int)sizeof(p2pkv::CopyRow);
  m.attr("SMALL_ROWS") = p2pkv::kSmallRows;
  m.def("copy", &copy, "validate, cut into rows and copy a segment table in one launch");

  m.def("copy_blocks", &copy_blocks, "validate block ids and copy whole blocks of every region in one launch");
  py::class_<BlockCopier>(m, "BlockCopier", "copy_blocks with its per-peer arguments bound: (src, dst, stream, done)")
      .def(py::init<int64_t, int, int, int64_t, int64_t, int64_t, int64_t, int, int64_t, int64_t, int, int64_t, int>())
      .def("__call__", &BlockCopier::call);
  m.def("last_steps", &last_steps, "ns into the last copy_blocks call: ids checked, waited, launched, recorded");
  m.def("wait_event", &wait_event, "wait for a CUDA event without the GIL; False on timeout (seconds, <0: none)");
  m.attr("BLOCK_REGION_WORDS") = (int)(sizeof(p2pkv::BlockRegion) / 8);
  m.attr("MAX_PIECES") = p2pkv::kMaxPieces;
  m.def("sm_count", &p2pkv::sm_count);
  m.def("ipc_export", &ipc_export, "(handle, base, size) of the allocation holding a device pointer");
  m.def("ipc_open", &ipc_open, "map a peer's allocation; returns its base address here");
  m.def("ipc_close", &ipc_close, "unmap an allocation mapped by ipc_open");
}
