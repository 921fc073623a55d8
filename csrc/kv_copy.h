// p2pkv CUDA core: the segment-copy kernels and the IPC helpers, behind a plain C++
// interface (no torch headers) so that kv_copy.cu builds with nvcc alone and the
// Python binding (binding.cpp) is the only file that sees torch.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace p2pkv {

// One unit of work for one thread block: copy `len` bytes from `src` to `dst`
// (absolute device or UVA-mapped host addresses).
struct CopyRow {
  uint64_t src;
  uint64_t dst;
  uint64_t len;
};

// Rows that fit in a kernel parameter (4 KiB limit): such a launch needs no table upload.
constexpr int kSmallRows = 160;

// Copy every row of a table that lives in device memory or in pinned host memory
// (read through UVA); one launch, `grid` thread blocks (0: as many as keep the
// device busy, -k: k per multiprocessor). `hint` bit 0: streaming (evict-first) loads and stores; bit 1:
// eight 16-byte loads in flight per thread instead of four.
cudaError_t launch_rows(const CopyRow* rows, int64_t nrows, int grid, int hint, cudaStream_t stream);

// Copy up to kSmallRows rows passed by value in the kernel's parameters.
cudaError_t launch_small(const CopyRow* host_rows, int nrows, int hint, cudaStream_t stream);

// Whole-block copies: a request is a list of (source block, destination block) id pairs;
// each region pair knows its bases, block strides and the pieces (spans) of one block, so
// the host hands the device only the ids, in the kernel's parameters.
constexpr int kMaxPieces = 4;
struct BlockRegion {
  uint64_t src_base;
  uint64_t dst_base;
  int64_t src_stride;
  int64_t dst_stride;
  int64_t piece_src[kMaxPieces];
  int64_t piece_dst[kMaxPieces];
  int64_t piece_len[kMaxPieces];  // 0: no such piece in this region
};
// The launch copies the whole parameter block, so the smallest form that holds the ids is used.
constexpr int kSmallPairs = 120;   // parameters under 1 KiB: the cheapest launch
constexpr int kMediumPairs = 500;  // under 4 KiB
constexpr int kLargePairs = 4000;  // under 32 KiB (CUDA 12.1+, Volta and later)

// Copy pieces x regions x pairs items, each cut into `split` units of `chunk` bytes (a
// multiple of 16), one thread block per unit over a grid of `grid` blocks (0: one per
// unit up to 8 per multiprocessor). `regions` is a device table of `nreg` rows; `pairs`
// (host memory, 2 x npairs ints: src, dst, src, dst, ...) travels in the parameters.
cudaError_t launch_blocks(const BlockRegion* regions, int nreg, int npieces, const int32_t* pairs, int npairs,
                          int64_t chunk, int split, int grid, int hint, cudaStream_t stream);

// Multiprocessor count of the current device (cached per device).
int sm_count();

// CUDA IPC of plain device allocations: `ptr` may point inside an allocation (torch's
// caching allocator sub-allocates); the handle names the whole allocation, whose base
// and size are returned so the peer maps `base` and adds `ptr - base`.
cudaError_t ipc_export(uint64_t ptr, cudaIpcMemHandle_t* handle, uint64_t* base, uint64_t* size);
cudaError_t ipc_open(const cudaIpcMemHandle_t& handle, uint64_t* base);
cudaError_t ipc_close(uint64_t base);

}  // namespace p2pkv
