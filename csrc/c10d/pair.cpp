// The nccl backend's native data path on gloo; see pair.h.
#include "pair.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace p2pkv {

static double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------------------------------ planning
Plan plan_messages(const std::vector<Row>& rows, const Settings& s) {
  Plan p;
  uint64_t size = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    uint64_t n = rows[i].len;
    if (n >= s.pack_threshold) {
      p.direct.push_back(uint32_t(i));
      continue;
    }
    if (p.bounds.empty() || (p.packed.size() > p.bounds.back() && size + n > s.chunk_bytes)) {
      if (!p.bounds.empty()) p.sizes.push_back(size);
      p.bounds.push_back(p.packed.size());
      size = 0;
    }
    p.packed.push_back(uint32_t(i));
    size += n;
  }
  if (!p.bounds.empty()) {
    p.sizes.push_back(size);
    p.bounds.push_back(p.packed.size());
  }
  for (uint64_t n : p.sizes) p.max_chunk = std::max(p.max_chunk, n);
  return p;
}

bool table_rows(const uint8_t* body, size_t n, bool is_write, const Regions& mem, bool dst_side, Request& req,
                std::vector<Row>& rows, uint64_t& total, std::string& why) {
  if (!parse_request(body, n, is_write, req, why)) return false;
  if (req.form != kTable) {
    why = "the nccl backend moves segment tables, not block ids";
    return false;
  }
  std::vector<iovec> checked;  // request_iovecs checks every row against the regions
  if (!request_iovecs(req, nullptr, mem, dst_side, false, checked, total, why)) return false;
  rows.resize(size_t(req.count));
  for (uint64_t i = 0; i < req.count; ++i) {
    const uint8_t* row = req.items + 24 * i;
    uint64_t r = load_u64(row), off = load_u64(row + 8), len = load_u64(row + 16);
    rows[i] = Row{reinterpret_cast<uint8_t*>(mem.base[r] + off), len};
  }
  return true;
}

// ------------------------------------------------------------------------------------- Channel
Channel::Channel(c10::intrusive_ptr<c10d::Backend> pg, int peer_rank, Settings s, double timeout_s)
    : pg_(std::move(pg)), peer_(peer_rank), s_(s), timeout_s_(timeout_s) {}

at::Tensor Channel::view(uint8_t* p, uint64_t n) {
  return at::from_blob(p, {int64_t(n)}, at::TensorOptions().dtype(at::kByte));
}

std::vector<at::Tensor>& Channel::staging(std::vector<at::Tensor>& bufs, size_t count, uint64_t bytes) {
  if (bufs.size() < count || (!bufs.empty() && uint64_t(bufs[0].numel()) < bytes)) {
    bufs.clear();
    for (size_t i = 0; i < count; ++i) bufs.push_back(at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte)));
  }
  return bufs;
}

c10::intrusive_ptr<c10d::Work> Channel::op(bool recv, at::Tensor t, int tag) {
  std::vector<at::Tensor> ts{std::move(t)};
  return recv ? pg_->recv(ts, peer_, tag) : pg_->send(ts, peer_, tag);
}

Status Channel::wait(const c10::intrusive_ptr<c10d::Work>& w, const char* what) {
  try {
    w->wait(std::chrono::milliseconds(int64_t(timeout_s_ * 1000) + 1));
    return {};
  } catch (const std::exception& e) {
    std::string msg(e.what());
    msg = msg.substr(0, msg.find('\n'));
    if (msg.find("imed out") != std::string::npos || msg.find("imeout") != std::string::npos)
      return Status::fail(kTimeout, std::string(what) + " made no progress within the timeout (" + msg + ")");
    return Status::fail(kClosed, std::string(what) + " failed, the peer went away: " + msg);
  }
}

static void pack(const std::vector<Row>& rows, const Plan& p, size_t j, uint8_t* out) {
  for (size_t k = p.bounds[j]; k < p.bounds[j + 1]; ++k) {
    const Row& r = rows[p.packed[k]];
    std::memcpy(out, r.addr, r.len);
    out += r.len;
  }
}

