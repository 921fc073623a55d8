// One data connection to a peer, driven by a native thread that never needs Python.
// The dialling side (Initiator) runs posted ops in order: send a request frame, move the
// bytes, take the reply. The accepting side (Server) parses each request natively, checks it
// against the registered memory, moves the bytes and replies. Completion is an atomic that the
// caller polls, or a wait on a condition variable (made without the GIL by the binding).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cuda_staging.h"
#include "frame.h"
#include "geometry.h"
#include "io.h"

namespace p2pkv {

enum OpKind : int { kOpRead = 0, kOpWrite = 1, kOpSend = 2, kOpBaseline = 3 };

struct Op {
  OpKind kind = kOpSend;
  std::string frame;                 // header and body, sent first
  std::string local;                 // this side's rows as a request body (parse_request format), or empty
  std::vector<iovec> iov;            // this side's rows when given directly (baseline buffer)
  std::shared_ptr<const Geometry> geo;
  uint64_t nbytes = 0;
  const CudaApi* api = nullptr;      // with `event`: the frame goes out only once that CUDA event completed
  void* event = nullptr;             // (a device copy whose end the frame announces)
  int device = -1;

  std::atomic<bool> finished{false};
  ErrKind error = kOk;
  std::string message;               // why it failed
  std::string peer_meta;             // the peer's ERROR frame body (msgpack), when it refused
  double seconds = 0;                // from the first byte sent to the last byte moved

  bool wait(double timeout_s);       // false if still running after timeout_s (< 0: for good)
  void finish(Status st);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

// Messages from peers (NOTIF frames and writes' notify), msgpack bodies kept for the caller to
// decode; bounded so that a peer nobody drains cannot grow memory without limit.
class Inbox {
 public:
  explicit Inbox(size_t max_bytes) : max_bytes_(max_bytes) {}
  bool push(uint64_t peer, std::string body);  // false when full
  std::vector<std::pair<uint64_t, std::string>> drain();
  size_t size();

 private:
  std::mutex mu_;
  std::deque<std::pair<uint64_t, std::string>> items_;
  size_t bytes_ = 0, max_bytes_;
};

// The request ids whose blocks this side's engine still holds, and how many reads of each are
// being served: a read that requires a held request is served only while it is in the set, and
// the engine frees a request's blocks only once no read of it is in flight. A read may come
// before the engine has published the hold (an engine hands out a request's transfer parameters
// before its next step saves it), so a read of an id never seen waits a while for its hold; one
// of an id that was held and let go is refused at once.
class HeldSet {
 public:
  void hold(const std::string& id);
  bool unhold(const std::string& id);  // false while a read of it is still being served
  bool serving(const std::string& id);
  // A read starts: 1 when `id` is held (the read counts), 0 when it was held and let go, -1 when it
  // was not held within `wait_s` (never published yet: the reader may ask again).
  int begin(const std::string& id, double wait_s);
  void end(const std::string& id);

 private:
  static constexpr size_t kGoneKept = 1u << 16;
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<std::string, int> held_;     // id -> reads in flight
  std::unordered_map<std::string, int> leaving_;  // unheld ids with reads still in flight
  std::unordered_set<std::string> gone_;          // recently unheld, oldest first in gone_order_
  std::deque<std::string> gone_order_;
};

class Link {
 public:
  virtual ~Link();
  bool alive() const { return !dead_.load(); }
  std::string dead_reason();
  void close();  // fails what is queued, stops the thread, closes the descriptor

 protected:
  Link(int fd, double timeout_s);
  void mark_dead(const std::string& why);
  void start();
  virtual void run() = 0;
  virtual void on_close() {}

  int fd_;
  double timeout_s_;
  std::shared_ptr<CudaStaging> staging_;
  Status send_rows(const void* head, size_t head_len, std::vector<iovec>& rows);
  Status recv_rows(std::vector<iovec>& rows);
  std::atomic<bool> dead_{false}, stopping_{false};
  std::mutex state_mu_;
  std::string dead_reason_;
  std::thread thread_;
  bool closed_ = false;
};

class Initiator : public Link {
 public:
  // `staging`: the registered memory is on a GPU and moves through it (null: host memory).
  static std::shared_ptr<Initiator> make(int fd, double timeout_s, std::shared_ptr<CudaStaging> staging);
  // Queues `op`; it fails at once if the link is down.
  void post(std::shared_ptr<Op> op);

 private:
  using Link::Link;
  void run() override;
  void on_close() override;
  Status run_op(Op& op);
  Status expect_reply(Op& op, Header& h);
  void check_idle_peer();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Op>> queue_;
  bool busy_ = false;
};

class Server : public Link {
 public:
  // Serves one accepted connection: requests by block ids use `read_geo` (this side's source
  // rows) or `write_geo` (destination rows), segment tables are checked against `mem`. Either
  // geometry may be null and come later from the peer (kGeometry), checked against `mem`.
  static std::shared_ptr<Server> make(int fd, double timeout_s, uint64_t peer_id, Regions mem,
                                      std::shared_ptr<const Geometry> read_geo,
                                      std::shared_ptr<const Geometry> write_geo, std::shared_ptr<Inbox> inbox,
                                      std::shared_ptr<CudaStaging> staging, std::shared_ptr<HeldSet> held);
  uint64_t served() const { return served_.load(); }

 private:
  using Link::Link;
  void run() override;
  Status serve_one(const Header& h, bool& stop);
  Status serve_request(const Header& h);
  Status serve_baseline(const Header& h);
  Status take_geometry(const Header& h);  // kGeometry: the peer's rows of this side, checked, for this pair
  Status refuse(const std::string& request_id, const std::string& why);
  void on_close() override;

  uint64_t peer_id_ = 0;
  Regions mem_;
  std::shared_ptr<const Geometry> read_geo_, write_geo_;
  std::shared_ptr<Inbox> inbox_;
  std::shared_ptr<HeldSet> held_;
  std::atomic<uint64_t> served_{0};
  std::vector<char> baseline_buf_;  // kept between baseline requests, as a raw user keeps a buffer
};

}  // namespace p2pkv
