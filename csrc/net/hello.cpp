// See hello.h.
#include "hello.h"

#include <cstring>

namespace p2pkv {

bool parse_handshake_header(const uint8_t* p, Header& h, std::string& kind, std::string& why) {
  kind = "protocol";
  if (load_u32(p) != kMagic) {
    why = "bad magic: the peer does not speak p2pkv";
    return false;
  }
  uint16_t version = uint16_t(p[4] | p[5] << 8);
  if (version != kVersion) {
    kind = "handshake";
    why = "protocol version mismatch: peer speaks " + std::to_string(version) + ", this side " +
          std::to_string(kVersion) + "; upgrade both sides to the same p2pkv release";
    return false;
  }
  h.type = uint16_t(p[6] | p[7] << 8);
  h.meta_len = load_u32(p + 8);
  h.payload_len = load_u64(p + 12);
  uint64_t lo = 0, hi = 0;
  switch (h.type) {
    case kHello: lo = kHelloFixed; hi = kHelloFixed + kMaxHelloInfo; break;
    case kAuth: lo = hi = kMacBytes; break;
    case kReady: break;
    case kError: hi = kMaxErrorMeta; break;
    default:
      why = "unexpected frame type " + std::to_string(h.type) + " during the handshake";
      return false;
  }
  if (h.meta_len < lo || h.meta_len > hi || h.payload_len != 0) {
    why = "handshake frame of type " + std::to_string(h.type) + " with a " + std::to_string(h.meta_len) +
          "-byte body (allowed " + std::to_string(lo) + " to " + std::to_string(hi) + ") and payload " +
          std::to_string(h.payload_len);
    return false;
  }
  return true;
}

bool parse_hello(const uint8_t* body, size_t n, Hello& out, std::string& why) {
  if (n < kHelloFixed || n > kHelloFixed + kMaxHelloInfo) {
    why = "HELLO body of " + std::to_string(n) + " bytes";
    return false;
  }
  if (body[0] > 1) {
    why = "HELLO flags " + std::to_string(body[0]) + " not understood";
    return false;
  }
  out.auth = body[0] == 1;
  std::memcpy(out.nonce, body + 1, kNonceBytes);
  std::memcpy(out.mac, body + 1 + kNonceBytes, kMacBytes);
  out.info.assign(reinterpret_cast<const char*>(body) + kHelloFixed, n - kHelloFixed);
  return true;
}

std::string encode_hello(const Hello& h) {
  std::string out(kHelloFixed, '\0');
  out[0] = h.auth ? 1 : 0;
  std::memcpy(&out[1], h.nonce, kNonceBytes);
  std::memcpy(&out[1 + kNonceBytes], h.mac, kMacBytes);
  return out + h.info;
}

std::string frame_bytes(uint16_t type, const std::string& body) {
  std::string out(kHeaderSize, '\0');
  encode_header(reinterpret_cast<uint8_t*>(&out[0]), type, uint32_t(body.size()), 0);
  return out + body;
}

bool hello_mac(const std::string& token, const char* label, const uint8_t* a, const uint8_t* b,
               uint8_t out[kMacBytes], std::string& why) {
  std::string msg(label);
  msg.append(reinterpret_cast<const char*>(a), kNonceBytes);
  msg.append(reinterpret_cast<const char*>(b), kNonceBytes);
  return hmac_sha256(token, reinterpret_cast<const uint8_t*>(msg.data()), msg.size(), out, why);
}

}  // namespace p2pkv
