// Frames of the native data path: the control plane's fixed header, and the binary body of a
// data request (block ids or a segment table). Everything a peer sends is parsed here, with
// every length checked against a hard limit before anything is allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace p2pkv {

constexpr uint32_t kMagic = 0x564B3250;  // "P2KV" read little-endian
constexpr uint16_t kVersion = 4;  // 4: the dialling side sends the serving side its block geometry (kGeometry)
constexpr size_t kHeaderSize = 20;       // <4sHHIQ: magic, version, type, meta length, payload length
constexpr uint32_t kMaxMeta = 32u << 20;
constexpr uint64_t kMaxPayload = 1ull << 40;
constexpr uint32_t kMaxRequestId = 1u << 10;
constexpr uint32_t kMaxNotify = 1u << 20;
constexpr uint64_t kMaxRows = 1ull << 21;   // rows (before merging) one request may expand to
constexpr uint32_t kMaxRegions = 1u << 16;
constexpr uint64_t kMaxBaseline = 1ull << 34;
constexpr uint32_t kAllRegions = 0xFFFFFFFFu;
constexpr size_t kRequestHeadSize = 24;

enum FrameType : uint16_t {
  kHello = 1, kAuth = 2, kReady = 3,  // the handshake (hello.h)
  kError = 4, kAck = 7, kNotif = 8, kClose = 10,
  kDataRead = 11, kDataWrite = 12, kBaseline = 13,
  kGone = 14,  // reply: the read asked for a request this side no longer holds; nothing was sent
  kGeometry = 15,  // dialling side -> serving side: the server's rows of a block for this pair (geometry.h)
};

// Request flags. kRequireHeld: serve this read only while its request id is held here (the serving
// side's engine still keeps those blocks), else reply kGone.
constexpr uint8_t kRequireHeld = 1;

enum Form : uint8_t { kBlocks = 0, kTable = 1 };

struct Header {
  uint16_t type = 0;
  uint32_t meta_len = 0;
  uint64_t payload_len = 0;
};

// Parses and checks the 20 header bytes; false with `why` set when they are not a frame this
// side accepts (bad magic, version, type, or a length over its limit).
bool parse_header(const uint8_t* p, Header& h, std::string& why);
void encode_header(uint8_t* out, uint16_t type, uint32_t meta_len, uint64_t payload_len);

// A data request's body: who it is for, where its bytes go. Views point into the frame's bytes.
struct Request {
  uint8_t form = kBlocks;
  uint8_t flags = 0;
  std::string request_id;
  const uint8_t* notify = nullptr;
  uint32_t notify_len = 0;
  bool all_regions = true;
  std::vector<uint32_t> regions;
  uint64_t count = 0;            // block ids, or segment rows
  const uint8_t* items = nullptr;  // int64 ids, or (int64 region, offset, length) rows, little-endian
};

// Parses a data request body of exactly `n` bytes; false with `why` set when it is malformed
// (lengths that do not add up, fields over their limits). Ids and rows are checked against the
// registered memory later, by the geometry.
bool parse_request(const uint8_t* body, size_t n, bool is_write, Request& req, std::string& why);

// The body `parse_request` reads (for tests, fuzzing and the Python side's frames).
std::string encode_request(const Request& req);

// A msgpack map {"kind": kind, "message": message}: the body of an ERROR frame.
std::string error_meta(const std::string& kind, const std::string& message);

int64_t load_i64(const uint8_t* p);
uint64_t load_u64(const uint8_t* p);
uint32_t load_u32(const uint8_t* p);

}  // namespace p2pkv