static void unpack(const std::vector<Row>& rows, const Plan& p, size_t j, const uint8_t* in) {
  for (size_t k = p.bounds[j]; k < p.bounds[j + 1]; ++k) {
    const Row& r = rows[p.packed[k]];
    std::memcpy(r.addr, in, r.len);
    in += r.len;
  }
}

Status Channel::send(const std::vector<Row>& rows, const Plan& p) {
  try {
    std::vector<c10::intrusive_ptr<c10d::Work>> direct;
    for (size_t k = 0; k < p.direct.size(); ++k) {
      const Row& r = rows[p.direct[k]];
      direct.push_back(op(false, view(r.addr, r.len), kDirectTag + int(k)));
    }
    size_t n = p.chunks(), slots = std::min<size_t>(std::max<uint32_t>(1, s_.depth), n);
    if (n) {
      auto& bufs = staging(send_bufs_, slots, p.max_chunk);
      std::vector<c10::intrusive_ptr<c10d::Work>> inflight(slots);
      for (size_t j = 0; j < n; ++j) {
        size_t b = j % slots;
        if (inflight[b]) {
          Status st = wait(inflight[b], "sending a packed chunk");
          if (!st.ok()) return st;
        }
        pack(rows, p, j, bufs[b].data_ptr<uint8_t>());
        inflight[b] = op(false, bufs[b].narrow(0, 0, int64_t(p.sizes[j])), int(j));
      }
      for (auto& w : inflight) {
        if (!w) continue;
        Status st = wait(w, "sending a packed chunk");
        if (!st.ok()) return st;
      }
    }
    for (auto& w : direct) {
      Status st = wait(w, "sending a segment");
      if (!st.ok()) return st;
    }
    return {};
  } catch (const std::exception& e) {
    return Status::fail(kClosed, std::string("posting a send failed: ") + e.what());
  }
}

Status Channel::post_recvs(const std::vector<Row>& rows, const Plan& p, Incoming& in) {
  try {
    for (size_t k = 0; k < p.direct.size(); ++k) {
      const Row& r = rows[p.direct[k]];
      in.direct.push_back(op(true, view(r.addr, r.len), kDirectTag + int(k)));
    }
    size_t n = p.chunks();
    if (!n) return {};
    uint64_t window = p.max_chunk ? s_.recv_window / p.max_chunk : 0;
    in.slots = std::min<size_t>(n, std::max<uint64_t>({1, s_.depth, window}));
    auto& bufs = staging(recv_bufs_, in.slots, p.max_chunk);
    for (size_t j = 0; j < in.slots; ++j) in.posted.push_back(op(true, bufs[j].narrow(0, 0, int64_t(p.sizes[j])), int(j)));
    return {};
  } catch (const std::exception& e) {
    return Status::fail(kClosed, std::string("posting a receive failed: ") + e.what());
  }
}

Status Channel::finish_recvs(const std::vector<Row>& rows, const Plan& p, Incoming& in) {
  try {
    size_t n = p.chunks();
    for (size_t j = 0; j < n; ++j) {
      size_t b = j % in.slots;
      Status st = wait(in.posted[b], "receiving a packed chunk");
      if (!st.ok()) return st;
      unpack(rows, p, j, recv_bufs_[b].data_ptr<uint8_t>());
      if (j + in.slots < n)
        in.posted[b] = op(true, recv_bufs_[b].narrow(0, 0, int64_t(p.sizes[j + in.slots])), int(j + in.slots));
    }
    for (auto& w : in.direct) {
      Status st = wait(w, "receiving a segment");
      if (!st.ok()) return st;
    }
    return {};
  } catch (const std::exception& e) {
    return Status::fail(kClosed, std::string("posting a receive failed: ") + e.what());
  }
}

Status Channel::send_baseline(uint64_t n) {
  try {
    if (!baseline_.defined() || uint64_t(baseline_.numel()) != n)
      baseline_ = at::empty({int64_t(n)}, at::TensorOptions().dtype(at::kByte));
    return wait(op(false, baseline_, kBaselineTag), "baseline send");
  } catch (const std::exception& e) {
    return Status::fail(kClosed, std::string("posting the baseline send failed: ") + e.what());
  }
}

