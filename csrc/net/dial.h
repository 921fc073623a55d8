// The dialling side of the handshake (hello.h), on a native thread of its own: resolve, connect
// and hand-shake within the timeout while the caller goes on; the caller polls `done()` (or waits
// without the GIL) and takes the connected descriptor and the peer's info.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "accept.h"

namespace p2pkv {

class Dialer {
 public:
  // `code` once failed: "timeout", "closed" (unreachable or dropped), "refused" (the peer sent an
  // ERROR: `peer_meta` holds it), "auth", "handshake" or "protocol".
  struct Result {
    std::string code, message, peer_meta;
    int fd = -1;
    std::string info;
  };

  static std::shared_ptr<Dialer> start(std::string host, int port, HandshakeSetup setup);
  ~Dialer();
  bool done();
  bool wait(double timeout_s);
  Result take();   // once done: the result; the descriptor (if any) is the caller's from then on
  void cancel();   // stops a dial under way (it ends as "closed")

 private:
  Dialer() = default;
  void run(std::string host, int port, HandshakeSetup setup);
  Result handshake(int fd, const HandshakeSetup& setup);
  void finish(Result r);
  void own(int fd);  // the descriptor `cancel` may shut down (-1: none)

  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false, taken_ = false;
  Result result_;
  std::mutex fd_mu_;
  int fd_ = -1;
  std::atomic<bool> cancelled_{false};
};

}  // namespace p2pkv
