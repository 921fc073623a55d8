// One side's registered memory seen by the data path: regions (base address, size) and the
// block geometry between this side and a peer (per region: block stride, and the pieces of a
// block that move, in the canonical order both sides compute). Turns a request's block ids or
// segment table into iovec rows, refusing anything that would address memory outside the regions.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "frame.h"

namespace p2pkv {

struct Regions {
  std::vector<uint64_t> base, size;
};

struct Geometry {
  Regions mem;
  uint64_t num_blocks = 0;
  std::vector<uint64_t> stride;       // per region
  std::vector<uint32_t> piece_start;  // per region, into piece_off/piece_len; one more entry at the end
  std::vector<uint64_t> piece_off, piece_len;

  // Checks that every block of every region lies inside its region; false with `why` otherwise.
  bool validate(std::string& why) const;
  uint64_t rows_per_block(const Request& req) const;
  uint64_t bytes_per_block(const Request& req) const;
};

// A kGeometry frame's body: the serving side's rows of a block for one direction of this pair, which
// the dialling side computes from both specs (the same canonical order as its own rows), so the
// serving side needs no per-peer set-up to serve. Layout, little-endian: u8 write (0: the server is
// the source, 1: the destination), 3 zero bytes, u32 regions R, u64 num_blocks, R x u64 stride,
// (R + 1) x u32 piece_start, P x u64 piece_off, P x u64 piece_len (P = piece_start[R]).
constexpr size_t kGeometryHead = 16;
constexpr uint32_t kMaxPieces = 1u << 20;
// Parses a geometry body of exactly `n` bytes against this side's regions `mem` (R must match) and
// validates it: every piece of every block inside its region. False with `why` otherwise.
bool parse_geometry(const uint8_t* body, size_t n, const Regions& mem, Geometry& out, bool& write, std::string& why);
std::string encode_geometry(const Geometry& g, bool write);

// Iovec rows of a request on this side, rows that follow each other in memory merged, and their
// byte total. For block ids: every id in [0, num_blocks), every region index registered, at most
// kMaxRows rows, and (`distinct`, a write's destination) no id twice. `dst_side` names the
// side in messages. For a segment table: every
// row inside its region. False with `why` set on the first violation; nothing is addressed then.
bool request_iovecs(const Request& req, const Geometry* geo, const Regions& mem, bool dst_side, bool distinct,
                    std::vector<iovec>& out, uint64_t& total, std::string& why);

}  // namespace p2pkv