c10::intrusive_ptr<c10d::Work> Channel::post_baseline_recv(uint64_t n) {
  if (!baseline_.defined() || uint64_t(baseline_.numel()) != n)
    baseline_ = at::empty({int64_t(n)}, at::TensorOptions().dtype(at::kByte));
  return op(true, baseline_, kBaselineTag);
}

// --------------------------------------------------------------------------------- PgInitiator
std::shared_ptr<PgInitiator> PgInitiator::make(int fd, double timeout_s, std::unique_ptr<Channel> ch, Regions mem) {
  std::shared_ptr<PgInitiator> l(new PgInitiator(fd, timeout_s));
  l->ch_ = std::move(ch);
  l->mem_ = std::move(mem);
  Status st = set_blocking_with_timeout(fd, timeout_s);
  if (!st.ok()) l->mark_dead(st.message);
  l->start();
  return l;
}

PgInitiator::~PgInitiator() { close(); }

void PgInitiator::post(std::shared_ptr<Op> op) {
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

void PgInitiator::on_close() {
  std::deque<std::shared_ptr<Op>> left;
  bool busy;
  {
    std::lock_guard<std::mutex> lk(mu_);
    left.swap(queue_);
    busy = busy_;
    cv_.notify_all();
  }
  for (auto& op : left) op->finish(Status::fail(kLocal, "transport closed locally"));
  if (busy) ::shutdown(fd_, SHUT_RDWR);  // an op waiting for its reply ends now
}

void PgInitiator::run() {
  while (true) {
    std::shared_ptr<Op> op;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return !queue_.empty() || stopping_.load(); });
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
      if (!st.ok()) {
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

Status PgInitiator::expect_reply(Op& op, uint64_t payload) {
  uint8_t raw[kHeaderSize];
  Status st = recv_bytes(fd_, raw, sizeof raw);
  if (!st.ok()) return st;
  Header h;
  std::string why;
  if (!parse_header(raw, h, why)) return Status::fail(kProtocol, "bad reply: " + why);
  if (h.type == kError) {
    if (h.meta_len > 64u << 10) return Status::fail(kProtocol, "error reply too long");
    op.peer_meta.resize(h.meta_len);
    st = recv_bytes(fd_, &op.peer_meta[0], h.meta_len);
    if (!st.ok()) return st;
    return Status::fail(kRefused, "the peer refused the request");
  }
  if (h.type != kAck || h.meta_len != 0)
    return Status::fail(kProtocol, "expected an ACK reply, got frame type " + std::to_string(h.type));
  if (h.payload_len != payload)
    return Status::fail(kProtocol, "the peer announced " + std::to_string(h.payload_len) + " bytes, " +
                                       std::to_string(payload) + " expected");
  return {};
}

Status PgInitiator::run_op(Op& op) {
  double t0 = now_s();
  Status st;
  if (op.kind == kOpSend) {
    st = send_bytes(fd_, op.frame.data(), op.frame.size());
  } else if (op.kind == kOpBaseline) {
    c10::intrusive_ptr<c10d::Work> w;
    try {
      w = ch_->post_baseline_recv(op.nbytes);
    } catch (const std::exception& e) {
      return Status::fail(kClosed, std::string("posting the baseline receive failed: ") + e.what());
    }
    t0 = now_s();
    st = send_bytes(fd_, op.frame.data(), op.frame.size());
    if (st.ok()) st = expect_reply(op, op.nbytes);
    if (st.ok()) st = ch_->wait(w, "baseline receive");
  } else {
    bool write = op.kind == kOpWrite;
    Request req;
    std::vector<Row> rows;
    uint64_t total = 0;
    std::string why;
    if (!table_rows(reinterpret_cast<const uint8_t*>(op.local.data()), op.local.size(), false, mem_, !write, req,
                    rows, total, why))
      return Status::fail(kLocal, "local rows refused: " + why);
    if (total != op.nbytes)
      return Status::fail(kLocal, "local rows add up to " + std::to_string(total) + " bytes, not " +
                                      std::to_string(op.nbytes));
    Plan plan = plan_messages(rows, ch_->settings());
    if (write) {
      st = send_bytes(fd_, op.frame.data(), op.frame.size());
      if (st.ok()) st = ch_->send(rows, plan);
      if (st.ok()) st = expect_reply(op, 0);
    } else {
      Channel::Incoming in;
      st = ch_->post_recvs(rows, plan, in);  // every receive posted before P is asked to send
      if (st.ok()) st = send_bytes(fd_, op.frame.data(), op.frame.size());
      if (st.ok()) st = expect_reply(op, op.nbytes);
      if (st.ok()) st = ch_->finish_recvs(rows, plan, in);
    }
  }
  op.seconds = now_s() - t0;
  return st;
}

// ------------------------------------------------------------------------------------ PgServer
std::shared_ptr<PgServer> PgServer::make(int fd, double timeout_s, std::unique_ptr<Channel> ch, uint64_t peer_id,
                                         Regions mem, std::shared_ptr<Inbox> inbox) {
  std::shared_ptr<PgServer> s(new PgServer(fd, timeout_s));
  s->ch_ = std::move(ch);
  s->peer_id_ = peer_id;
  s->mem_ = std::move(mem);
  s->inbox_ = std::move(inbox);
  Status st = set_blocking_with_timeout(fd, timeout_s);
  if (!st.ok()) s->mark_dead(st.message);
  s->start();
  return s;
}

PgServer::~PgServer() { close(); }

void PgServer::on_close() { ::shutdown(fd_, SHUT_RDWR); }  // wakes the thread from its poll

void PgServer::run() {
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

Status PgServer::serve_one(const Header& h, bool& stop) {
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
    case kDataRead:
    case kDataWrite:
      return serve_request(h);
    default:
      return Status::fail(kProtocol, "unexpected frame type " + std::to_string(h.type) + " from a connected peer");
  }
}

Status PgServer::refuse(const std::string& request_id, const std::string& why) {
  std::string msg = "request '" + request_id + "' refused: " + why;
  std::string meta = error_meta("request", msg);
  uint8_t h[kHeaderSize];
  encode_header(h, kError, uint32_t(meta.size()), 0);
  std::vector<iovec> v{iovec{h, sizeof h}, iovec{&meta[0], meta.size()}};
  (void)send_all(fd_, v);
  return Status::fail(kRefused, msg);
}

Status PgServer::serve_request(const Header& h) {
  bool write = h.type == kDataWrite;
  std::string body(h.meta_len, '\0');
  Status st = recv_bytes(fd_, &body[0], body.size());
  if (!st.ok()) return st;
  Request req;
  std::vector<Row> rows;
  uint64_t total = 0;
  std::string why;
  if (!table_rows(reinterpret_cast<const uint8_t*>(body.data()), body.size(), write, mem_, write, req, rows, total,
                  why))
    return refuse(req.request_id, why);
  if (total != h.payload_len)
    return refuse(req.request_id, "segments add up to " + std::to_string(total) + " bytes but the frame announces " +
                                      std::to_string(h.payload_len));
  Plan plan = plan_messages(rows, ch_->settings());
  uint8_t ack[kHeaderSize];
  if (!write) {
    encode_header(ack, kAck, 0, total);
    st = send_bytes(fd_, ack, sizeof ack);
    if (st.ok()) st = ch_->send(rows, plan);
  } else {
    Channel::Incoming in;
    st = ch_->post_recvs(rows, plan, in);
    if (st.ok()) st = ch_->finish_recvs(rows, plan, in);
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

Status PgServer::serve_baseline(const Header& h) {
  if (h.meta_len != 8) return Status::fail(kProtocol, "baseline frame without its size");
  uint8_t raw[8];
  Status st = recv_bytes(fd_, raw, 8);
  if (!st.ok()) return st;
  uint64_t n = load_u64(raw);
  if (n == 0 || n > kMaxBaseline) return Status::fail(kProtocol, "bad baseline size " + std::to_string(n));
  uint8_t ack[kHeaderSize];
  encode_header(ack, kAck, 0, n);
  st = send_bytes(fd_, ack, sizeof ack);
  if (st.ok()) st = ch_->send_baseline(n);
  return st;
}

}  // namespace p2pkv
