// See accept.h.
#include "accept.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "hello.h"
#include "threads.h"

namespace p2pkv {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string peer_address(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
    if (ss.ss_family == AF_INET) {
      auto* a = reinterpret_cast<sockaddr_in*>(&ss);
      inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
      port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
      inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
      port = ntohs(a->sin6_port);
    }
  }
  return std::string(host) + ":" + std::to_string(port);
}

}  // namespace

// One connection in its handshake; owned by the run thread.
struct Acceptor::Peer {
  int fd = -1;
  std::string addr;
  double deadline = 0;
  int step = 0;             // 0: wants the client's HELLO, 1: its AUTH, 2: ends after the flush
  bool ok = false;          // at step 2: ready (else refused)
  std::string in;           // the frame being read: header, then body
  Header h;
  bool have_header = false;
  std::string out;          // what is still to send
  size_t out_off = 0;
  Hello client;
  uint8_t nonce[kNonceBytes] = {};
  Refusal refusal;
};

Acceptor::Acceptor(int listen_fd, bool handshake) : fd_(listen_fd), handshake_(handshake) {
  thread_ = std::thread([this] {
    use_io_cpus();
    run();
  });
}

Acceptor::~Acceptor() { close(); }

void Acceptor::configure(HandshakeSetup s) {
  std::lock_guard<std::mutex> lk(mu_);
  setup_ = std::move(s);
  configured_ = true;
}

void Acceptor::serve(ServeSetup s) {
  std::lock_guard<std::mutex> lk(mu_);
  serve_ = std::make_shared<const ServeSetup>(std::move(s));
}

void Acceptor::close() {
  if (stop_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  for (Peer* p : peers_) {
    ::close(p->fd);
    delete p;
  }
  peers_.clear();
  std::lock_guard<std::mutex> lk(mu_);
  for (int fd : queue_) ::close(fd);
  for (auto& a : ready_) {
    if (a.server) a.server->close();
    else ::close(a.fd);
  }
  queue_.clear();
  ready_.clear();
  in_flight_ = 0;
  cv_.notify_all();
}

bool Acceptor::wait(double timeout_s, double min_age_s) {
  std::unique_lock<std::mutex> lk(mu_);
  double end = now_s() + timeout_s;
  while (true) {
    double t = now_s();
    if (!queue_.empty() || !refusals_.empty() || (!ready_.empty() && t - ready_.front().since >= min_age_s)) return true;
    if (stop_.load() || t >= end) return false;
    double next = end;
    if (!ready_.empty()) next = std::min(next, ready_.front().since + min_age_s);
    cv_.wait_for(lk, std::chrono::duration<double>(std::max(next - t, 0.0005)));
  }
}

std::vector<int> Acceptor::take() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<int> out(queue_.begin(), queue_.end());
  in_setup_ += out.size();
  queue_.clear();
  return out;
}

void Acceptor::setup_done() {
  std::lock_guard<std::mutex> lk(mu_);
  if (in_setup_) --in_setup_;
}

std::vector<Accepted> Acceptor::take_ready() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<Accepted> out(std::make_move_iterator(ready_.begin()), std::make_move_iterator(ready_.end()));
  ready_.clear();
  return out;
}

std::vector<Refusal> Acceptor::take_refusals(uint64_t& dropped) {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<Refusal> out(std::make_move_iterator(refusals_.begin()), std::make_move_iterator(refusals_.end()));
  refusals_.clear();
  dropped = refusals_dropped_;
  refusals_dropped_ = 0;
  return out;
}

size_t Acceptor::pending() {
  std::lock_guard<std::mutex> lk(mu_);
  size_t unserved = serve_ ? 0 : in_flight_;  // a native handshake that ends in a Server needs no owner
  for (const auto& a : ready_) unserved += a.server ? 0 : 1;
  return queue_.size() + in_setup_ + unserved;
}

void Acceptor::push_refusal(Refusal r) {
  std::lock_guard<std::mutex> lk(mu_);
  if (refusals_.size() >= kMaxRefusals) {
    refusals_.pop_front();
    ++refusals_dropped_;
  }
  refusals_.push_back(std::move(r));
  cv_.notify_all();
}

