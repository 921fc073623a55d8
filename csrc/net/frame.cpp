// Frame parsing for the native data path; see frame.h.
#include "frame.h"

#include <cstring>

namespace p2pkv {

uint64_t load_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

int64_t load_i64(const uint8_t* p) { return static_cast<int64_t>(load_u64(p)); }

uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

static uint16_t load_u16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }

static void put_u16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v); p[1] = uint8_t(v >> 8); }
static void put_u32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i)); }
static void put_u64(uint8_t* p, uint64_t v) { for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i)); }

bool parse_header(const uint8_t* p, Header& h, std::string& why) {
  if (load_u32(p) != kMagic) {
    why = "bad magic: the peer does not speak p2pkv";
    return false;
  }
  uint16_t version = load_u16(p + 4);
  if (version != kVersion) {
    why = "protocol version mismatch: peer speaks " + std::to_string(version) + ", this side " +
          std::to_string(kVersion);
    return false;
  }
  h.type = load_u16(p + 6);
  h.meta_len = load_u32(p + 8);
  h.payload_len = load_u64(p + 12);
  switch (h.type) {
    case kError: case kAck: case kNotif: case kClose: case kDataRead: case kDataWrite: case kBaseline: case kGone:
    case kGeometry:
      break;
    default:
      why = "unknown frame type " + std::to_string(h.type);
      return false;
  }
  if (h.meta_len > kMaxMeta) {
    why = "metadata length " + std::to_string(h.meta_len) + " exceeds the limit of " + std::to_string(kMaxMeta);
    return false;
  }
  if (h.payload_len > kMaxPayload) {
    why = "payload length " + std::to_string(h.payload_len) + " exceeds the limit of " +
          std::to_string(kMaxPayload);
    return false;
  }
  return true;
}

void encode_header(uint8_t* out, uint16_t type, uint32_t meta_len, uint64_t payload_len) {
  put_u32(out, kMagic);
  put_u16(out + 4, kVersion);
  put_u16(out + 6, type);
  put_u32(out + 8, meta_len);
  put_u64(out + 12, payload_len);
}

// Body: u8 form, u8 flags, u16 request id length, u32 notify length, u32 region count
// (kAllRegions: every region), u32 zero, u64 item count; then the request id, the notify
// message, u32 region indices, and the items (int64 ids, or int64 region/offset/length rows).
bool parse_request(const uint8_t* body, size_t n, bool is_write, Request& req, std::string& why) {
  if (n < kRequestHeadSize) {
    why = "request body of " + std::to_string(n) + " bytes is shorter than its " +
          std::to_string(kRequestHeadSize) + "-byte head";
    return false;
  }
  req.form = body[0];
  req.flags = body[1];
  uint16_t id_len = load_u16(body + 2);
  req.notify_len = load_u32(body + 4);
  uint32_t n_regions = load_u32(body + 8);
  uint32_t zero = load_u32(body + 12);
  req.count = load_u64(body + 16);
  if (req.form != kBlocks && req.form != kTable) {
    why = "unknown request form " + std::to_string(req.form);
    return false;
  }
  if ((req.flags & ~kRequireHeld) != 0 || zero != 0) {
    why = "reserved request fields are not zero";
    return false;
  }
  if ((req.flags & kRequireHeld) && (is_write || id_len == 0)) {
    why = is_write ? "only a read can require its request to be held" : "a read that requires a held request names none";
    return false;
  }
  if (id_len > kMaxRequestId) {
    why = "request id of " + std::to_string(id_len) + " bytes exceeds the limit of " + std::to_string(kMaxRequestId);
    return false;
  }
  if (req.notify_len > kMaxNotify || (!is_write && req.notify_len)) {
    why = is_write ? "notify message exceeds the limit of " + std::to_string(kMaxNotify) + " bytes"
                   : "a read carries no notify message";
    return false;
  }
  req.all_regions = n_regions == kAllRegions;
  if (!req.all_regions && (req.form != kBlocks || n_regions > kMaxRegions)) {
    why = req.form != kBlocks ? "a segment table names no region list" : "region list too long";
    return false;
  }
  uint64_t item_size = req.form == kBlocks ? 8 : 24;
  if (req.count > kMaxRows) {
    why = std::to_string(req.count) + " items exceed the limit of " + std::to_string(kMaxRows) + " per request";
    return false;
  }
  uint64_t want = kRequestHeadSize + uint64_t(id_len) + req.notify_len +
                  (req.all_regions ? 0 : 4ull * n_regions) + item_size * req.count;
  if (want != n) {
    why = "request body is " + std::to_string(n) + " bytes but its fields add up to " + std::to_string(want);
    return false;
  }
  const uint8_t* p = body + kRequestHeadSize;
  req.request_id.assign(reinterpret_cast<const char*>(p), id_len);
  p += id_len;
  req.notify = req.notify_len ? p : nullptr;
  p += req.notify_len;
  req.regions.clear();
  if (!req.all_regions) {
    req.regions.reserve(n_regions);
    for (uint32_t i = 0; i < n_regions; ++i, p += 4) req.regions.push_back(load_u32(p));
  }
  req.items = p;
  return true;
}

std::string encode_request(const Request& req) {
  uint32_t n_regions = req.all_regions ? kAllRegions : uint32_t(req.regions.size());
  uint64_t item_size = req.form == kBlocks ? 8 : 24;
  std::string out(kRequestHeadSize, '\0');
  auto* h = reinterpret_cast<uint8_t*>(&out[0]);
  h[0] = req.form;
  h[1] = req.flags;
  put_u16(h + 2, uint16_t(req.request_id.size()));
  put_u32(h + 4, req.notify_len);
  put_u32(h + 8, n_regions);
  put_u64(h + 16, req.count);
  out += req.request_id;
  if (req.notify_len) out.append(reinterpret_cast<const char*>(req.notify), req.notify_len);
  for (uint32_t r : req.regions) {
    uint8_t b[4];
    put_u32(b, r);
    out.append(reinterpret_cast<const char*>(b), 4);
  }
  if (req.count) out.append(reinterpret_cast<const char*>(req.items), size_t(item_size * req.count));
  return out;
}

static void msgpack_str(std::string& out, const std::string& s) {
  size_t n = s.size() > 0xFFFF ? 0xFFFF : s.size();
  if (n < 32) {
    out.push_back(char(0xA0 | n));
  } else if (n < 256) {
    out.push_back(char(0xD9));
    out.push_back(char(n));
  } else {
    out.push_back(char(0xDA));
    out.push_back(char(n >> 8));
    out.push_back(char(n & 0xFF));
  }
  out.append(s, 0, n);
}

std::string error_meta(const std::string& kind, const std::string& message) {
  std::string out(1, char(0x82));
  msgpack_str(out, "kind");
  msgpack_str(out, kind);
  msgpack_str(out, "message");
  msgpack_str(out, message);
  return out;
}

}  // namespace p2pkv
