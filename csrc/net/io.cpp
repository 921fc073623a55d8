// Vectored socket I/O; see io.h.
#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace p2pkv {

// One syscall moves at most this many rows and (for sends) about this many bytes: on loopback
// with autotuned buffers, 4 MiB blocking sends measured as fast as one send of the whole buffer.
constexpr size_t kIovMax = 1024;
constexpr size_t kBatchBytes = 4u << 20;

static Status os_error(const char* what, int err) {
  if (err == EAGAIN || err == EWOULDBLOCK) return Status::fail(kTimeout, std::string("no progress within the timeout while ") + what);
  if (err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ESHUTDOWN || err == EBADF)
    return Status::fail(kClosed, std::string("connection lost while ") + what + ": " + strerror(err));
  return Status::fail(kClosed, std::string(what) + " failed: " + strerror(err));
}

Status set_blocking_with_timeout(int fd, double timeout_s) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) return os_error("setting blocking mode", errno);
  timeval tv;
  tv.tv_sec = time_t(timeout_s);
  tv.tv_usec = suseconds_t((timeout_s - double(tv.tv_sec)) * 1e6);
  if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
    return os_error("setting socket timeouts", errno);
  return {};
}

// Rows [i, j) of one call: up to kIovMax rows and, past the first, kBatchBytes.
static size_t batch_end(const std::vector<iovec>& iov, size_t i) {
  size_t j = i, bytes = 0, end = std::min(iov.size(), i + kIovMax);
  while (j < end && (j == i || bytes + iov[j].iov_len <= kBatchBytes)) bytes += iov[j++].iov_len;
  return j;
}

template <class Call>
static Status move_all(std::vector<iovec>& iov, const char* what, Call call) {
  size_t i = 0;
  while (i < iov.size() && iov[i].iov_len == 0) ++i;
  while (i < iov.size()) {
    size_t j = batch_end(iov, i);
    msghdr msg{};
    msg.msg_iov = &iov[i];
    msg.msg_iovlen = j - i;
    ssize_t got = call(&msg);
    if (got < 0) {
      if (errno == EINTR) continue;
      return os_error(what, errno);
    }
    if (got == 0) return Status::fail(kClosed, std::string("peer closed the connection while ") + what);
    size_t left = size_t(got);
    while (left && i < iov.size()) {
      size_t take = std::min(left, iov[i].iov_len);
      iov[i].iov_base = static_cast<char*>(iov[i].iov_base) + take;
      iov[i].iov_len -= take;
      left -= take;
      if (iov[i].iov_len == 0) ++i;
    }
    while (i < iov.size() && iov[i].iov_len == 0) ++i;
  }
  return {};
}

Status send_all(int fd, std::vector<iovec>& iov) {
  return move_all(iov, "sending", [fd](msghdr* m) { return sendmsg(fd, m, MSG_NOSIGNAL); });
}

Status recv_all(int fd, std::vector<iovec>& iov) {
  return move_all(iov, "receiving", [fd](msghdr* m) { return recvmsg(fd, m, 0); });
}

Status send_bytes(int fd, const void* p, size_t n) {
  std::vector<iovec> v{iovec{const_cast<void*>(p), n}};
  return send_all(fd, v);
}

Status recv_bytes(int fd, void* p, size_t n) {
  std::vector<iovec> v{iovec{p, n}};
  return recv_all(fd, v);
}

bool wait_readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  while (true) {
    int r = poll(&p, 1, -1);
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return false;
  }
}

}  // namespace p2pkv
