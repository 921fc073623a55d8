// The handshake's frames, shared by both natives sides (accept.h, dial.h) and wire.py:
//   client HELLO -> server HELLO -> [client AUTH] -> server READY, or an ERROR frame instead.
// HELLO's body: flags (bit 0: an auth token is configured), a 32-byte nonce, a 32-byte MAC
// (the server's proof of the token, zeros otherwise), then the sender's info as a msgpack map
// that only Python reads. AUTH's body: the client's 32-byte MAC. READY has none.
// MACs: server = HMAC(token, "server" | client nonce | server nonce); client = HMAC(token,
// "client" | server nonce | client nonce).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "crypto.h"
#include "frame.h"

namespace p2pkv {

constexpr size_t kNonceBytes = 32;
constexpr size_t kHelloFixed = 1 + kNonceBytes + kMacBytes;
constexpr uint32_t kMaxHelloInfo = 1u << 20;
constexpr uint32_t kMaxErrorMeta = 64u << 10;

struct Hello {
  bool auth = false;
  uint8_t nonce[kNonceBytes] = {};
  uint8_t mac[kMacBytes] = {};
  std::string info;  // msgpack, opaque here
};

// Checks a handshake frame's 20 header bytes: magic, version, a handshake or ERROR type and a
// body length within that type's limit. On failure `kind` is "handshake" (another protocol
// version: the peer should be told) or "protocol" (not a p2pkv handshake at all).
bool parse_handshake_header(const uint8_t* p, Header& h, std::string& kind, std::string& why);

bool parse_hello(const uint8_t* body, size_t n, Hello& out, std::string& why);
std::string encode_hello(const Hello& h);

// Header and body of one frame.
std::string frame_bytes(uint16_t type, const std::string& body);

// The MAC of `label` ("server" or "client") over nonces a then b.
bool hello_mac(const std::string& token, const char* label, const uint8_t* a, const uint8_t* b,
               uint8_t out[kMacBytes], std::string& why);

}  // namespace p2pkv