void Acceptor::run() {
  while (!stop_.load()) {
    std::vector<pollfd> fds{{fd_, POLLIN, 0}};
    double t = now_s(), next = t + 0.2;  // wakes now and then to see stop_
    for (Peer* p : peers_) {
      fds.push_back({p->fd, short(p->out_off < p->out.size() ? POLLOUT : POLLIN), 0});
      next = std::min(next, p->deadline);
    }
    int r = ::poll(fds.data(), fds.size(), std::max(0, int((next - t) * 1000) + 1));
    if (r < 0 && errno != EINTR) break;
    if (r > 0 && (fds[0].revents & POLLIN)) {
      int fd = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | (handshake_ ? SOCK_NONBLOCK : 0));
      if (fd < 0 && (errno == EBADF || errno == EINVAL)) break;
      if (fd >= 0) admit(fd);
    }
    t = now_s();
    std::vector<Peer*> keep;
    for (size_t i = 0; i < peers_.size(); ++i) {
      Peer* p = peers_[i];
      short ev = i + 1 < fds.size() ? fds[i + 1].revents : 0;
      bool alive = true;
      if (ev) alive = step(*p, ev);
      if (alive && t > p->deadline) {
        p->refusal.reason = "no handshake within the timeout";
        alive = false;
        p->ok = false;
      }
      if (alive) {
        keep.push_back(p);
        continue;
      }
      if (p->ok) {
        int fl = fcntl(p->fd, F_GETFL);
        if (fl >= 0) fcntl(p->fd, F_SETFL, fl & ~O_NONBLOCK);
        Accepted a{now_s(), p->fd, nullptr, 0, p->addr, std::move(p->client.info)};
        // made under the lock: the owner sees the Server in `ready_` before any message it inboxes
        std::lock_guard<std::mutex> lk(mu_);
        if (serve_) {
          const ServeSetup& how = *serve_;
          auto staging = how.api ? std::make_shared<CudaStaging>(how.api, how.device, how.staging_bytes) : nullptr;
          if (how.sock_buf_bytes > 0) {
            setsockopt(p->fd, SOL_SOCKET, SO_SNDBUF, &how.sock_buf_bytes, sizeof how.sock_buf_bytes);
            setsockopt(p->fd, SOL_SOCKET, SO_RCVBUF, &how.sock_buf_bytes, sizeof how.sock_buf_bytes);
          }
          a.peer_id = next_peer_id_++;
          a.server = Server::make(p->fd, setup_.timeout_s, a.peer_id, how.mem, nullptr, nullptr, how.inbox, staging,
                                  how.held);
          a.fd = -1;
        }
        ready_.push_back(std::move(a));
        --in_flight_;
        cv_.notify_all();
      } else {
        ::close(p->fd);
        p->refusal.addr = p->addr;
        push_refusal(std::move(p->refusal));
        std::lock_guard<std::mutex> lk(mu_);
        --in_flight_;
      }
      delete p;
    }
    peers_.swap(keep);
  }
}

