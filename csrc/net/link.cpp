// Native data connections; see link.h.
#include "link.h"
#include "threads.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

namespace p2pkv {

static double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------------------------------------ Op
bool Op::wait(double timeout_s) {
  if (finished.load(std::memory_order_acquire)) return true;
  std::unique_lock<std::mutex> lk(mu_);
  auto ready = [this] { return finished.load(std::memory_order_acquire); };
  if (timeout_s < 0) {
    cv_.wait(lk, ready);
    return true;
  }
  return cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), ready);
}

void Op::finish(Status st) {
  std::lock_guard<std::mutex> lk(mu_);
  if (finished.load()) return;
  error = st.kind;
  message = std::move(st.message);
  finished.store(true, std::memory_order_release);
  cv_.notify_all();
}

// --------------------------------------------------------------------------------------- Inbox
bool Inbox::push(uint64_t peer, std::string body) {
  std::lock_guard<std::mutex> lk(mu_);
  if (bytes_ + body.size() > max_bytes_) return false;
  bytes_ += body.size();
  items_.emplace_back(peer, std::move(body));
  return true;
}

std::vector<std::pair<uint64_t, std::string>> Inbox::drain() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<std::pair<uint64_t, std::string>> out(std::make_move_iterator(items_.begin()),
                                                    std::make_move_iterator(items_.end()));
  items_.clear();
  bytes_ = 0;
  return out;
}

size_t Inbox::size() {
  std::lock_guard<std::mutex> lk(mu_);
  return items_.size();
}

// ------------------------------------------------------------------------------------- HeldSet
void HeldSet::hold(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  held_.emplace(id, 0);
  gone_.erase(id);
  cv_.notify_all();
}

bool HeldSet::unhold(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = held_.find(id);
  if (it == held_.end()) return leaving_.find(id) == leaving_.end();
  int inflight = it->second;
  held_.erase(it);
  if (inflight) leaving_[id] += inflight;
  if (gone_.insert(id).second) {
    gone_order_.push_back(id);
    if (gone_order_.size() > kGoneKept) {
      gone_.erase(gone_order_.front());
      gone_order_.pop_front();
    }
  }
  return inflight == 0;
}

bool HeldSet::serving(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = held_.find(id);
  return (it != held_.end() && it->second > 0) || leaving_.find(id) != leaving_.end();
}

int HeldSet::begin(const std::string& id, double wait_s) {
  std::unique_lock<std::mutex> lk(mu_);
  auto until = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                       std::chrono::duration<double>(wait_s));
  while (true) {
    auto it = held_.find(id);
    if (it != held_.end()) {
      ++it->second;
      return 1;
    }
    if (gone_.count(id)) return 0;
    if (cv_.wait_until(lk, until) == std::cv_status::timeout) {
      auto again = held_.find(id);
      if (again == held_.end()) return gone_.count(id) ? 0 : -1;
      ++again->second;
      return 1;
    }
  }
}

void HeldSet::end(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = held_.find(id);
  if (it != held_.end()) {
    --it->second;
    return;
  }
  auto lv = leaving_.find(id);
  if (lv != leaving_.end() && --lv->second <= 0) leaving_.erase(lv);
}

// ---------------------------------------------------------------------------------------- Link
Link::Link(int fd, double timeout_s) : fd_(fd), timeout_s_(timeout_s) {}

Link::~Link() { close(); }

void Link::start() {
  thread_ = std::thread([this] {
    use_io_cpus();
    run();
  });
}

Status Link::send_rows(const void* head, size_t head_len, std::vector<iovec>& rows) {
  if (staging_) return staging_->send(fd_, head, head_len, rows);
  if (head_len) rows.insert(rows.begin(), iovec{const_cast<void*>(head), head_len});
  return send_all(fd_, rows);
}

Status Link::recv_rows(std::vector<iovec>& rows) { return staging_ ? staging_->recv(fd_, rows) : recv_all(fd_, rows); }

void Link::mark_dead(const std::string& why) {
  std::lock_guard<std::mutex> lk(state_mu_);
  if (dead_.load()) return;
  dead_reason_ = why;
  dead_.store(true);
}

std::string Link::dead_reason() {
  std::lock_guard<std::mutex> lk(state_mu_);
  return dead_reason_;
}

void Link::close() {
  {
    std::lock_guard<std::mutex> lk(state_mu_);
    if (closed_) return;
    closed_ = true;
  }
  stopping_.store(true);
  on_close();
  if (thread_.joinable()) thread_.join();
  mark_dead("transport closed locally");
  ::shutdown(fd_, SHUT_RDWR);
  ::close(fd_);
}

