// See crypto.h.
#include "crypto.h"

#include <dlfcn.h>
#include <errno.h>
#include <sys/random.h>

#include <mutex>

namespace p2pkv {

namespace {

using EvpSha256 = const void* (*)();
using Hmac = unsigned char* (*)(const void* md, const void* key, int key_len, const unsigned char* d, size_t n,
                                unsigned char* out, unsigned int* out_len);

struct Lib {
  EvpSha256 sha256 = nullptr;
  Hmac hmac = nullptr;
  std::string why;
};

const Lib& lib() {
  static Lib l;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = nullptr;
    for (const char* name : {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"}) {
      h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (h != nullptr) break;
    }
    if (h == nullptr) {
      l.why = "OpenSSL's libcrypto (libcrypto.so.3) cannot be opened";
      return;
    }
    l.sha256 = reinterpret_cast<EvpSha256>(dlsym(h, "EVP_sha256"));
    l.hmac = reinterpret_cast<Hmac>(dlsym(h, "HMAC"));
    if (l.sha256 == nullptr || l.hmac == nullptr) {
      l.sha256 = nullptr;
      l.hmac = nullptr;
      l.why = "libcrypto has no EVP_sha256/HMAC";
    }
  });
  return l;
}

}  // namespace

bool hmac_available(std::string& why) {
  why = lib().why;
  return lib().hmac != nullptr;
}

bool hmac_sha256(const std::string& key, const uint8_t* data, size_t n, uint8_t out[kMacBytes], std::string& why) {
  const Lib& l = lib();
  if (l.hmac == nullptr) {
    why = l.why;
    return false;
  }
  unsigned int len = 0;
  if (key.size() > (1u << 20) ||
      l.hmac(l.sha256(), key.data(), int(key.size()), data, n, out, &len) == nullptr || len != kMacBytes) {
    why = "HMAC-SHA256 failed";
    return false;
  }
  return true;
}

bool random_bytes(uint8_t* out, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = getrandom(out + got, n - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    got += size_t(r);
  }
  return true;
}

bool equal_constant_time(const uint8_t* a, const uint8_t* b, size_t n) {
  uint8_t d = 0;
  for (size_t i = 0; i < n; ++i) d |= uint8_t(a[i] ^ b[i]);
  return d == 0;
}

}  // namespace p2pkv
