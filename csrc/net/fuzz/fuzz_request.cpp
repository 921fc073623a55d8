// Fuzz target for everything the native side parses from a peer: the handshake's frame header
// and HELLO body (hello.h), a GEOMETRY body (a peer's description of this side's rows), the data
// frame header and a data request body, then the iovec rows built from it against a fixed geometry
// or the parsed one. Every accepted geometry and request must address only registered memory. Built as a libFuzzer target
// (clang++ -fsanitize=fuzzer,address) or, with P2PKV_FUZZ_MAIN, as a standalone mutation loop
// under ASan/UBSan that CI runs for a few seconds (.ci/fuzz-native).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "frame.h"
#include "geometry.h"
#include "hello.h"

using namespace p2pkv;

namespace {

constexpr uint64_t kBase = 1ull << 40;  // addresses are computed, never touched

Geometry make_geometry() {
  Geometry g;
  g.num_blocks = 17;
  const uint64_t strides[3] = {4096, 512, 8192};
  for (uint64_t r = 0; r < 3; ++r) {
    g.mem.base.push_back(kBase + (r << 32));
    g.mem.size.push_back(strides[r] * g.num_blocks);
    g.stride.push_back(strides[r]);
  }
  // region 0: two pieces (K and V halves); 1: one dense piece; 2: three uneven pieces
  const uint64_t pieces[][2] = {{0, 2048}, {2048, 2048}, {0, 512}, {0, 100}, {1000, 24}, {4096, 4096}};
  g.piece_start = {0, 2, 3, 6};
  for (auto& p : pieces) {
    g.piece_off.push_back(p[0]);
    g.piece_len.push_back(p[1]);
  }
  return g;
}

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz invariant broken: %s\n", what);
    std::abort();
  }
}

// Every row lies inside one region of `mem`; returns the rows' byte total.
uint64_t check_inside(const std::vector<iovec>& rows, const Regions& mem, const char* what) {
  uint64_t sum = 0;
  for (const iovec& v : rows) {
    uint64_t a = reinterpret_cast<uint64_t>(v.iov_base);
    bool inside = false;
    for (size_t r = 0; r < mem.base.size(); ++r)
      inside |= a >= mem.base[r] && v.iov_len <= mem.size[r] && a - mem.base[r] <= mem.size[r] - v.iov_len;
    check(inside, what);
    sum += v.iov_len;
  }
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Geometry geo = make_geometry();
  if (size < 1 + kHeaderSize) return 0;
  uint8_t mode = data[0];
  Header h;
  std::string why;
  const uint8_t* body = data + 1 + kHeaderSize;
  size_t n = size - 1 - kHeaderSize;
  if (mode & 4) {  // the handshake
    std::string kind;
    if (!parse_handshake_header(data + 1, h, kind, why)) return 0;
    check(h.payload_len == 0 && h.meta_len <= kHelloFixed + kMaxHelloInfo, "handshake frame within its limits");
    Hello hello;
    if (h.type != kHello || !parse_hello(body, n, hello, why)) return 0;
    check(n >= kHelloFixed && hello.info.size() == n - kHelloFixed, "HELLO info is the body past its fixed part");
    std::string again = encode_hello(hello);
    check(again.size() == n && std::memcmp(again.data(), body, n) == 0, "encode(parse(hello)) == hello");
    return 0;
  }
  (void)parse_header(data + 1, h, why);
  bool is_write = mode & 1, distinct = mode & 2;
  if (mode & 8) {  // a GEOMETRY body, then a fixed request of block ids 0..3 against it
    Geometry peer_geo;
    bool write = false;
    if (!parse_geometry(body, n, geo.mem, peer_geo, write, why)) return 0;
    check(peer_geo.validate(why), "an accepted geometry validates");
    std::string again = encode_geometry(peer_geo, write);
    check(again.size() == n && std::memcmp(again.data(), body, n) == 0, "encode(parse(geometry)) == geometry");
    static const int64_t ids[4] = {0, 1, 2, 3};
    static Request fixed;
    fixed.form = kBlocks;
    fixed.count = std::min<uint64_t>(4, peer_geo.num_blocks);
    fixed.items = reinterpret_cast<const uint8_t*>(ids);
    std::vector<iovec> rows;
    uint64_t total = 0;
    if (!request_iovecs(fixed, &peer_geo, geo.mem, is_write, distinct, rows, total, why)) return 0;
    check(check_inside(rows, geo.mem, "every row of a peer's geometry lies inside one registered region") == total,
          "rows add up to the announced total");
    return 0;
  }
  Request req;
  if (!parse_request(body, n, is_write, req, why)) return 0;
  check(req.request_id.size() <= kMaxRequestId && req.notify_len <= kMaxNotify && req.count <= kMaxRows,
        "parsed fields within their limits");
  std::vector<iovec> rows;
  uint64_t total = 0;
  if (!request_iovecs(req, &geo, geo.mem, is_write, distinct, rows, total, why)) return 0;
  check(check_inside(rows, geo.mem, "every row lies inside one registered region") == total,
        "rows add up to the announced total");
  check(rows.size() <= kMaxRows, "row count within the limit");
  std::string again = encode_request(req);
  check(again.size() == n && std::memcmp(again.data(), body, n) == 0, "encode(parse(body)) == body");
  return 0;
}

