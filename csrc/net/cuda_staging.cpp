// Pinned, double-buffered staging of device rows; see cuda_staging.h.
#include "cuda_staging.h"

#include <algorithm>

namespace p2pkv {

constexpr uint64_t kPiece = 64u << 10;      // a kernel row: one thread block's share
constexpr size_t kTableRows = 1u << 16;     // rows per chunk's table

CudaStaging::~CudaStaging() {
  for (int b = 0; b < 2; ++b) {
    if (stream_[b]) api_->stream_sync(stream_[b]);
    if (stage_[b]) api_->host_free(stage_[b]);
    if (table_[b]) api_->host_free(table_[b]);
  }
}

Status CudaStaging::cuda(int err, const char* what) {
  if (err == 0) return {};
  return Status::fail(kLocal, std::string(what) + " failed: " + api_->error_string(err));
}

Status CudaStaging::ready() {
  Status st = cuda(api_->set_device(device_), "cudaSetDevice");
  if (!st.ok() || ready_) return st;
  for (int b = 0; b < 2 && st.ok(); ++b) {
    st = cuda(api_->host_alloc(&stage_[b], bytes_), "cudaHostAlloc (staging)");
    void* t = nullptr;
    if (st.ok()) st = cuda(api_->host_alloc(&t, kTableRows * sizeof(Row)), "cudaHostAlloc (row table)");
    table_[b] = static_cast<Row*>(t);
    if (st.ok()) st = cuda(api_->stream_create(&stream_[b]), "cudaStreamCreate");
  }
  ready_ = st.ok();
  return st;
}

// Chunks of at most bytes_ staged bytes and kTableRows kernel rows; a row may span chunks.
std::vector<CudaStaging::Chunk> CudaStaging::cut(const std::vector<iovec>& rows) const {
  std::vector<Chunk> out;
  Chunk c{0, 0, 0, 0};
  size_t pieces = 0;
  uint64_t skip = 0;
  for (size_t i = 0; i < rows.size();) {
    uint64_t left = rows[i].iov_len - skip;
    if (left == 0) {
      ++i;
      skip = 0;
      continue;
    }
    uint64_t room = bytes_ - c.bytes;
    uint64_t take = std::min(left, room);
    size_t need = size_t((take + kPiece - 1) / kPiece);
    if (pieces + need > kTableRows) take = std::min<uint64_t>(take, (kTableRows - pieces) * kPiece);
    if (take == 0) {
      out.push_back(c);
      c = Chunk{i, i, skip, 0};
      pieces = 0;
      continue;
    }
    c.last = i;
    c.bytes += take;
    pieces += size_t((take + kPiece - 1) / kPiece);
    skip += take;
    if (skip == rows[i].iov_len) {
      ++i;
      skip = 0;
    }
    if (c.bytes == bytes_ || pieces == kTableRows) {
      out.push_back(c);
      c = Chunk{i, i, skip, 0};
      pieces = 0;
    }
  }
  if (c.bytes) out.push_back(c);
  return out;
}

Status CudaStaging::launch(int b, const std::vector<iovec>& rows, const Chunk& c, bool to_host) {
  Row* t = table_[b];
  size_t n = 0;
  uint64_t pos = 0, stage = reinterpret_cast<uint64_t>(stage_[b]);
  uint64_t skip = c.skip;
  for (size_t i = c.first; i <= c.last && pos < c.bytes; ++i, skip = 0) {
    uint64_t dev = reinterpret_cast<uint64_t>(rows[i].iov_base) + skip;
    uint64_t len = std::min<uint64_t>(rows[i].iov_len - skip, c.bytes - pos);
    for (uint64_t o = 0; o < len; o += kPiece) {
      uint64_t m = std::min(kPiece, len - o);
      t[n++] = to_host ? Row{dev + o, stage + pos + o, m} : Row{stage + pos + o, dev + o, m};
    }
    pos += len;
  }
  return cuda(api_->launch_rows(t, int64_t(n), stream_[b]), "launching the staging copy");
}

Status CudaStaging::send(int fd, const void* head, size_t head_len, const std::vector<iovec>& rows) {
  Status st = ready();
  std::vector<Chunk> chunks = cut(rows);
  if (st.ok() && !chunks.empty()) st = launch(0, rows, chunks[0], true);
  if (st.ok() && head_len) st = send_bytes(fd, head, head_len);
  for (size_t i = 0; st.ok() && i < chunks.size(); ++i) {
    int b = int(i % 2);
    if (i + 1 < chunks.size()) st = launch(1 - b, rows, chunks[i + 1], true);
    if (st.ok()) st = cuda(api_->stream_sync(stream_[b]), "waiting for the staging copy");
    if (st.ok()) st = send_bytes(fd, stage_[b], size_t(chunks[i].bytes));
  }
  for (int b = 0; b < 2 && ready_; ++b) api_->stream_sync(stream_[b]);
  return st;
}

Status CudaStaging::recv(int fd, const std::vector<iovec>& rows) {
  Status st = ready();
  std::vector<Chunk> chunks = cut(rows);
  for (size_t i = 0; st.ok() && i < chunks.size(); ++i) {
    int b = int(i % 2);
    st = cuda(api_->stream_sync(stream_[b]), "waiting for the staging copy");
    if (st.ok()) st = recv_bytes(fd, stage_[b], size_t(chunks[i].bytes));
    if (st.ok()) st = launch(b, rows, chunks[i], false);
  }
  for (int b = 0; b < 2 && ready_; ++b) {
    Status s2 = cuda(api_->stream_sync(stream_[b]), "waiting for the staging copy");
    if (st.ok()) st = s2;
  }
  return st;
}

}  // namespace p2pkv
