// Accepts connections on a listening socket from a native thread. In handshake mode it also runs
// the accepting side of the handshake (hello.h) for every connection at once, non-blocking, each
// within the timeout: it checks the version and the peer's proof of the auth token, answers with
// this side's HELLO and READY, and queues the connection with the peer's info for the owner to
// adopt whenever its thread next calls in. No Python thread has to run for a peer to get in. Once
// told how to serve (`serve`), it hands each hand-shaken connection straight to a native Server, so
// a peer is served even while no Python of this process runs; the owner adopts the Server later
// for its bookkeeping only. Otherwise (TLS, or a backend whose set-up needs Python) it only queues accepted descriptors.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "link.h"

namespace p2pkv {

// What this side says in a handshake and how it proves the token.
struct HandshakeSetup {
  std::string info;   // msgpack map
  std::string token;  // used when `auth`
  bool auth = false;
  double timeout_s = 30;
};

// How every hand-shaken connection is served once `serve` is called: this side's regions, the
// inbox for peers' messages, the held set, and the CUDA staging of device memory (api null: host).
struct ServeSetup {
  Regions mem;
  std::shared_ptr<Inbox> inbox;
  std::shared_ptr<HeldSet> held;
  const CudaApi* api = nullptr;
  int device = -1;
  size_t staging_bytes = 0;
  int sock_buf_bytes = 0;  // SO_SNDBUF/SO_RCVBUF of each connection; 0: the kernel's autotuning
};

struct Accepted {
  double since = 0;  // when its handshake ended (steady clock, s)
  int fd = -1;  // blocking, handshake done; -1 once a Server owns it
  std::shared_ptr<Server> server;  // serving it already (ServeSetup given)
  uint64_t peer_id = 0;            // the Server's name for the peer in the inbox
  std::string addr;
  std::string info;  // the peer's msgpack info
};

struct Refusal {
  std::string addr, reason;
  std::string peer_meta;  // the peer's ERROR body (msgpack) when it refused us
};

class Acceptor {
 public:
  static constexpr size_t kMaxInFlight = 512;  // handshakes at once; more are closed at accept
  static constexpr size_t kMaxRefusals = 64;   // kept for the owner to log; older ones are counted only

  Acceptor(int listen_fd, bool handshake);
  ~Acceptor();
  static constexpr uint64_t kFirstPeerId = 1ull << 40;  // ids the owner gives its own links stay below

  void configure(HandshakeSetup s);  // handshake mode: before this, peers are told nothing is registered
  void serve(ServeSetup s);          // handshake mode: from now on a native Server takes each connection
  void close();
  // Until something is queued (or the acceptor closed); with `min_age_s`, a hand-shaken connection
  // counts only once it has waited that long untaken (an engine's own calls take it sooner).
  bool wait(double timeout_s, double min_age_s = 0);
  std::vector<int> take();           // plain mode: queued descriptors, now counted as in set-up
  void setup_done();                 // plain mode: one taken connection's set-up ended
  std::vector<Accepted> take_ready();
  std::vector<Refusal> take_refusals(uint64_t& dropped);
  size_t pending();                  // connections whose set-up still needs the owner (never once serving)

 private:
  struct Peer;
  void run();
  void admit(int fd);
  bool step(Peer& p, short revents);  // false once the peer is finished (ready or refused)
  bool on_frame(Peer& p);
  void refuse(Peer& p, const std::string& kind, const std::string& reason, const std::string& tell);
  void push_refusal(Refusal r);

  int fd_;
  bool handshake_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  HandshakeSetup setup_;
  bool configured_ = false;
  std::shared_ptr<const ServeSetup> serve_;
  uint64_t next_peer_id_ = kFirstPeerId;
  std::deque<int> queue_;
  size_t in_setup_ = 0, in_flight_ = 0;
  std::deque<Accepted> ready_;
  std::deque<Refusal> refusals_;
  uint64_t refusals_dropped_ = 0;
  std::vector<Peer*> peers_;  // the run thread's own
  std::thread thread_;
};

}  // namespace p2pkv