#ifdef P2PKV_FUZZ_MAIN
// A small mutation loop: valid seeds, then random flips, overwrites with boundary values,
// truncations and extensions. Usage: fuzz_request SECONDS [SEED]
#include <chrono>
#include <random>

static std::string seed_blocks(std::mt19937_64& rng, bool table) {
  Request req;
  req.form = table ? kTable : kBlocks;
  req.request_id = "req-" + std::to_string(rng() % 1000);
  std::string items;
  req.count = rng() % 9;
  req.all_regions = table || rng() % 2;
  if (!req.all_regions) req.regions = {uint32_t(rng() % 3)};
  for (uint64_t i = 0; i < req.count; ++i) {
    int64_t v[3] = {int64_t(rng() % 3), int64_t(rng() % 20000), int64_t(1 + rng() % 4096)};
    if (!table) v[0] = int64_t(rng() % 20);
    items.append(reinterpret_cast<const char*>(v), table ? 24 : 8);
  }
  req.items = reinterpret_cast<const uint8_t*>(items.data());
  std::string body = encode_request(req);
  std::string out(1 + kHeaderSize, '\0');
  out[0] = char(rng() % 4);  // bit 2 clear: a data request
  encode_header(reinterpret_cast<uint8_t*>(&out[1]), kDataRead, uint32_t(body.size()), 0);
  return out + body;
}

static std::string seed_geometry(std::mt19937_64& rng) {
  Geometry g;
  g.num_blocks = rng() % 20;
  const uint64_t strides[3] = {4096, 512, 8192};
  uint32_t at = 0;
  for (int r = 0; r < 3; ++r) {
    g.stride.push_back(rng() % 4 ? strides[r] : rng() % 9000);
    g.piece_start.push_back(at);
    int pieces = int(rng() % 3);
    for (int p = 0; p < pieces; ++p, ++at) {
      g.piece_off.push_back(rng() % strides[r]);
      g.piece_len.push_back(1 + rng() % 2048);
    }
  }
  g.piece_start.push_back(at);
  std::string body = encode_geometry(g, rng() % 2);
  std::string out(1 + kHeaderSize, '\0');
  out[0] = char(8 | (rng() % 4));
  encode_header(reinterpret_cast<uint8_t*>(&out[1]), kGeometry, uint32_t(body.size()), 0);
  return out + body;
}

static std::string seed_hello(std::mt19937_64& rng) {
  Hello h;
  h.auth = rng() % 2;
  for (auto& b : h.nonce) b = uint8_t(rng());
  h.info = std::string(size_t(rng() % 64), char(0x80 | (rng() % 16)));
  std::string body = encode_hello(h);
  std::string out(1 + kHeaderSize, '\0');
  out[0] = char(4 | (rng() % 4));
  encode_header(reinterpret_cast<uint8_t*>(&out[1]), uint16_t(1 + rng() % 4), uint32_t(body.size()), 0);
  return out + body;
}

int main(int argc, char** argv) {
  double seconds = argc > 1 ? std::atof(argv[1]) : 5;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  const int64_t edges[] = {0, 1, -1, 16, 17, 255, 256, 65535, 1 << 20, 1 << 21, (1ll << 21) + 1, INT32_MAX,
                           INT64_MAX, INT64_MIN, 0xFFFFFFFFll};
  auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  uint64_t runs = 0;
  while (std::chrono::steady_clock::now() < end) {
    int kind = int(rng() % 8);
    std::string in = kind < 2 ? seed_hello(rng) : kind < 4 ? seed_geometry(rng) : seed_blocks(rng, rng() % 2);
    int muts = 1 + int(rng() % 4);
    for (int m = 0; m < muts && !in.empty(); ++m) {
      size_t at = rng() % in.size();
      switch (rng() % 5) {
        case 0: in[at] = char(in[at] ^ (1 << (rng() % 8))); break;
        case 1: in[at] = char(rng()); break;
        case 2: {
          int64_t v = edges[rng() % (sizeof edges / sizeof edges[0])];
          size_t w = size_t(1) << (rng() % 4);
          if (at + w <= in.size()) std::memcpy(&in[at], &v, w);
          break;
        }
        case 3: in.resize(at); break;
        default: in.append(size_t(rng() % 32), char(rng())); break;
      }
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(in.data()), in.size());
    ++runs;
  }
  std::printf("fuzz_request: %llu inputs in %.0f s, no invariant broken\n", static_cast<unsigned long long>(runs), seconds);
  return 0;
}
#endif
