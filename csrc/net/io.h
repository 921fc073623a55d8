// Blocking vectored socket I/O for the data path: every byte of an iovec list sent or received
// in order, whole batches per syscall, partial calls resumed exactly. The kernel enforces the
// timeout (SO_SNDTIMEO/SO_RCVTIMEO): a call that makes no progress within it fails.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

namespace p2pkv {

enum ErrKind : int { kOk = 0, kTimeout = 1, kClosed = 2, kRefused = 3, kProtocol = 4, kLocal = 5, kGoneErr = 6,
                     kNotHeldYet = 7 };

struct Status {
  ErrKind kind = kOk;
  std::string message;
  bool ok() const { return kind == kOk; }
  static Status fail(ErrKind k, std::string m) { return Status{k, std::move(m)}; }
};

// Puts the descriptor in blocking mode with kernel timeouts of `timeout_s` on both directions.
Status set_blocking_with_timeout(int fd, double timeout_s);

// Sends/receives all bytes of `iov` (consumed: rows are trimmed as bytes move).
Status send_all(int fd, std::vector<iovec>& iov);
Status recv_all(int fd, std::vector<iovec>& iov);
Status send_bytes(int fd, const void* p, size_t n);
Status recv_bytes(int fd, void* p, size_t n);

// Waits until `fd` is readable or hung up (no timeout); false if polling itself failed.
bool wait_readable(int fd);

}  // namespace p2pkv
