// p2pkv._c10d: the Python face of the nccl backend's native data path (pair.h). Constructors take
// the pair's torch.distributed backend object (pybind casts it to c10d::Backend), plain ints and
// bytes; every call returns at once, and waits and joins release the GIL. No native thread ever
// calls into Python.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <cstring>

#include "pair.h"

namespace py = pybind11;
using namespace p2pkv;

namespace {

template <class T>
std::vector<T> array_of(const py::bytes& b, const char* what) {
  std::string s = b;
  if (s.size() % sizeof(T)) throw py::value_error(std::string(what) + ": not a whole number of items");
  std::vector<T> out(s.size() / sizeof(T));
  if (!s.empty()) std::memcpy(out.data(), s.data(), s.size());
  return out;
}

Regions regions_of(const py::bytes& bases, const py::bytes& sizes) {
  Regions m{array_of<uint64_t>(bases, "bases"), array_of<uint64_t>(sizes, "sizes")};
  if (m.base.size() != m.size.size()) throw py::value_error("bases and sizes differ in length");
  return m;
}

std::unique_ptr<Channel> channel(c10::intrusive_ptr<c10d::Backend> pg, int peer_rank, uint64_t threshold,
                                 uint64_t chunk_bytes, uint32_t depth, uint64_t window, double timeout) {
  if (!pg) throw py::value_error("no process group");
  if (chunk_bytes == 0 || depth == 0) throw py::value_error("chunk_bytes and depth must be positive");
  return std::make_unique<Channel>(std::move(pg), peer_rank, Settings{threshold, chunk_bytes, depth, window}, timeout);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "native gloo data path of p2pkv's nccl backend";
  m.attr("MAX_NOTIFY") = kMaxNotify;

  // The checks and the message cut a served request gets, without any memory behind the regions:
  // for tests and fuzzing (the same code PgServer runs on every request body).
  m.def("plan", [](py::bytes body, bool is_write, py::bytes sizes, uint64_t threshold, uint64_t chunk_bytes) {
        std::string b = body;
        Regions mem{{}, array_of<uint64_t>(sizes, "sizes")};
        mem.base.assign(mem.size.size(), 0);
        Request req;
        std::vector<Row> rows;
        uint64_t total = 0;
        std::string why;
        if (!table_rows(reinterpret_cast<const uint8_t*>(b.data()), b.size(), is_write, mem, is_write, req, rows, total,
                        why))
          throw py::value_error(why);
        Plan p = plan_messages(rows, Settings{threshold, chunk_bytes, 1, 0});
        return py::make_tuple(req.request_id, total, p.direct, p.packed, p.bounds, p.sizes);
      }, "plan(body, is_write, region sizes, pack_threshold, chunk_bytes) -> (request id, bytes, direct, packed, "
         "bounds, chunk sizes); ValueError(why) for a body the server refuses");

  py::class_<Op, std::shared_ptr<Op>>(m, "Op")
      .def("done", [](Op& op) { return op.finished.load(); })
      .def("wait", [](std::shared_ptr<Op> op, double timeout) {
             py::gil_scoped_release nogil;
             return op->wait(timeout);
           }, py::arg("timeout") = -1.0, "wait(timeout=-1) -> ended? (without the GIL; < 0 waits for good)")
      .def("error", [](Op& op) -> py::object {
             if (!op.finished.load() || op.error == kOk) return py::none();
             return py::make_tuple(int(op.error), op.message, py::bytes(op.peer_meta));
           }, "None, or (kind, message, peer's ERROR body)")
      .def("seconds", [](Op& op) { return op.seconds; });

  py::class_<Inbox, std::shared_ptr<Inbox>>(m, "Inbox")
      .def(py::init([](size_t max_bytes) { return std::make_shared<Inbox>(max_bytes); }))
      .def("drain", [](Inbox& in) {
        auto items = in.drain();
        py::list out;
        for (auto& it : items) out.append(py::make_tuple(it.first, py::bytes(it.second)));
        return out;
      });

  py::class_<PgInitiator, std::shared_ptr<PgInitiator>>(m, "Initiator")
      .def(py::init([](int fd, double timeout, c10::intrusive_ptr<c10d::Backend> pg, int peer_rank,
                       uint64_t threshold, uint64_t chunk_bytes, uint32_t depth, uint64_t window, py::bytes bases,
                       py::bytes sizes) {
        auto ch = channel(std::move(pg), peer_rank, threshold, chunk_bytes, depth, window, timeout);
        return PgInitiator::make(fd, timeout, std::move(ch), regions_of(bases, sizes));
      }))
      .def("post", [](PgInitiator& l, int kind, py::bytes frame, py::bytes local, uint64_t nbytes) {
             auto op = std::make_shared<Op>();
             op->kind = OpKind(kind);
             op->frame = frame;
             op->local = local;
             op->nbytes = nbytes;
             l.post(op);
             return op;
           }, "post(kind, frame, local table body, nbytes) -> Op, queued behind earlier ops")
      .def("alive", &PgInitiator::alive)
      .def("reason", &PgInitiator::dead_reason)
      .def("close", &PgInitiator::shut, py::call_guard<py::gil_scoped_release>());

  py::class_<PgServer, std::shared_ptr<PgServer>>(m, "Server")
      .def(py::init([](int fd, double timeout, c10::intrusive_ptr<c10d::Backend> pg, int peer_rank,
                       uint64_t threshold, uint64_t chunk_bytes, uint32_t depth, uint64_t window, uint64_t peer_id,
                       py::bytes bases, py::bytes sizes, std::shared_ptr<Inbox> inbox) {
        auto ch = channel(std::move(pg), peer_rank, threshold, chunk_bytes, depth, window, timeout);
        return PgServer::make(fd, timeout, std::move(ch), peer_id, regions_of(bases, sizes), std::move(inbox));
      }))
      .def("served", &PgServer::served)
      .def("alive", &PgServer::alive)
      .def("reason", &PgServer::dead_reason)
      .def("close", &PgServer::shut, py::call_guard<py::gil_scoped_release>());
}
