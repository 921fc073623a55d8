// Requests to iovec rows, bounds-checked; see geometry.h.
#include "geometry.h"

#include <algorithm>

namespace p2pkv {

static bool mul_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_mul_overflow(a, b, &out); }
static bool add_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_add_overflow(a, b, &out); }

bool Geometry::validate(std::string& why) const {
  size_t R = mem.base.size();
  if (mem.size.size() != R || stride.size() != R || piece_start.size() != R + 1 ||
      piece_off.size() != piece_len.size() || piece_start.back() != piece_off.size()) {
    why = "geometry arrays do not match the region count";
    return false;
  }
  for (size_t r = 0; r < R; ++r) {
    if (piece_start[r] > piece_start[r + 1] || piece_start[r + 1] > piece_off.size()) {
      why = "geometry pieces out of order";
      return false;
    }
    for (uint32_t p = piece_start[r]; p < piece_start[r + 1]; ++p) {
      uint64_t last = 0, end = 0;
      if (num_blocks == 0) break;
      if (mul_overflows(num_blocks - 1, stride[r], last) || add_overflows(last, piece_off[p], end) ||
          add_overflows(end, piece_len[p], end) || end > mem.size[r] || piece_len[p] == 0) {
        why = "region " + std::to_string(r) + ": a block's piece ends past the region's " +
              std::to_string(mem.size[r]) + " bytes";
        return false;
      }
    }
  }
  return true;
}

template <class F>
static void for_regions(const Request& req, size_t R, F f) {
  if (req.all_regions) {
    for (size_t r = 0; r < R; ++r) f(r);
  } else {
    for (uint32_t r : req.regions) f(r);
  }
}

uint64_t Geometry::rows_per_block(const Request& req) const {
  uint64_t n = 0;
  for_regions(req, stride.size(), [&](size_t r) { n += piece_start[r + 1] - piece_start[r]; });
  return n;
}

uint64_t Geometry::bytes_per_block(const Request& req) const {
  uint64_t n = 0;
  for_regions(req, stride.size(), [&](size_t r) {
    for (uint32_t p = piece_start[r]; p < piece_start[r + 1]; ++p) n += piece_len[p];
  });
  return n;
}

static void push_row(std::vector<iovec>& out, uint64_t addr, uint64_t len) {
  if (!out.empty()) {
    iovec& last = out.back();
    if (reinterpret_cast<uint64_t>(last.iov_base) + last.iov_len == addr) {
      last.iov_len += len;
      return;
    }
  }
  out.push_back(iovec{reinterpret_cast<void*>(addr), size_t(len)});
}

static bool block_iovecs(const Request& req, const Geometry& geo, bool dst_side, bool distinct, std::vector<iovec>& out,
                         uint64_t& total, std::string& why) {
  size_t R = geo.stride.size();
  for (uint32_t r : req.regions) {
    if (r >= R) {
      why = "regions name " + std::to_string(r) + ", outside the " + std::to_string(R) + " registered";
      return false;
    }
  }
  std::vector<uint64_t> ids(req.count);
  for (uint64_t i = 0; i < req.count; ++i) {
    int64_t id = load_i64(req.items + 8 * i);
    if (id < 0 || uint64_t(id) >= geo.num_blocks) {
      why = std::string(dst_side ? "destination" : "source") + " block id " + std::to_string(id) + " out of range [0, " + std::to_string(geo.num_blocks) + ")";
      return false;
    }
    ids[i] = uint64_t(id);
  }
  uint64_t per = geo.rows_per_block(req), rows = 0;
  if (mul_overflows(per, req.count, rows) || rows > kMaxRows) {
    why = std::to_string(req.count) + " blocks of " + std::to_string(per) + " rows each exceed the limit of " +
          std::to_string(kMaxRows) + " rows per request: split the request";
    return false;
  }
  if (distinct && ids.size() > 1) {
    std::vector<uint64_t> sorted(ids);
    std::sort(sorted.begin(), sorted.end());
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      why = "duplicate destination block id " + std::to_string(*dup);
      return false;
    }
  }
  out.clear();
  out.reserve(size_t(rows));
  total = 0;
  for_regions(req, R, [&](size_t r) {
    uint64_t base = geo.mem.base[r], stride = geo.stride[r];
    for (uint32_t p = geo.piece_start[r]; p < geo.piece_start[r + 1]; ++p) {
      uint64_t start = base + geo.piece_off[p], len = geo.piece_len[p];
      for (uint64_t id : ids) push_row(out, start + id * stride, len);
      total += len * ids.size();
    }
  });
  return true;
}

