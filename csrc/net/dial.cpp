// See dial.h.
#include "dial.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "hello.h"
#include "io.h"
#include "threads.h"

namespace p2pkv {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Dialer::Result fail(const char* code, std::string message, std::string meta = "") {
  Dialer::Result r;
  r.code = code;
  r.message = std::move(message);
  r.peer_meta = std::move(meta);
  return r;
}

// Connects `fd` to `addr` within `left_s`; "" or why not.
std::string connect_within(int fd, const sockaddr* addr, socklen_t len, double left_s, bool& timed_out) {
  timed_out = false;
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  if (::connect(fd, addr, len) < 0) {
    if (errno != EINPROGRESS) return strerror(errno);
    pollfd p{fd, POLLOUT, 0};
    int r;
    do r = ::poll(&p, 1, std::max(1, int(left_s * 1000))); while (r < 0 && errno == EINTR);
    if (r == 0) {
      timed_out = true;
      return "no answer within the timeout";
    }
    int err = 0;
    socklen_t el = sizeof err;
    if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0) return strerror(errno);
    if (err != 0) return strerror(err);
  }
  fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return "";
}

}  // namespace

std::shared_ptr<Dialer> Dialer::start(std::string host, int port, HandshakeSetup setup) {
  std::shared_ptr<Dialer> d(new Dialer());
  std::thread([d, host = std::move(host), port, setup = std::move(setup)]() mutable {
    use_io_cpus();
    d->run(std::move(host), port, std::move(setup));
  }).detach();  // holds `d` until it ends, bounded by the timeout; never touches Python
  return d;
}

Dialer::~Dialer() {
  if (!taken_ && result_.fd >= 0) ::close(result_.fd);
}

bool Dialer::done() {
  std::lock_guard<std::mutex> lk(mu_);
  return done_;
}

bool Dialer::wait(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (timeout_s < 0) {
    cv_.wait(lk, [this] { return done_; });
    return true;
  }
  return cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [this] { return done_; });
}

Dialer::Result Dialer::take() {
  std::lock_guard<std::mutex> lk(mu_);
  Result r = result_;
  if (done_ && !taken_) {
    taken_ = true;
  } else {
    r.fd = -1;
  }
  return r;
}

void Dialer::cancel() {
  cancelled_.store(true);
  std::lock_guard<std::mutex> lk(fd_mu_);
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Dialer::own(int fd) {
  std::lock_guard<std::mutex> lk(fd_mu_);
  fd_ = fd;
}

void Dialer::finish(Result r) {
  std::lock_guard<std::mutex> lk(mu_);
  if (cancelled_.load() && r.fd >= 0) {
    ::close(r.fd);
    r = fail("closed", "the dial was cancelled");
  }
  result_ = std::move(r);
  done_ = true;
  cv_.notify_all();
}

// getaddrinfo has no timeout of its own: it runs on a thread of its own, waited for until `deadline`.
struct Resolve {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int rc = 0;
  addrinfo* res = nullptr;
  ~Resolve() {
    if (res != nullptr) freeaddrinfo(res);
  }
};

void Dialer::run(std::string host, int port, HandshakeSetup setup) {
  double deadline = now_s() + setup.timeout_s;
  auto lookup = std::make_shared<Resolve>();
  std::thread([lookup, host, port] {
    use_io_cpus();
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
    std::lock_guard<std::mutex> lk(lookup->mu);
    lookup->rc = rc;
    lookup->res = res;
    lookup->done = true;
    lookup->cv.notify_all();
  }).detach();
  addrinfo* res = nullptr;
  {
    std::unique_lock<std::mutex> lk(lookup->mu);
    if (!lookup->cv.wait_for(lk, std::chrono::duration<double>(std::max(deadline - now_s(), 0.0)),
                             [&] { return lookup->done; })) {
      char t[32];
      snprintf(t, sizeof t, "%g", setup.timeout_s);
      lk.unlock();
      finish(fail("timeout", "cannot connect: cannot resolve host '" + host + "' within the " + t + " s timeout"));
      return;
    }
    if (lookup->rc != 0) {
      std::string why = gai_strerror(lookup->rc);
      lk.unlock();
      finish(fail("closed", "cannot connect: cannot resolve host '" + host + "': " + why));
      return;
    }
    res = lookup->res;
  }
  std::string why = "no address for host '" + host + "'";
  bool timed_out = false;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr && !cancelled_.load(); a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = strerror(errno);
      continue;
    }
    own(fd);
    why = connect_within(fd, a->ai_addr, a->ai_addrlen, deadline - now_s(), timed_out);
    if (why.empty()) break;
    own(-1);
    ::close(fd);
    fd = -1;
  }
  if (fd < 0) {
    finish(fail(timed_out ? "timeout" : "closed", "cannot connect: " + why));
    return;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  Result r = handshake(fd, setup);
  own(-1);
  if (r.code.empty()) {
    r.fd = fd;
  } else {
    ::close(fd);
  }
  finish(std::move(r));
}

