// The few CUDA calls the native data path makes, as a table of C function pointers that p2pkv's
// CUDA extension fills in (csrc/binding.cpp, native_api()): the data path links no CUDA library
// and builds and runs where there is none. Plain C types only; `version` guards the layout.
#pragma once

#include <cstddef>
#include <cstdint>

namespace p2pkv {

struct CudaApi {
  int version;  // 1
  int (*set_device)(int device);
  int (*stream_create)(void** stream);
  int (*stream_sync)(void* stream);
  int (*host_alloc)(void** ptr, size_t bytes);
  int (*host_free)(void* ptr);
  // Copies `n` rows {uint64 src, uint64 dst, uint64 len} of a table in pinned host memory, one launch.
  int (*launch_rows)(const void* rows, int64_t n, void* stream);
  const char* (*error_string)(int err);
  int (*event_sync)(void* event);
};

}  // namespace p2pkv