void Acceptor::admit(int fd) {
  if (!handshake_) {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(fd);
    cv_.notify_all();
    return;
  }
  std::string addr = peer_address(fd);
  if (peers_.size() >= kMaxInFlight) {
    ::close(fd);
    push_refusal(Refusal{addr, std::to_string(kMaxInFlight) + " handshakes already in flight", ""});
    return;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  double timeout;
  {
    std::lock_guard<std::mutex> lk(mu_);
    timeout = setup_.timeout_s;
    ++in_flight_;
  }
  Peer* p = new Peer;
  p->fd = fd;
  p->addr = addr;
  p->deadline = now_s() + timeout;
  peers_.push_back(p);
}

bool Acceptor::step(Peer& p, short revents) {
  if (p.out_off < p.out.size()) {
    if (revents & (POLLERR | POLLHUP | POLLNVAL) && !(revents & POLLOUT)) {
      p.ok = false;
      if (p.refusal.reason.empty()) p.refusal.reason = "peer closed the connection during the handshake";
      return false;
    }
    ssize_t n = ::send(p.fd, p.out.data() + p.out_off, p.out.size() - p.out_off, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return true;
    if (n <= 0) {
      p.ok = false;
      if (p.refusal.reason.empty()) p.refusal.reason = std::string("sending the handshake failed: ") + strerror(errno);
      return false;
    }
    p.out_off += size_t(n);
    return p.out_off < p.out.size() || p.step != 2;
  }
  if (p.step == 2) return false;
  size_t need = p.have_header ? kHeaderSize + p.h.meta_len : kHeaderSize;
  size_t have = p.in.size();
  p.in.resize(need);
  ssize_t n = ::recv(p.fd, &p.in[have], need - have, 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
    p.in.resize(have);
    return true;
  }
  if (n <= 0) {
    p.refusal.reason = n == 0 ? "peer closed the connection during the handshake"
                              : std::string("handshake failed: ") + strerror(errno);
    return false;
  }
  p.in.resize(have + size_t(n));
  if (p.in.size() < need) return true;
  if (!p.have_header) {
    std::string kind, why;
    if (!parse_handshake_header(reinterpret_cast<const uint8_t*>(p.in.data()), p.h, kind, why)) {
      refuse(p, kind, why, why);
      return true;
    }
    p.have_header = true;
    if (p.h.meta_len > 0) return true;
  }
  return on_frame(p);
}

void Acceptor::refuse(Peer& p, const std::string& kind, const std::string& reason, const std::string& tell) {
  p.refusal.reason = reason;
  p.out += frame_bytes(kError, error_meta(kind, tell));
  p.step = 2;
  p.ok = false;
}

bool Acceptor::on_frame(Peer& p) {
  const uint8_t* body = reinterpret_cast<const uint8_t*>(p.in.data()) + kHeaderSize;
  size_t n = p.h.meta_len;
  uint16_t type = p.h.type;
  p.in.clear();
  p.have_header = false;
  if (type == kError) {
    p.refusal.reason = "the peer refused the handshake";
    p.refusal.peer_meta.assign(reinterpret_cast<const char*>(body), n);
    return false;
  }
  std::string why;
  if (p.step == 0) {
    if (type != kHello || !parse_hello(body, n, p.client, why)) {
      refuse(p, "protocol", type != kHello ? "expected a HELLO frame to open the handshake" : why,
             "expected a HELLO frame to open the handshake");
      return true;
    }
    HandshakeSetup s;
    bool configured;
    {
      std::lock_guard<std::mutex> lk(mu_);
      s = setup_;
      configured = configured_;
    }
    if (!configured) {
      refuse(p, "handshake", "no KV memory registered here yet", "no KV memory registered here yet");
      return true;
    }
    Hello mine;
    mine.auth = s.auth;
    mine.info = s.info;
    if (!random_bytes(mine.nonce, kNonceBytes)) {
      refuse(p, "handshake", "no random bytes for a nonce", "the peer could not make a nonce");
      return true;
    }
    std::memcpy(p.nonce, mine.nonce, kNonceBytes);
    if (s.auth && p.client.auth && !hello_mac(s.token, "server", p.client.nonce, p.nonce, mine.mac, why)) {
      refuse(p, "auth", why, "the peer cannot compute MACs");
      return true;
    }
    p.out = frame_bytes(kHello, encode_hello(mine));
    p.out_off = 0;
    if (p.client.auth != s.auth) {
      refuse(p, "auth", "auth token configured on one side only", "auth token configured on one side only");
      return true;
    }
    if (s.auth) {
      p.step = 1;
      return true;
    }
  } else {
    if (type != kAuth) {
      refuse(p, "protocol", "expected an AUTH frame", "expected an AUTH frame");
      return true;
    }
    HandshakeSetup s;
    {
      std::lock_guard<std::mutex> lk(mu_);
      s = setup_;
    }
    uint8_t expect[kMacBytes];
    if (!hello_mac(s.token, "client", p.nonce, p.client.nonce, expect, why)) {
      refuse(p, "auth", why, "the peer cannot compute MACs");
      return true;
    }
    if (!equal_constant_time(expect, body, kMacBytes)) {
      refuse(p, "auth", "a peer failed the auth challenge (wrong auth token); refused before any KV byte moved",
             "auth token mismatch");
      return true;
    }
  }
  p.out += frame_bytes(kReady, "");
  p.step = 2;
  p.ok = true;
  return true;
}

}  // namespace p2pkv
