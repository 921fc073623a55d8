// The nccl backend's native data path on CPU tensors (gloo): after the handshake a C++ thread per
// connection owns the control socket. The dialling side (PgInitiator) runs posted ops in order
// (post receives, send the request frame, take the reply, unpack as chunks land; or the mirror
// for a write); the accepting side (PgServer) parses each request (csrc/net/frame.*), checks it
// against the registered memory (csrc/net/geometry.*), and moves its bytes with
// c10d::Backend::send/recv on the pair's own two-rank group, waiting on the Work objects here.
// Nothing on a transfer's path needs Python; completion is Op::finished, polled or waited for.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "frame.h"
#include "geometry.h"
#include "io.h"
#include "link.h"

namespace p2pkv {

// How messages are cut; a connection uses the accepting side's values (both must cut alike).
struct Settings {
  uint64_t pack_threshold = 512u << 10;  // rows this long go as views of the memory, shorter ones packed
  uint64_t chunk_bytes = 2u << 20;       // packed chunk size (a lone row may exceed it)
  uint32_t depth = 2;                    // packed chunks in flight on the sender
  uint64_t recv_window = 256u << 20;     // receiver: bytes of chunks posted before the data is asked for
};

struct Row {
  uint8_t* addr;
  uint64_t len;
};

// One transfer's messages: each direct row alone (tag kDirectTag + k), the packed rows greedily in
// chunks of at most chunk_bytes (tag j). Computed by both sides from the same row lengths (the
// segment table D sent, unmerged), so both cut the same messages.
struct Plan {
  std::vector<uint32_t> direct, packed;
  std::vector<size_t> bounds;  // chunk j packs packed[bounds[j], bounds[j + 1])
  std::vector<uint64_t> sizes;
  uint64_t max_chunk = 0;
  size_t chunks() const { return sizes.size(); }
};

constexpr int kDirectTag = 1 << 22;
constexpr int kBaselineTag = 1 << 24;

Plan plan_messages(const std::vector<Row>& rows, const Settings& s);

// Rows of a segment-table request body on this side, in the table's order and unmerged, each
// checked to lie inside its registered region. False with `why` set otherwise.
bool table_rows(const uint8_t* body, size_t n, bool is_write, const Regions& mem, bool dst_side, Request& req,
                std::vector<Row>& rows, uint64_t& total, std::string& why);

// The pair's group and this side's staging buffers. Used by one thread at a time.
class Channel {
 public:
  Channel(c10::intrusive_ptr<c10d::Backend> pg, int peer_rank, Settings s, double timeout_s);
  Status send(const std::vector<Row>& rows, const Plan& plan);
  // Receives in two steps: post (before the peer is asked to send), then finish (wait, unpack, re-post).
  struct Incoming {
    std::vector<c10::intrusive_ptr<c10d::Work>> direct, posted;
    size_t slots = 0;
  };
  Status post_recvs(const std::vector<Row>& rows, const Plan& plan, Incoming& in);
  Status finish_recvs(const std::vector<Row>& rows, const Plan& plan, Incoming& in);
  Status send_baseline(uint64_t n);
  c10::intrusive_ptr<c10d::Work> post_baseline_recv(uint64_t n);
  Status wait(const c10::intrusive_ptr<c10d::Work>& w, const char* what);
  const Settings& settings() const { return s_; }

 private:
  at::Tensor view(uint8_t* p, uint64_t n);
  std::vector<at::Tensor>& staging(std::vector<at::Tensor>& bufs, size_t count, uint64_t bytes);
  c10::intrusive_ptr<c10d::Work> op(bool recv, at::Tensor t, int tag);

  c10::intrusive_ptr<c10d::Backend> pg_;
  int peer_;
  Settings s_;
  double timeout_s_;
  std::vector<at::Tensor> send_bufs_, recv_bufs_;
  at::Tensor baseline_;
};

class PgInitiator : public Link {
 public:
  static std::shared_ptr<PgInitiator> make(int fd, double timeout_s, std::unique_ptr<Channel> ch, Regions mem);
  ~PgInitiator() override;
  void post(std::shared_ptr<Op> op);  // kOpRead/kOpWrite: frame + local table body; kOpSend; kOpBaseline
  // Stops the thread (failing what is queued), closes the socket and lets go of the group.
  void shut() { close(); ch_.reset(); }

 private:
  using Link::Link;
  void run() override;
  void on_close() override;
  Status run_op(Op& op);
  Status expect_reply(Op& op, uint64_t payload);

  std::unique_ptr<Channel> ch_;
  Regions mem_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Op>> queue_;
  bool busy_ = false;
};

class PgServer : public Link {
 public:
  static std::shared_ptr<PgServer> make(int fd, double timeout_s, std::unique_ptr<Channel> ch, uint64_t peer_id,
                                        Regions mem, std::shared_ptr<Inbox> inbox);
  ~PgServer() override;
  uint64_t served() const { return served_.load(); }
  void shut() { close(); ch_.reset(); }

 private:
  using Link::Link;
  void run() override;
  void on_close() override;
  Status serve_one(const Header& h, bool& stop);
  Status serve_request(const Header& h);
  Status serve_baseline(const Header& h);
  Status refuse(const std::string& request_id, const std::string& why);

  std::unique_ptr<Channel> ch_;
  uint64_t peer_id_ = 0;
  Regions mem_;
  std::shared_ptr<Inbox> inbox_;
  std::atomic<uint64_t> served_{0};
};

}  // namespace p2pkv
