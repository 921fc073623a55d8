// p2pkv CUDA kernels: copy a table of byte segments (many blocks of many layers,
// possibly from another process's IPC-mapped memory) in one launch, one thread
// block per table row; 16-byte accesses when both sides allow it, bytes otherwise.
// Builds standalone: nvcc -std=c++17 -gencode=arch=compute_90,code=sm_90 -c kv_copy.cu
#include "kv_copy.h"

#include <cuda.h>
#include <cuda_runtime.h>

namespace p2pkv {
namespace {

constexpr int kThreads = 256;

struct SmallRows {
  CopyRow row[kSmallRows];
};

template <int HINT>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (HINT == 1) {
    return __ldcs(p);
  } else {
    return *p;
  }
}

template <int HINT>
__device__ __forceinline__ void store16(uint4* p, uint4 v) {
  if constexpr (HINT == 1) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// The 16-byte body: each thread keeps kUnroll loads in flight before storing.
template <int HINT, int kUnroll>
__device__ __forceinline__ void copy_vec(const uint4* __restrict__ s, uint4* __restrict__ d, uint64_t n16) {
  const uint64_t step = (uint64_t)blockDim.x * kUnroll;
  uint64_t base = threadIdx.x;
  for (; base + (kUnroll - 1) * (uint64_t)blockDim.x < n16; base += step) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load16<HINT>(s + base + u * (uint64_t)blockDim.x);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store16<HINT>(d + base + u * (uint64_t)blockDim.x, v[u]);
  }
  for (; base < n16; base += blockDim.x) store16<HINT>(d + base, load16<HINT>(s + base));
}

__device__ __forceinline__ void copy_bytes(const unsigned char* __restrict__ s, unsigned char* __restrict__ d,
                                           uint64_t n) {
  for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

// One row, by the whole thread block: aligned body with 16-byte accesses when source
// and destination share their alignment modulo 16, a byte loop otherwise.
template <int HINT, int UNROLL>
__device__ __forceinline__ void copy_row(uint64_t src, uint64_t dst, uint64_t len) {
  const unsigned char* s = reinterpret_cast<const unsigned char*>(src);
  unsigned char* d = reinterpret_cast<unsigned char*>(dst);
  if (((src ^ dst) & 15) != 0) {
    copy_bytes(s, d, len);
    return;
  }
  uint64_t head = (16 - (src & 15)) & 15;
  if (head > len) head = len;
  uint64_t n16 = (len - head) >> 4;
  uint64_t tail = len - head - (n16 << 4);
  if (head) copy_bytes(s, d, head);
  copy_vec<HINT, UNROLL>(reinterpret_cast<const uint4*>(s + head), reinterpret_cast<uint4*>(d + head), n16);
  if (tail) copy_bytes(s + head + (n16 << 4), d + head + (n16 << 4), tail);
}

// Persistent grid over a table in device or pinned host memory: thread 0..2 fetch the
// next row into shared memory while the block copies the current one.
template <int HINT, int UNROLL>
__global__ void __launch_bounds__(kThreads) copy_rows_kernel(const CopyRow* __restrict__ rows, int64_t nrows) {
  __shared__ uint64_t cur[3];
  const uint64_t* words = reinterpret_cast<const uint64_t*>(rows);
  int64_t i = blockIdx.x;
  if (i >= nrows) return;
  if (threadIdx.x < 3) cur[threadIdx.x] = words[i * 3 + threadIdx.x];
  __syncthreads();
  for (;;) {
    const uint64_t src = cur[0], dst = cur[1], len = cur[2];
    const int64_t next = i + gridDim.x;
    uint64_t pre = 0;
    if (threadIdx.x < 3 && next < nrows) pre = words[next * 3 + threadIdx.x];
    copy_row<HINT, UNROLL>(src, dst, len);
    if (next >= nrows) return;
    __syncthreads();
    if (threadIdx.x < 3) cur[threadIdx.x] = pre;
    __syncthreads();
    i = next;
  }
}

template <int HINT, int UNROLL>
__global__ void __launch_bounds__(kThreads) copy_small_kernel(const __grid_constant__ SmallRows rows) {
  const CopyRow r = rows.row[blockIdx.x];
  copy_row<HINT, UNROLL>(r.src, r.dst, r.len);
}

template <int NPAIRS>
struct BlockArgs {
  const BlockRegion* regions;
  int64_t units;
  int64_t chunk;
  int32_t npairs;
  int32_t npieces;
  int32_t split;
  int32_t pad;
  int32_t pairs[2 * NPAIRS];
};

// Unit u -> (region, piece, pair, part): consecutive thread blocks copy consecutive parts of one
// piece, then the same piece of the next pair, so a wave sweeps one region's blocks at a time.
// Sets the unit's addresses and length; the length is 0 for a part past its piece's end.
template <int NPAIRS>
__device__ __forceinline__ void unit_row(const BlockArgs<NPAIRS>& a, int64_t u, uint64_t& src, uint64_t& dst,
                                         uint64_t& len) {
  const int64_t item = u / a.split;
  const int64_t part = u - item * a.split;
  const int64_t rp = item / a.npairs;
  const int p = (int)(item - rp * a.npairs);
  const int64_t r = rp / a.npieces;
  const int piece = (int)(rp - r * a.npieces);
  const BlockRegion* reg = a.regions + r;
  const int64_t plen = __ldg(&reg->piece_len[piece]);
  const int64_t off = part * a.chunk;
  len = 0;
  if (off >= plen) return;
  len = (uint64_t)(plen - off < a.chunk ? plen - off : a.chunk);
  src = __ldg(&reg->src_base) + (int64_t)a.pairs[2 * p] * __ldg(&reg->src_stride) + __ldg(&reg->piece_src[piece]) + off;
  dst = __ldg(&reg->dst_base) + (int64_t)a.pairs[2 * p + 1] * __ldg(&reg->dst_stride) + __ldg(&reg->piece_dst[piece]) +
        off;
}

template <int HINT, int UNROLL, int NPAIRS>
__global__ void __launch_bounds__(kThreads) copy_blocks_kernel(const __grid_constant__ BlockArgs<NPAIRS> a) {
  for (int64_t u = blockIdx.x; u < a.units; u += gridDim.x) {
    uint64_t src, dst, len;
    unit_row(a, u, src, dst, len);
    if (len) copy_row<HINT, UNROLL>(src, dst, len);
  }
}

// Units of at most 4 KiB, one warp each: eight 16-byte loads in flight per lane and eight units
// per thread block, where a thread block per unit would spend more time being scheduled than copying.
constexpr int kWarps = kThreads / 32;

template <int HINT, int NPAIRS>
__global__ void __launch_bounds__(kThreads) copy_warp_blocks_kernel(const __grid_constant__ BlockArgs<NPAIRS> a) {
  const uint64_t lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * kWarps;
  for (int64_t u = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5); u < a.units; u += stride) {
    uint64_t src, dst, len;
    unit_row(a, u, src, dst, len);
    if (!len) continue;
    if (((src | dst | len) & 15) != 0) {
      for (uint64_t i = lane; i < len; i += 32)
        reinterpret_cast<unsigned char*>(dst)[i] = reinterpret_cast<const unsigned char*>(src)[i];
      continue;
    }
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint64_t n16 = len >> 4;
    uint64_t i = lane;
    for (; i + 7 * 32 < n16; i += 8 * 32) {
      uint4 v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = load16<HINT>(s + i + 32 * k);
#pragma unroll
      for (int k = 0; k < 8; ++k) store16<HINT>(d + i + 32 * k, v[k]);
    }
    for (; i < n16; i += 32) store16<HINT>(d + i, load16<HINT>(s + i));
  }
}

template <int NPAIRS>
cudaError_t launch_blocks_n(const BlockRegion* regions, int nreg, int npieces, const int32_t* pairs, int npairs,
                            int64_t chunk, int split, int grid, int hint, cudaStream_t stream) {
  BlockArgs<NPAIRS> a;
  a.regions = regions;
  a.units = (int64_t)nreg * npieces * npairs * split;
  a.chunk = chunk;
  a.npairs = npairs;
  a.npieces = npieces;
  a.split = split;
  a.pad = 0;
  for (int i = 0; i < 2 * npairs; ++i) a.pairs[i] = pairs[i];
  int64_t g = grid > 0 ? grid : (int64_t)sm_count() * (2048 / kThreads);
  if (grid < 0) g = (int64_t)sm_count() * -grid;
  if (g > a.units) g = a.units;
  if (chunk <= 16 * kThreads && (hint & 8)) {  // bit 3: a warp per unit of 4 KiB and less
    const int64_t gw = (a.units + kWarps - 1) / kWarps;
    const unsigned gb = (unsigned)(g < gw ? g : gw);
    if (hint & 1) copy_warp_blocks_kernel<1, NPAIRS><<<gb, kThreads, 0, stream>>>(a);
    else copy_warp_blocks_kernel<0, NPAIRS><<<gb, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  switch (hint & 3) {
    case 1: copy_blocks_kernel<1, 4, NPAIRS><<<(unsigned)g, kThreads, 0, stream>>>(a); break;
    case 2: copy_blocks_kernel<0, 8, NPAIRS><<<(unsigned)g, kThreads, 0, stream>>>(a); break;
    case 3: copy_blocks_kernel<1, 8, NPAIRS><<<(unsigned)g, kThreads, 0, stream>>>(a); break;
    default: copy_blocks_kernel<0, 4, NPAIRS><<<(unsigned)g, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

int g_sm_count[64] = {0};

}  // namespace

int sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (g_sm_count[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    g_sm_count[dev] = n;
  }
  return g_sm_count[dev];
}

cudaError_t launch_rows(const CopyRow* rows, int64_t nrows, int grid, int hint, cudaStream_t stream) {
  if (nrows <= 0) return cudaSuccess;
  if (grid == 0) grid = sm_count() * (2048 / kThreads);
  if (grid < 0) grid = sm_count() * -grid;
  if ((int64_t)grid > nrows) grid = (int)nrows;
  switch (hint & 3) {  // bit 0: streaming hints, bit 1: eight 16-byte loads in flight per thread instead of four
    case 1: copy_rows_kernel<1, 4><<<grid, kThreads, 0, stream>>>(rows, nrows); break;
    case 2: copy_rows_kernel<0, 8><<<grid, kThreads, 0, stream>>>(rows, nrows); break;
    case 3: copy_rows_kernel<1, 8><<<grid, kThreads, 0, stream>>>(rows, nrows); break;
    default: copy_rows_kernel<0, 4><<<grid, kThreads, 0, stream>>>(rows, nrows);
  }
  return cudaGetLastError();
}

cudaError_t launch_small(const CopyRow* host_rows, int nrows, int hint, cudaStream_t stream) {
  if (nrows <= 0) return cudaSuccess;
  if (nrows > kSmallRows) return cudaErrorInvalidValue;
  SmallRows t;
  for (int i = 0; i < nrows; ++i) t.row[i] = host_rows[i];
  if (hint & 1) {  // small rows: four loads in flight are enough (bit 1 is ignored)
    copy_small_kernel<1, 4><<<nrows, kThreads, 0, stream>>>(t);
  } else {
    copy_small_kernel<0, 4><<<nrows, kThreads, 0, stream>>>(t);
  }
  return cudaGetLastError();
}

cudaError_t launch_blocks(const BlockRegion* regions, int nreg, int npieces, const int32_t* pairs, int npairs,
                          int64_t chunk, int split, int grid, int hint, cudaStream_t stream) {
  if (npairs <= 0 || nreg <= 0 || npieces <= 0 || split <= 0) return cudaSuccess;
  if (npieces > kMaxPieces || chunk <= 0 || (chunk & 15) != 0) return cudaErrorInvalidValue;
  if (npairs <= kSmallPairs)
    return launch_blocks_n<kSmallPairs>(regions, nreg, npieces, pairs, npairs, chunk, split, grid, hint, stream);
  if (npairs <= kMediumPairs)
    return launch_blocks_n<kMediumPairs>(regions, nreg, npieces, pairs, npairs, chunk, split, grid, hint, stream);
  if (npairs <= kLargePairs)
    return launch_blocks_n<kLargePairs>(regions, nreg, npieces, pairs, npairs, chunk, split, grid, hint, stream);
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------ IPC

namespace {
using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

GetAddressRange address_range_fn() {
  static GetAddressRange fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      p = nullptr;
    }
    return reinterpret_cast<GetAddressRange>(p);
  }();
  return fn;
}
}  // namespace

cudaError_t ipc_export(uint64_t ptr, cudaIpcMemHandle_t* handle, uint64_t* base, uint64_t* size) {
  GetAddressRange range = address_range_fn();
  if (range == nullptr) return cudaErrorNotSupported;
  CUdeviceptr b = 0;
  size_t n = 0;
  if (range(&b, &n, (CUdeviceptr)ptr) != CUDA_SUCCESS) return cudaErrorInvalidDevicePointer;
  *base = (uint64_t)b;
  *size = (uint64_t)n;
  return cudaIpcGetMemHandle(handle, reinterpret_cast<void*>(b));
}

cudaError_t ipc_open(const cudaIpcMemHandle_t& handle, uint64_t* base) {
  void* p = nullptr;
  cudaError_t e = cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess);
  *base = reinterpret_cast<uint64_t>(p);
  return e;
}

cudaError_t ipc_close(uint64_t base) { return cudaIpcCloseMemHandle(reinterpret_cast<void*>(base)); }

}  // namespace p2pkv