static bool table_iovecs(const Request& req, const Regions& mem, std::vector<iovec>& out, uint64_t& total,
                         std::string& why) {
  out.clear();
  out.reserve(size_t(req.count));
  total = 0;
  for (uint64_t i = 0; i < req.count; ++i) {
    const uint8_t* row = req.items + 24 * i;
    int64_t r = load_i64(row), off = load_i64(row + 8), len = load_i64(row + 16);
    if (r < 0 || uint64_t(r) >= mem.base.size()) {
      why = "segment names region " + std::to_string(r) + ", but only " + std::to_string(mem.base.size()) +
            " are registered";
      return false;
    }
    uint64_t end = 0;
    if (off < 0 || len <= 0) {
      why = "segment with a negative offset or a non-positive length";
      return false;
    }
    if (add_overflows(uint64_t(off), uint64_t(len), end) || end > mem.size[r]) {
      why = "segment [" + std::to_string(off) + ", " + std::to_string(uint64_t(off) + uint64_t(len)) +
            ") runs past the end of region " + std::to_string(r) + " (" + std::to_string(mem.size[r]) + " bytes)";
      return false;
    }
    push_row(out, mem.base[r] + uint64_t(off), uint64_t(len));
    total += uint64_t(len);
  }
  return true;
}

bool parse_geometry(const uint8_t* body, size_t n, const Regions& mem, Geometry& out, bool& write, std::string& why) {
  if (n < kGeometryHead) {
    why = "geometry frame shorter than its fixed part";
    return false;
  }
  if (body[0] > 1 || body[1] || body[2] || body[3]) {
    why = "geometry frame with an unknown direction or flags";
    return false;
  }
  write = body[0] == 1;
  uint64_t R = load_u32(body + 4);
  if (R != mem.base.size()) {
    why = "geometry for " + std::to_string(R) + " regions, but " + std::to_string(mem.base.size()) +
          " are registered here";
    return false;
  }
  size_t fixed = kGeometryHead + 8 * R + 4 * (R + 1);  // R <= kMaxRegions: no overflow
  if (n < fixed) {
    why = "geometry frame too short for its regions";
    return false;
  }
  const uint8_t* starts = body + kGeometryHead + 8 * R;
  uint64_t P = load_u32(starts + 4 * R);
  if (load_u32(starts) != 0 || P > kMaxPieces || n != fixed + 16 * P) {
    why = "geometry frame's piece count does not match its length (or exceeds " + std::to_string(kMaxPieces) + ")";
    return false;
  }
  Geometry g;
  g.mem = mem;
  g.num_blocks = load_u64(body + 8);
  g.stride.resize(R);
  g.piece_start.resize(R + 1);
  g.piece_off.resize(P);
  g.piece_len.resize(P);
  for (uint64_t r = 0; r < R; ++r) g.stride[r] = load_u64(body + kGeometryHead + 8 * r);
  for (uint64_t r = 0; r <= R; ++r) g.piece_start[r] = load_u32(starts + 4 * r);
  const uint8_t* pieces = body + fixed;
  for (uint64_t p = 0; p < P; ++p) {
    g.piece_off[p] = load_u64(pieces + 8 * p);
    g.piece_len[p] = load_u64(pieces + 8 * (P + p));
  }
  if (!g.validate(why)) return false;
  out = std::move(g);
  return true;
}

std::string encode_geometry(const Geometry& g, bool write) {
  size_t R = g.stride.size(), P = g.piece_off.size();
  std::string out(kGeometryHead + 8 * R + 4 * (R + 1) + 16 * P, '\0');
  auto put = [&](size_t at, uint64_t v, int w) {
    for (int i = 0; i < w; ++i) out[at + i] = char(v >> (8 * i));
  };
  put(0, write ? 1 : 0, 1);
  put(4, R, 4);
  put(8, g.num_blocks, 8);
  for (size_t r = 0; r < R; ++r) put(kGeometryHead + 8 * r, g.stride[r], 8);
  size_t starts = kGeometryHead + 8 * R;
  for (size_t r = 0; r <= R; ++r) put(starts + 4 * r, r < g.piece_start.size() ? g.piece_start[r] : 0, 4);
  size_t pieces = starts + 4 * (R + 1);
  for (size_t p = 0; p < P; ++p) {
    put(pieces + 8 * p, g.piece_off[p], 8);
    put(pieces + 8 * (P + p), g.piece_len[p], 8);
  }
  return out;
}

bool request_iovecs(const Request& req, const Geometry* geo, const Regions& mem, bool dst_side, bool distinct,
                    std::vector<iovec>& out, uint64_t& total, std::string& why) {
  if (req.form == kBlocks) {
    if (geo == nullptr) {
      why = "this side has no block geometry for the peer's requests";
      return false;
    }
    return block_iovecs(req, *geo, dst_side, distinct, out, total, why);
  }
  return table_iovecs(req, mem, out, total, why);
}

}  // namespace p2pkv