// ----------------------------------------------------------------------------------- Initiator
std::shared_ptr<Initiator> Initiator::make(int fd, double timeout_s, std::shared_ptr<CudaStaging> staging) {
  std::shared_ptr<Initiator> l(new Initiator(fd, timeout_s));
  l->staging_ = std::move(staging);
  Status st = set_blocking_with_timeout(fd, timeout_s);
  if (!st.ok()) l->mark_dead(st.message);
  l->start();
  return l;
}

void Initiator::post(std::shared_ptr<Op> op) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!dead_.load() && !stopping_.load()) {
      queue_.push_back(std::move(op));
      cv_.notify_one();
      return;
    }
  }
  op->finish(Status::fail(stopping_.load() ? kLocal : kClosed, "connection is down (" + dead_reason() + ")"));
}

void Initiator::on_close() {
  std::deque<std::shared_ptr<Op>> left;
  bool busy;
  {
    std::lock_guard<std::mutex> lk(mu_);
    left.swap(queue_);
    busy = busy_;
    cv_.notify_all();
  }
  for (auto& op : left) op->finish(Status::fail(kLocal, "transport closed locally"));
  if (busy) ::shutdown(fd_, SHUT_RDWR);  // an op in flight ends now instead of at its timeout
}

void Initiator::run() {
  while (true) {
    std::shared_ptr<Op> op;
    {
      std::unique_lock<std::mutex> lk(mu_);
      // while idle, look at the socket now and then: a peer that went away is noticed before the next op
      if (!cv_.wait_for(lk, std::chrono::milliseconds(200), [this] { return !queue_.empty() || stopping_.load(); })) {
        lk.unlock();
        check_idle_peer();
        continue;
      }
      if (queue_.empty()) break;
      op = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    Status st;
    if (dead_.load()) {
      st = Status::fail(kClosed, "connection is down (" + dead_reason() + ")");
    } else {
      st = run_op(*op);
      if (!st.ok() && st.kind != kGoneErr && st.kind != kNotHeldYet) {  // "gone" and "not yet" leave the link up
        if (stopping_.load()) st = Status::fail(kLocal, "transport closed locally");
        mark_dead(st.message);
        ::shutdown(fd_, SHUT_RDWR);
      }
    }
    op->finish(std::move(st));
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
  }
  if (!dead_.load()) {  // tell the peer, so it ends its side at once
    uint8_t h[kHeaderSize];
    encode_header(h, kClose, 0, 0);
    (void)::send(fd_, h, sizeof h, MSG_NOSIGNAL | MSG_DONTWAIT);
  }
}

void Initiator::check_idle_peer() {
  if (dead_.load()) return;
  pollfd p{fd_, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return;
  char c;
  if (p.revents & (POLLHUP | POLLERR | POLLRDHUP) || ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0) {
    mark_dead("peer closed");
  } else {
    mark_dead("the peer sent bytes nobody asked for");
  }
  ::shutdown(fd_, SHUT_RDWR);
}

Status Initiator::expect_reply(Op& op, Header& h) {
  uint8_t raw[kHeaderSize];
  Status st = recv_bytes(fd_, raw, sizeof raw);
  if (!st.ok()) return st;
  std::string why;
  if (!parse_header(raw, h, why)) return Status::fail(kProtocol, "bad reply: " + why);
  if (h.type == kError) {
    if (h.meta_len > 64u << 10) return Status::fail(kProtocol, "error reply too long");
    op.peer_meta.resize(h.meta_len);
    st = recv_bytes(fd_, &op.peer_meta[0], h.meta_len);
    if (!st.ok()) return st;
    return Status::fail(kRefused, "the peer refused the request");
  }
  if (h.type == kGone && h.meta_len == 0 && h.payload_len == 0 && op.kind == kOpRead)
    return Status::fail(kGoneErr, "the peer no longer holds this request (its blocks were released), so nothing was read");
  if (h.type == kGone && h.meta_len == 0 && h.payload_len == 1 && op.kind == kOpRead)
    return Status::fail(kNotHeldYet, "the peer does not hold this request yet (its engine has not published it), so "
                                     "nothing was read");
  if (h.type != kAck || h.meta_len != 0) return Status::fail(kProtocol, "expected an ACK reply, got frame type " + std::to_string(h.type));
  return {};
}

Status Initiator::run_op(Op& op) {
  std::vector<iovec> rows = std::move(op.iov);
  if (!op.local.empty()) {
    Request req;
    std::string why;
    uint64_t total = 0;
    auto body = reinterpret_cast<const uint8_t*>(op.local.data());
    if (!parse_request(body, op.local.size(), op.kind == kOpWrite, req, why) ||
        !request_iovecs(req, op.geo.get(), op.geo ? op.geo->mem : Regions{}, op.kind == kOpRead, false, rows, total,
                        why))
      return Status::fail(kLocal, "local rows refused: " + why);
    if (total != op.nbytes) return Status::fail(kLocal, "local rows add up to " + std::to_string(total) + " bytes, not " + std::to_string(op.nbytes));
  }
  if (op.event != nullptr) {
    int err = op.device >= 0 ? op.api->set_device(op.device) : 0;
    if (err == 0) err = op.api->event_sync(op.event);
    if (err != 0) return Status::fail(kLocal, std::string("waiting for the device copy failed: ") + op.api->error_string(err));
  }
  double t0 = now_s();
  Header h;
  Status st;
  if (op.kind == kOpWrite) {
    st = send_rows(op.frame.data(), op.frame.size(), rows);
    if (st.ok()) st = expect_reply(op, h);
  } else {
    st = send_bytes(fd_, op.frame.data(), op.frame.size());
    if (st.ok() && op.kind != kOpSend) {
      st = expect_reply(op, h);
      if (st.ok() && h.payload_len != op.nbytes)
        st = Status::fail(kProtocol, "the peer announced " + std::to_string(h.payload_len) + " bytes, " + std::to_string(op.nbytes) + " expected");
      if (st.ok()) st = op.kind == kOpBaseline ? recv_all(fd_, rows) : recv_rows(rows);
    }
  }
  op.seconds = now_s() - t0;
  return st;
}

// -------------------------------------------------------------------------------------- Server
std::shared_ptr<Server> Server::make(int fd, double timeout_s, uint64_t peer_id, Regions mem,
                                     std::shared_ptr<const Geometry> read_geo,
                                     std::shared_ptr<const Geometry> write_geo, std::shared_ptr<Inbox> inbox,
                                     std::shared_ptr<CudaStaging> staging, std::shared_ptr<HeldSet> held) {
  std::shared_ptr<Server> s(new Server(fd, timeout_s));
  s->staging_ = std::move(staging);
  s->held_ = std::move(held);
  s->peer_id_ = peer_id;
  s->mem_ = std::move(mem);
  s->read_geo_ = std::move(read_geo);
  s->write_geo_ = std::move(write_geo);
  s->inbox_ = std::move(inbox);
  Status st = set_blocking_with_timeout(fd, timeout_s);
  if (!st.ok()) s->mark_dead(st.message);
  s->start();
  return s;
}

void Server::run() {
  while (!dead_.load() && !stopping_.load()) {
    if (!wait_readable(fd_)) {
      mark_dead("polling the connection failed");
      break;
    }
    if (stopping_.load()) break;
    uint8_t raw[kHeaderSize];
    ssize_t got = ::recv(fd_, raw, 1, MSG_PEEK);
    if (got <= 0) {
      mark_dead(got == 0 ? "peer closed" : std::string("connection lost: ") + strerror(errno));
      break;
    }
    Status st = recv_bytes(fd_, raw, sizeof raw);
    Header h;
    std::string why;
    if (st.ok() && !parse_header(raw, h, why)) st = Status::fail(kProtocol, why);
    bool stop = false;
    if (st.ok()) st = serve_one(h, stop);
    if (!st.ok()) {
      mark_dead(st.message);
      break;
    }
    if (stop) {
      mark_dead("peer closed");
      break;
    }
  }
  ::shutdown(fd_, SHUT_RDWR);
}

void Server::on_close() { ::shutdown(fd_, SHUT_RDWR); }  // wakes the thread from its poll

Status Server::serve_one(const Header& h, bool& stop) {
  switch (h.type) {
    case kClose:
      stop = true;
      return {};
    case kNotif: {
      if (h.meta_len > kMaxNotify) return Status::fail(kProtocol, "notification exceeds the limit");
      std::string body(h.meta_len, '\0');
      Status st = recv_bytes(fd_, &body[0], body.size());
      if (st.ok() && !inbox_->push(peer_id_, std::move(body)))
        return Status::fail(kProtocol, "notifications are not being drained (inbox full)");
      return st;
    }
    case kBaseline:
      return serve_baseline(h);
    case kGeometry:
      return take_geometry(h);
    case kDataRead:
    case kDataWrite:
      return serve_request(h);
    default:
      return Status::fail(kProtocol, "unexpected frame type " + std::to_string(h.type) + " from a connected peer");
  }
}

Status Server::take_geometry(const Header& h) {
  std::string body(h.meta_len, '\0');
  Status st = recv_bytes(fd_, &body[0], body.size());
  if (!st.ok()) return st;
  Geometry g;
  bool write = false;
  std::string why;
  if (!parse_geometry(reinterpret_cast<const uint8_t*>(body.data()), body.size(), mem_, g, write, why)) {
    std::string meta = error_meta("geometry", "block geometry refused: " + why);
    uint8_t head[kHeaderSize];
    encode_header(head, kError, uint32_t(meta.size()), 0);
    std::vector<iovec> v{iovec{head, sizeof head}, iovec{&meta[0], meta.size()}};
    (void)send_all(fd_, v);
    return Status::fail(kProtocol, "the peer's block geometry was refused: " + why);
  }
  (write ? write_geo_ : read_geo_) = std::make_shared<const Geometry>(std::move(g));
  return {};
}

Status Server::refuse(const std::string& request_id, const std::string& why) {
  std::string msg = "request '" + request_id + "' refused: " + why;
  std::string meta = error_meta("request", msg);
  uint8_t h[kHeaderSize];
  encode_header(h, kError, uint32_t(meta.size()), 0);
  std::vector<iovec> v{iovec{h, sizeof h}, iovec{&meta[0], meta.size()}};
  (void)send_all(fd_, v);
  return Status::fail(kRefused, msg);
}

Status Server::serve_request(const Header& h) {
  bool write = h.type == kDataWrite;
  std::string body(h.meta_len, '\0');
  Status st = recv_bytes(fd_, &body[0], body.size());
  if (!st.ok()) return st;
  Request req;
  std::string why;
  std::vector<iovec> rows;
  uint64_t total = 0;
  if (!parse_request(reinterpret_cast<const uint8_t*>(body.data()), body.size(), write, req, why))
    return refuse(req.request_id, why);
  if (!request_iovecs(req, (write ? write_geo_ : read_geo_).get(), mem_, write, write, rows, total, why))
    return refuse(req.request_id, why);
  if (total != h.payload_len)
    return refuse(req.request_id, "segments add up to " + std::to_string(total) + " bytes but the frame announces " +
                                      std::to_string(h.payload_len));
  uint8_t ack[kHeaderSize];
  if (!write) {
    // a hold not yet published is waited for up to half the timeout, so D's read still answers in time;
    // then the reply says "not held yet" (payload length 1) and D may ask again, or "gone" (0)
    int held = (req.flags & kRequireHeld) ? (held_ ? held_->begin(req.request_id, timeout_s_ / 2) : 0) : 1;
    if (held != 1) {
      encode_header(ack, kGone, 0, held < 0 ? 1 : 0);
      return send_bytes(fd_, ack, sizeof ack);
    }
    encode_header(ack, kAck, 0, total);
    st = send_rows(ack, sizeof ack, rows);
    if (req.flags & kRequireHeld) held_->end(req.request_id);
  } else {
    st = recv_rows(rows);
    if (st.ok() && req.notify_len &&
        !inbox_->push(peer_id_, std::string(reinterpret_cast<const char*>(req.notify), req.notify_len)))
      st = Status::fail(kProtocol, "notifications are not being drained (inbox full)");
    if (st.ok()) {
      encode_header(ack, kAck, 0, 0);
      st = send_bytes(fd_, ack, sizeof ack);
    }
  }
  if (st.ok()) served_.fetch_add(1);
  return st;
}

Status Server::serve_baseline(const Header& h) {
  if (h.meta_len != 8) return Status::fail(kProtocol, "baseline frame without its size");
  uint8_t raw[8];
  Status st = recv_bytes(fd_, raw, 8);
  if (!st.ok()) return st;
  uint64_t n = load_u64(raw);
  if (n == 0 || n > kMaxBaseline) return Status::fail(kProtocol, "bad baseline size " + std::to_string(n));
  static constexpr size_t kChunk = 256u << 20;
  std::vector<char>& buf = baseline_buf_;
  if (buf.size() < std::min<uint64_t>(n, kChunk)) buf.resize(size_t(std::min<uint64_t>(n, kChunk)));
  uint8_t ack[kHeaderSize];
  encode_header(ack, kAck, 0, n);
  st = send_bytes(fd_, ack, sizeof ack);
  for (uint64_t sent = 0; st.ok() && sent < n; sent += buf.size())
    st = send_bytes(fd_, buf.data(), size_t(std::min<uint64_t>(buf.size(), n - sent)));
  return st;
}

}  // namespace p2pkv
