// Device memory over a socket: the rows of a transfer in GPU memory go through two pinned host
// buffers used alternately, so the gather of chunk i+1 runs on the GPU while chunk i is on the
// wire (and on receipt, the scatter of chunk i while chunk i+1 arrives). The CUDA calls come from
// p2pkv's CUDA extension as a table of C function pointers (CudaApi), so this module links no CUDA
// library and runs on machines without one; everything here runs on the link's native thread.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_api.h"
#include "io.h"

namespace p2pkv {

class CudaStaging {
 public:
  CudaStaging(const CudaApi* api, int device, size_t bytes) : api_(api), device_(device), bytes_(bytes) {}
  ~CudaStaging();
  // Sends `head` then the bytes of the device rows; receives into the device rows.
  Status send(int fd, const void* head, size_t head_len, const std::vector<iovec>& rows);
  Status recv(int fd, const std::vector<iovec>& rows);

 private:
  struct Row { uint64_t src, dst, len; };
  struct Chunk { size_t first, last; uint64_t skip, bytes; };  // rows [first, last], bytes of row `first` skipped
  Status ready();
  Status cuda(int err, const char* what);
  std::vector<Chunk> cut(const std::vector<iovec>& rows) const;
  Status launch(int b, const std::vector<iovec>& rows, const Chunk& c, bool to_host);

  const CudaApi* api_;
  int device_;
  size_t bytes_;
  bool ready_ = false;
  void* stage_[2] = {nullptr, nullptr};
  Row* table_[2] = {nullptr, nullptr};
  void* stream_[2] = {nullptr, nullptr};
};

}  // namespace p2pkv
