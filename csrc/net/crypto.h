// HMAC-SHA256 and nonces for the handshake. The MAC comes from OpenSSL's libcrypto, the one the
// Python process has already loaded for `hmac`/`ssl`, opened at run time so that building p2pkv
// needs no OpenSSL headers; nonces come from the kernel (getrandom).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace p2pkv {

constexpr size_t kMacBytes = 32;

// False (with `why`) where no libcrypto can be opened; a handshake with a token then cannot run natively.
bool hmac_available(std::string& why);
bool hmac_sha256(const std::string& key, const uint8_t* data, size_t n, uint8_t out[kMacBytes], std::string& why);
bool random_bytes(uint8_t* out, size_t n);
bool equal_constant_time(const uint8_t* a, const uint8_t* b, size_t n);

}  // namespace p2pkv