Dialer::Result Dialer::handshake(int fd, const HandshakeSetup& setup) {
  Status st = set_blocking_with_timeout(fd, setup.timeout_s);
  if (!st.ok()) return fail("closed", st.message);
  auto tell = [fd](const std::string& kind, const std::string& message) {
    std::string f = frame_bytes(kError, error_meta(kind, message));
    (void)send_bytes(fd, f.data(), f.size());
  };
  // Reads one handshake frame into `h` and `body`; a failure as a Result (code set).
  auto read_frame = [fd](Header& h, std::string& body) -> Result {
    uint8_t head[kHeaderSize];
    Status s = recv_bytes(fd, head, kHeaderSize);
    if (!s.ok()) return fail(s.kind == kTimeout ? "timeout" : "closed",
                             s.kind == kTimeout ? "no handshake answer within the timeout" : "handshake failed: " + s.message);
    std::string kind, why;
    if (!parse_handshake_header(head, h, kind, why)) return fail(kind == "handshake" ? "handshake" : "protocol", why);
    body.assign(h.meta_len, '\0');
    if (h.meta_len) {
      s = recv_bytes(fd, &body[0], h.meta_len);
      if (!s.ok()) return fail(s.kind == kTimeout ? "timeout" : "closed", "handshake failed: " + s.message);
    }
    if (h.type == kError) return fail("refused", "the peer refused the handshake", body);
    return Result{};
  };

  Hello mine;
  mine.auth = setup.auth;
  mine.info = setup.info;
  if (!random_bytes(mine.nonce, kNonceBytes)) return fail("protocol", "no random bytes for a nonce");
  std::string out = frame_bytes(kHello, encode_hello(mine));
  st = send_bytes(fd, out.data(), out.size());
  if (!st.ok()) return fail(st.kind == kTimeout ? "timeout" : "closed", "handshake failed: " + st.message);

  Header h;
  std::string body;
  Result r = read_frame(h, body);
  if (!r.code.empty()) return r;
  Hello theirs;
  std::string why;
  if (h.type != kHello || !parse_hello(reinterpret_cast<const uint8_t*>(body.data()), body.size(), theirs, why))
    return fail("protocol", h.type != kHello ? "expected a HELLO frame during the handshake" : why);
  if (theirs.auth != setup.auth) {
    std::string msg = theirs.auth ? "the peer requires an auth token and none is configured here"
                                  : "an auth token is configured here but the peer has none";
    tell("auth", msg);
    return fail("auth", msg + " (set the same auth token, e.g. P2PKV_AUTH_TOKEN, on both sides)");
  }
  if (setup.auth) {
    uint8_t expect[kMacBytes], mac[kMacBytes];
    if (!hello_mac(setup.token, "server", mine.nonce, theirs.nonce, expect, why)) return fail("auth", why);
    if (!equal_constant_time(expect, theirs.mac, kMacBytes)) {
      tell("auth", "auth token mismatch");
      return fail("auth", "the peer failed the auth challenge: its auth token differs from ours");
    }
    if (!hello_mac(setup.token, "client", theirs.nonce, mine.nonce, mac, why)) return fail("auth", why);
    out = frame_bytes(kAuth, std::string(reinterpret_cast<const char*>(mac), kMacBytes));
    st = send_bytes(fd, out.data(), out.size());
    if (!st.ok()) return fail(st.kind == kTimeout ? "timeout" : "closed", "handshake failed: " + st.message);
  }
  r = read_frame(h, body);
  if (!r.code.empty()) return r;
  if (h.type != kReady) return fail("protocol", "expected READY to end the handshake");
  r.info = std::move(theirs.info);
  return r;
}

}  // namespace p2pkv
