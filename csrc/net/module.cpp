// p2pkv._native: the Python face of the native data path. Each call takes or returns plain
// bytes and ints and returns at once; waits and joins release the GIL. No native thread ever
// calls into Python.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>
#include <memory>
#include <string>

#include "frame.h"
#include "geometry.h"
#include "accept.h"
#include "crypto.h"
#include "dial.h"
#include "hello.h"
#include "link.h"
#include "threads.h"

using namespace p2pkv;

namespace {

template <class T>
bool read_array(PyObject* obj, std::vector<T>& out, const char* what) {
  Py_buffer b;
  if (PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE) < 0) return false;
  bool ok = b.len % Py_ssize_t(sizeof(T)) == 0;
  if (ok) {
    out.resize(size_t(b.len) / sizeof(T));
    if (b.len) std::memcpy(out.data(), b.buf, size_t(b.len));
  } else {
    PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zu-byte items", what, b.len, sizeof(T));
  }
  PyBuffer_Release(&b);
  return ok;
}

bool read_bytes(PyObject* obj, std::string& out) {
  if (obj == Py_None) {
    out.clear();
    return true;
  }
  Py_buffer b;
  if (PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE) < 0) return false;
  out.assign(static_cast<const char*>(b.buf), size_t(b.len));
  PyBuffer_Release(&b);
  return true;
}

// ------------------------------------------------------------------------------ Geometry
struct GeometryObject {
  PyObject_HEAD
  std::shared_ptr<const Geometry> geo;
};

int Geometry_init(GeometryObject* self, PyObject* args, PyObject*) {
  PyObject *bases, *sizes, *strides, *starts, *offs, *lens;
  unsigned long long num_blocks;
  if (!PyArg_ParseTuple(args, "OOOKOOO", &bases, &sizes, &strides, &num_blocks, &starts, &offs, &lens)) return -1;
  auto g = std::make_shared<Geometry>();
  g->num_blocks = num_blocks;
  if (!read_array(bases, g->mem.base, "bases") || !read_array(sizes, g->mem.size, "sizes") ||
      !read_array(strides, g->stride, "strides") || !read_array(starts, g->piece_start, "piece starts") ||
      !read_array(offs, g->piece_off, "piece offsets") || !read_array(lens, g->piece_len, "piece lengths"))
    return -1;
  std::string why;
  if (!g->validate(why)) {
    PyErr_SetString(PyExc_ValueError, why.c_str());
    return -1;
  }
  new (&self->geo) std::shared_ptr<const Geometry>(std::move(g));
  return 0;
}

void Geometry_dealloc(GeometryObject* self) {
  self->geo.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

// iovecs(body, is_write, distinct) -> bytes of (address, length) uint64 pairs; ValueError(why).
PyObject* Geometry_iovecs(GeometryObject* self, PyObject* args) {
  PyObject* body_obj;
  int is_write, dst_side, distinct;
  if (!PyArg_ParseTuple(args, "Oppp", &body_obj, &is_write, &dst_side, &distinct)) return nullptr;
  std::string body;
  if (!read_bytes(body_obj, body)) return nullptr;
  Request req;
  std::string why;
  std::vector<iovec> rows;
  uint64_t total = 0;
  if (!parse_request(reinterpret_cast<const uint8_t*>(body.data()), body.size(), is_write, req, why) ||
      !request_iovecs(req, self->geo.get(), self->geo->mem, dst_side, distinct, rows, total, why)) {
    PyErr_SetString(PyExc_ValueError, why.c_str());
    return nullptr;
  }
  std::string out(rows.size() * 16, '\0');
  for (size_t i = 0; i < rows.size(); ++i) {
    uint64_t a = reinterpret_cast<uint64_t>(rows[i].iov_base), n = rows[i].iov_len;
    std::memcpy(&out[16 * i], &a, 8);
    std::memcpy(&out[16 * i + 8], &n, 8);
  }
  return PyBytes_FromStringAndSize(out.data(), Py_ssize_t(out.size()));
}

PyMethodDef Geometry_methods[] = {
    {"iovecs", reinterpret_cast<PyCFunction>(Geometry_iovecs), METH_VARARGS,
     "iovec rows of a request body on this side, as (address, length) uint64 pairs"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject GeometryType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// ------------------------------------------------------------------------------------ Op
struct OpObject {
  PyObject_HEAD
  std::shared_ptr<Op> op;
};

PyTypeObject OpType = {PyVarObject_HEAD_INIT(nullptr, 0)};

void Op_dealloc(OpObject* self) {
  self->op.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Op_done(OpObject* self, PyObject*) { return PyBool_FromLong(self->op->finished.load()); }

PyObject* Op_wait(OpObject* self, PyObject* args) {
  double timeout = -1;
  if (!PyArg_ParseTuple(args, "|d", &timeout)) return nullptr;
  bool done;
  std::shared_ptr<Op> op = self->op;
  Py_BEGIN_ALLOW_THREADS
  done = op->wait(timeout);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(done);
}

// error() -> None, or (kind, message, peer's ERROR body) once finished with an error.
PyObject* Op_error(OpObject* self, PyObject*) {
  Op& op = *self->op;
  if (!op.finished.load() || op.error == kOk) Py_RETURN_NONE;
  return Py_BuildValue("(is#y#)", int(op.error), op.message.data(), Py_ssize_t(op.message.size()),
                       op.peer_meta.data(), Py_ssize_t(op.peer_meta.size()));
}

PyObject* Op_seconds(OpObject* self, PyObject*) { return PyFloat_FromDouble(self->op->seconds); }

PyMethodDef Op_methods[] = {
    {"done", reinterpret_cast<PyCFunction>(Op_done), METH_NOARGS, "whether the op ended (ok or not)"},
    {"wait", reinterpret_cast<PyCFunction>(Op_wait), METH_VARARGS,
     "wait(timeout=-1) -> ended? (waits without the GIL; < 0 waits for good)"},
    {"error", reinterpret_cast<PyCFunction>(Op_error), METH_NOARGS, "None, or (kind, message, peer_meta)"},
    {"seconds", reinterpret_cast<PyCFunction>(Op_seconds), METH_NOARGS, "first byte sent to last byte moved"},
    {nullptr, nullptr, 0, nullptr}};

PyObject* wrap_op(std::shared_ptr<Op> op) {
  auto* o = reinterpret_cast<OpObject*>(OpType.tp_alloc(&OpType, 0));
  if (o == nullptr) return nullptr;
  new (&o->op) std::shared_ptr<Op>(std::move(op));
  return reinterpret_cast<PyObject*>(o);
}

// ------------------------------------------------------------------------------- Inbox
struct InboxObject {
  PyObject_HEAD
  std::shared_ptr<Inbox> inbox;
};

PyTypeObject InboxType = {PyVarObject_HEAD_INIT(nullptr, 0)};

int Inbox_init(InboxObject* self, PyObject* args, PyObject*) {
  unsigned long long max_bytes = 256ull << 20;
  if (!PyArg_ParseTuple(args, "|K", &max_bytes)) return -1;
  new (&self->inbox) std::shared_ptr<Inbox>(std::make_shared<Inbox>(size_t(max_bytes)));
  return 0;
}

void Inbox_dealloc(InboxObject* self) {
  self->inbox.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Inbox_drain(InboxObject* self, PyObject*) {
  if (!self->inbox) return PyList_New(0);
  auto items = self->inbox->drain();
  PyObject* out = PyList_New(Py_ssize_t(items.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    PyObject* t = Py_BuildValue("(Ky#)", static_cast<unsigned long long>(items[i].first), items[i].second.data(),
                                Py_ssize_t(items[i].second.size()));
    if (t == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, Py_ssize_t(i), t);
  }
  return out;
}

PyMethodDef Inbox_methods[] = {
    {"drain", reinterpret_cast<PyCFunction>(Inbox_drain), METH_NOARGS, "[(peer id, msgpack body)] since the last call"},
    {nullptr, nullptr, 0, nullptr}};

// -------------------------------------------------------------------------------- Held
struct HeldObject {
  PyObject_HEAD
  std::shared_ptr<HeldSet> held;
};

PyTypeObject HeldType = {PyVarObject_HEAD_INIT(nullptr, 0)};

int Held_init(HeldObject* self, PyObject*, PyObject*) {
  new (&self->held) std::shared_ptr<HeldSet>(std::make_shared<HeldSet>());
  return 0;
}

void Held_dealloc(HeldObject* self) {
  self->held.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

bool id_arg(PyObject* args, std::string& id) {
  const char* p;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "s#", &p, &n)) return false;
  id.assign(p, size_t(n));
  return true;
}

PyObject* Held_hold(HeldObject* self, PyObject* args) {
  std::string id;
  if (!id_arg(args, id)) return nullptr;
  self->held->hold(id);
  Py_RETURN_NONE;
}

PyObject* Held_unhold(HeldObject* self, PyObject* args) {
  std::string id;
  if (!id_arg(args, id)) return nullptr;
  return PyBool_FromLong(self->held->unhold(id));
}

PyObject* Held_serving(HeldObject* self, PyObject* args) {
  std::string id;
  if (!id_arg(args, id)) return nullptr;
  return PyBool_FromLong(self->held->serving(id));
}

PyMethodDef Held_methods[] = {
    {"hold", reinterpret_cast<PyCFunction>(Held_hold), METH_VARARGS, "serve held reads of this request id"},
    {"unhold", reinterpret_cast<PyCFunction>(Held_unhold), METH_VARARGS,
     "stop serving it; False while a read of it is still in flight"},
    {"serving", reinterpret_cast<PyCFunction>(Held_serving), METH_VARARGS, "whether a read of it is in flight"},
    {nullptr, nullptr, 0, nullptr}};

// ------------------------------------------------------------------------------- links
struct LinkObject {
  PyObject_HEAD
  std::shared_ptr<Link> link;
};

PyTypeObject InitiatorType = {PyVarObject_HEAD_INIT(nullptr, 0)};
PyTypeObject ServerType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// Device staging from (cuda_api address, device, bytes); null when cuda_api is 0 (host memory).
std::shared_ptr<CudaStaging> staging_of(unsigned long long api, int device, unsigned long long bytes) {
  if (api == 0) return nullptr;
  return std::make_shared<CudaStaging>(reinterpret_cast<const CudaApi*>(api), device, size_t(bytes));
}

bool check_api(unsigned long long api, unsigned long long bytes) {
  if (api != 0 && reinterpret_cast<const CudaApi*>(api)->version != 1) {
    PyErr_SetString(PyExc_ValueError, "the CUDA extension's native API is of another version: rebuild p2pkv");
    return false;
  }
  if (api != 0 && bytes < (64u << 10)) {
    PyErr_SetString(PyExc_ValueError, "staging needs at least 64 KiB");
    return false;
  }
  return true;
}

PyObject* wrap_server(std::shared_ptr<Server> server) {
  auto* o = reinterpret_cast<LinkObject*>(ServerType.tp_alloc(&ServerType, 0));
  if (o == nullptr) return nullptr;
  new (&o->link) std::shared_ptr<Link>(std::move(server));
  return reinterpret_cast<PyObject*>(o);
}

// ---------------------------------------------------------------------------- Acceptor
struct AcceptorObject {
  PyObject_HEAD
  std::shared_ptr<Acceptor> acc;
};

PyTypeObject AcceptorType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// Reads (info, token or None, timeout) into a handshake set-up.
bool read_setup(PyObject* info, PyObject* token, double timeout, HandshakeSetup& s) {
  if (!read_bytes(info, s.info) || !read_bytes(token, s.token)) return false;
  if (s.info.size() > kMaxHelloInfo) {
    PyErr_Format(PyExc_ValueError, "handshake info of %zu bytes exceeds the limit of %u", s.info.size(), kMaxHelloInfo);
    return false;
  }
  s.auth = token != Py_None;
  s.timeout_s = timeout;
  return true;
}

// Acceptor(listen_fd, handshake): the listening socket stays the caller's.
int Acceptor_init(AcceptorObject* self, PyObject* args, PyObject*) {
  int fd, handshake = 0;
  if (!PyArg_ParseTuple(args, "i|p", &fd, &handshake)) return -1;
  new (&self->acc) std::shared_ptr<Acceptor>(std::make_shared<Acceptor>(fd, handshake != 0));
  return 0;
}

void Acceptor_dealloc(AcceptorObject* self) {
  std::shared_ptr<Acceptor> a = std::move(self->acc);
  if (a) {
    Py_BEGIN_ALLOW_THREADS
    a->close();
    a.reset();
    Py_END_ALLOW_THREADS
  }
  self->acc.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Acceptor_configure(AcceptorObject* self, PyObject* args) {
  PyObject *info, *token;
  double timeout;
  if (!PyArg_ParseTuple(args, "OOd", &info, &token, &timeout)) return nullptr;
  HandshakeSetup s;
  if (!read_setup(info, token, timeout, s)) return nullptr;
  self->acc->configure(std::move(s));
  Py_RETURN_NONE;
}

// serve(bases, sizes, inbox, held=None, cuda_api=0, device=-1, staging_bytes=0, sock_buf_bytes=0): from now
// on every hand-shaken connection is served natively at once (its Server comes with take_ready).
PyObject* Acceptor_serve(AcceptorObject* self, PyObject* args) {
  PyObject *bases, *sizes, *inbox, *held = Py_None;
  unsigned long long api = 0, bytes = 0;
  int device = -1, sock_buf = 0;
  if (!PyArg_ParseTuple(args, "OOO!|OKiKi", &bases, &sizes, &InboxType, &inbox, &held, &api, &device, &bytes,
                        &sock_buf) ||
      !check_api(api, bytes))
    return nullptr;
  if (held != Py_None && !PyObject_TypeCheck(held, &HeldType)) {
    PyErr_SetString(PyExc_TypeError, "held must be a p2pkv._native.Held or None");
    return nullptr;
  }
  ServeSetup s;
  if (!read_array(bases, s.mem.base, "bases") || !read_array(sizes, s.mem.size, "sizes")) return nullptr;
  if (s.mem.base.size() != s.mem.size.size()) {
    PyErr_SetString(PyExc_ValueError, "bases and sizes differ in length");
    return nullptr;
  }
  s.inbox = reinterpret_cast<InboxObject*>(inbox)->inbox;
  if (held != Py_None) s.held = reinterpret_cast<HeldObject*>(held)->held;
  s.api = reinterpret_cast<const CudaApi*>(api);
  s.device = device;
  s.staging_bytes = size_t(bytes);
  s.sock_buf_bytes = sock_buf;
  self->acc->serve(std::move(s));
  Py_RETURN_NONE;
}

PyObject* Acceptor_wait(AcceptorObject* self, PyObject* args) {
  double timeout, min_age = 0;
  if (!PyArg_ParseTuple(args, "d|d", &timeout, &min_age)) return nullptr;
  std::shared_ptr<Acceptor> a = self->acc;
  bool got;
  Py_BEGIN_ALLOW_THREADS
  got = a->wait(timeout, min_age);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(got);
}

PyObject* Acceptor_take(AcceptorObject* self, PyObject*) {
  std::vector<int> fds = self->acc->take();
  PyObject* out = PyList_New(Py_ssize_t(fds.size()));
  for (size_t i = 0; out && i < fds.size(); ++i) PyList_SET_ITEM(out, Py_ssize_t(i), PyLong_FromLong(fds[i]));
  return out;
}

PyObject* Acceptor_take_ready(AcceptorObject* self, PyObject*) {
  std::vector<Accepted> got = self->acc->take_ready();
  PyObject* out = PyList_New(0);
  for (size_t i = 0; out && i < got.size(); ++i) {
    PyObject* server = Py_None;
    if (got[i].server) {
      server = wrap_server(got[i].server);
    } else {
      Py_INCREF(Py_None);
    }
    PyObject* t = server == nullptr ? nullptr
                                    : Py_BuildValue("(is#y#NK)", got[i].fd, got[i].addr.data(),
                                                    Py_ssize_t(got[i].addr.size()), got[i].info.data(),
                                                    Py_ssize_t(got[i].info.size()), server,
                                                    static_cast<unsigned long long>(got[i].peer_id));
    if (t == nullptr || PyList_Append(out, t) < 0) {
      Py_XDECREF(t);
      Py_DECREF(out);
      for (size_t j = i; j < got.size(); ++j) {
        if (got[j].server) got[j].server->close();
        else if (got[j].fd >= 0) close(got[j].fd);
      }
      return nullptr;
    }
    Py_DECREF(t);
  }
  return out;
}

PyObject* Acceptor_take_refusals(AcceptorObject* self, PyObject*) {
  uint64_t dropped = 0;
  std::vector<Refusal> got = self->acc->take_refusals(dropped);
  PyObject* out = PyList_New(0);
  for (size_t i = 0; out && i < got.size(); ++i) {
    PyObject* t = Py_BuildValue("(s#s#y#)", got[i].addr.data(), Py_ssize_t(got[i].addr.size()), got[i].reason.data(),
                                Py_ssize_t(got[i].reason.size()), got[i].peer_meta.data(),
                                Py_ssize_t(got[i].peer_meta.size()));
    if (t == nullptr || PyList_Append(out, t) < 0) {
      Py_XDECREF(t);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(t);
  }
  if (out == nullptr) return nullptr;
  return Py_BuildValue("(NK)", out, static_cast<unsigned long long>(dropped));
}

PyObject* Acceptor_setup_done(AcceptorObject* self, PyObject*) {
  self->acc->setup_done();
  Py_RETURN_NONE;
}

PyObject* Acceptor_pending(AcceptorObject* self, PyObject*) { return PyLong_FromSize_t(self->acc->pending()); }

PyObject* Acceptor_close(AcceptorObject* self, PyObject*) {
  std::shared_ptr<Acceptor> a = self->acc;
  Py_BEGIN_ALLOW_THREADS
  a->close();
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef Acceptor_methods[] = {
    {"configure", reinterpret_cast<PyCFunction>(Acceptor_configure), METH_VARARGS,
     "configure(info, token or None, timeout): what this side says in handshakes"},
    {"serve", reinterpret_cast<PyCFunction>(Acceptor_serve), METH_VARARGS,
     "serve(bases, sizes, inbox, held=None, cuda_api=0, device=-1, staging_bytes=0, sock_buf_bytes=0): serve each "
     "peer natively"},
    {"wait", reinterpret_cast<PyCFunction>(Acceptor_wait), METH_VARARGS, "wait(timeout, min_age=0) -> something is queued (hand-shaken ones untaken for min_age)"},
    {"take", reinterpret_cast<PyCFunction>(Acceptor_take), METH_NOARGS, "plain mode: queued descriptors, now in set-up"},
    {"take_ready", reinterpret_cast<PyCFunction>(Acceptor_take_ready), METH_NOARGS,
     "hand-shaken connections as (fd or -1, address, peer info, its Server or None, peer id)"},
    {"take_refusals", reinterpret_cast<PyCFunction>(Acceptor_take_refusals), METH_NOARGS,
     "([(address, reason, peer error body)], refusals not kept)"},
    {"setup_done", reinterpret_cast<PyCFunction>(Acceptor_setup_done), METH_NOARGS, "one taken set-up ended"},
    {"pending", reinterpret_cast<PyCFunction>(Acceptor_pending), METH_NOARGS, "connections whose set-up has not ended"},
    {"close", reinterpret_cast<PyCFunction>(Acceptor_close), METH_NOARGS, "stop accepting"},
    {nullptr, nullptr, 0, nullptr}};

// ------------------------------------------------------------------------------ Dialer
struct DialerObject {
  PyObject_HEAD
  std::shared_ptr<Dialer> dial;
};

PyTypeObject DialerType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// Dialer(host, port, info, token or None, timeout): starts at once.
int Dialer_init(DialerObject* self, PyObject* args, PyObject*) {
  const char* host;
  int port;
  PyObject *info, *token;
  double timeout;
  if (!PyArg_ParseTuple(args, "siOOd", &host, &port, &info, &token, &timeout)) return -1;
  HandshakeSetup s;
  if (!read_setup(info, token, timeout, s)) return -1;
  new (&self->dial) std::shared_ptr<Dialer>(Dialer::start(host, port, std::move(s)));
  return 0;
}

void Dialer_dealloc(DialerObject* self) {
  if (self->dial) self->dial->cancel();
  self->dial.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Dialer_done(DialerObject* self, PyObject*) { return PyBool_FromLong(self->dial->done()); }

PyObject* Dialer_wait(DialerObject* self, PyObject* args) {
  double timeout;
  if (!PyArg_ParseTuple(args, "d", &timeout)) return nullptr;
  std::shared_ptr<Dialer> d = self->dial;
  bool got;
  Py_BEGIN_ALLOW_THREADS
  got = d->wait(timeout);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(got);
}

PyObject* Dialer_take(DialerObject* self, PyObject*) {
  Dialer::Result r = self->dial->take();
  return Py_BuildValue("(s#s#y#iy#)", r.code.data(), Py_ssize_t(r.code.size()), r.message.data(),
                       Py_ssize_t(r.message.size()), r.peer_meta.data(), Py_ssize_t(r.peer_meta.size()), r.fd,
                       r.info.data(), Py_ssize_t(r.info.size()));
}

PyObject* Dialer_cancel(DialerObject* self, PyObject*) {
  self->dial->cancel();
  Py_RETURN_NONE;
}

PyMethodDef Dialer_methods[] = {
    {"done", reinterpret_cast<PyCFunction>(Dialer_done), METH_NOARGS, "whether the dial ended"},
    {"wait", reinterpret_cast<PyCFunction>(Dialer_wait), METH_VARARGS, "wait(timeout) -> ended"},
    {"take", reinterpret_cast<PyCFunction>(Dialer_take), METH_NOARGS,
     "(code, message, peer error body, fd, peer info); code '' on success, fd handed over once"},
    {"cancel", reinterpret_cast<PyCFunction>(Dialer_cancel), METH_NOARGS, "stop a dial under way"},
    {nullptr, nullptr, 0, nullptr}};

// hmac_sha256(key, data) -> 32 bytes: the handshake's MAC, for tests against hashlib.
PyObject* py_hmac_sha256(PyObject*, PyObject* args) {
  PyObject *key_obj, *data_obj;
  if (!PyArg_ParseTuple(args, "OO", &key_obj, &data_obj)) return nullptr;
  std::string key, data, why;
  if (!read_bytes(key_obj, key) || !read_bytes(data_obj, data)) return nullptr;
  uint8_t out[kMacBytes];
  if (!hmac_sha256(key, reinterpret_cast<const uint8_t*>(data.data()), data.size(), out, why)) {
    PyErr_SetString(PyExc_RuntimeError, why.c_str());
    return nullptr;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out), kMacBytes);
}

// use_io_cpus(): the calling thread leaves the engine's pinned core (threads.h); for p2pkv's Python threads.
PyObject* py_use_io_cpus(PyObject*, PyObject*) {
  use_io_cpus();
  Py_RETURN_NONE;
}

// hmac_available() -> "" where HMAC works, else why not.
PyObject* py_hmac_available(PyObject*, PyObject*) {
  std::string why;
  if (hmac_available(why)) return PyUnicode_FromString("");
  return PyUnicode_FromString(why.empty() ? "unavailable" : why.c_str());
}

// ------------------------------------------------------------------------------- links

void Link_dealloc(LinkObject* self) {
  if (self->link) {
    std::shared_ptr<Link> l = std::move(self->link);
    Py_BEGIN_ALLOW_THREADS
    l->close();
    l.reset();
    Py_END_ALLOW_THREADS
  }
  self->link.~shared_ptr();
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Link_alive(LinkObject* self, PyObject*) { return PyBool_FromLong(self->link && self->link->alive()); }

PyObject* Link_reason(LinkObject* self, PyObject*) {
  std::string r = self->link ? self->link->dead_reason() : std::string("closed");
  return PyUnicode_DecodeUTF8(r.data(), Py_ssize_t(r.size()), "replace");
}

PyObject* Link_close(LinkObject* self, PyObject*) {
  std::shared_ptr<Link> l = self->link;
  if (l) {
    Py_BEGIN_ALLOW_THREADS
    l->close();
    Py_END_ALLOW_THREADS
  }
  Py_RETURN_NONE;
}


// Initiator(fd, timeout, cuda_api=0, device=-1, staging_bytes=0): takes ownership of the connected descriptor.
int Initiator_init(LinkObject* self, PyObject* args, PyObject*) {
  int fd, device = -1;
  double timeout;
  unsigned long long api = 0, bytes = 0;
  if (!PyArg_ParseTuple(args, "id|KiK", &fd, &timeout, &api, &device, &bytes) || !check_api(api, bytes)) return -1;
  new (&self->link) std::shared_ptr<Link>(Initiator::make(fd, timeout, staging_of(api, device, bytes)));
  return 0;
}

// post(kind, frame, local, geometry, nbytes, buf_addr=0, buf_len=0, cuda_api=0, cuda_event=0, device=-1) -> Op
PyObject* Initiator_post(LinkObject* self, PyObject* args) {
  int kind, device = -1;
  PyObject *frame, *local, *geo;
  unsigned long long nbytes, buf_addr = 0, buf_len = 0, api = 0, event = 0;
  if (!PyArg_ParseTuple(args, "iOOOK|KKKKi", &kind, &frame, &local, &geo, &nbytes, &buf_addr, &buf_len, &api, &event,
                        &device) ||
      !check_api(api, 1u << 16))
    return nullptr;
  if ((api == 0) != (event == 0)) {
    PyErr_SetString(PyExc_ValueError, "a CUDA event needs the CUDA call table, and the other way round");
    return nullptr;
  }
  if (kind < kOpRead || kind > kOpBaseline) {
    PyErr_Format(PyExc_ValueError, "unknown op kind %d", kind);
    return nullptr;
  }
  if (geo != Py_None && !PyObject_TypeCheck(geo, &GeometryType)) {
    PyErr_SetString(PyExc_TypeError, "geometry must be a p2pkv._native.Geometry or None");
    return nullptr;
  }
  auto op = std::make_shared<Op>();
  op->kind = OpKind(kind);
  op->nbytes = nbytes;
  if (!read_bytes(frame, op->frame) || !read_bytes(local, op->local)) return nullptr;
  if (geo != Py_None) op->geo = reinterpret_cast<GeometryObject*>(geo)->geo;
  if (buf_len) op->iov.push_back(iovec{reinterpret_cast<void*>(buf_addr), size_t(buf_len)});
  op->api = reinterpret_cast<const CudaApi*>(api);
  op->event = reinterpret_cast<void*>(event);
  op->device = device;
  std::static_pointer_cast<Initiator>(self->link)->post(op);
  return wrap_op(std::move(op));
}

// Server(fd, timeout, peer_id, bases, sizes, read_geometry, write_geometry, inbox, cuda_api=0, device=-1,
//        staging_bytes=0, held=None)
int Server_init(LinkObject* self, PyObject* args, PyObject*) {
  int fd, device = -1;
  double timeout;
  unsigned long long peer_id, api = 0, bytes = 0;
  PyObject *bases, *sizes, *rg, *wg, *inbox, *held = Py_None;
  if (!PyArg_ParseTuple(args, "idKOOOOO!|KiKO", &fd, &timeout, &peer_id, &bases, &sizes, &rg, &wg, &InboxType, &inbox,
                        &api, &device, &bytes, &held) ||
      !check_api(api, bytes))
    return -1;
  if (held != Py_None && !PyObject_TypeCheck(held, &HeldType)) {
    PyErr_SetString(PyExc_TypeError, "held must be a p2pkv._native.Held or None");
    return -1;
  }
  Regions mem;
  if (!read_array(bases, mem.base, "bases") || !read_array(sizes, mem.size, "sizes")) return -1;
  if (mem.base.size() != mem.size.size()) {
    PyErr_SetString(PyExc_ValueError, "bases and sizes differ in length");
    return -1;
  }
  std::shared_ptr<const Geometry> g[2];
  PyObject* gs[2] = {rg, wg};
  for (int i = 0; i < 2; ++i) {
    if (gs[i] == Py_None) continue;
    if (!PyObject_TypeCheck(gs[i], &GeometryType)) {
      PyErr_SetString(PyExc_TypeError, "geometries must be p2pkv._native.Geometry or None");
      return -1;
    }
    g[i] = reinterpret_cast<GeometryObject*>(gs[i])->geo;
  }
  new (&self->link) std::shared_ptr<Link>(
      Server::make(fd, timeout, peer_id, std::move(mem), g[0], g[1], reinterpret_cast<InboxObject*>(inbox)->inbox,
                   staging_of(api, device, bytes),
                   held == Py_None ? nullptr : reinterpret_cast<HeldObject*>(held)->held));
  return 0;
}

PyObject* Server_served(LinkObject* self, PyObject*) {
  return PyLong_FromUnsignedLongLong(std::static_pointer_cast<Server>(self->link)->served());
}

PyMethodDef Initiator_methods[] = {
    {"post", reinterpret_cast<PyCFunction>(Initiator_post), METH_VARARGS, "queue an op; returns its Op"},
    {"alive", reinterpret_cast<PyCFunction>(Link_alive), METH_NOARGS, "whether the connection is up"},
    {"reason", reinterpret_cast<PyCFunction>(Link_reason), METH_NOARGS, "why the connection went down"},
    {"close", reinterpret_cast<PyCFunction>(Link_close), METH_NOARGS, "fail queued ops, stop, close the socket"},
    {nullptr, nullptr, 0, nullptr}};

PyMethodDef Server_methods[] = {
    {"served", reinterpret_cast<PyCFunction>(Server_served), METH_NOARGS, "requests served so far"},
    {"alive", reinterpret_cast<PyCFunction>(Link_alive), METH_NOARGS, "whether the connection is up"},
    {"reason", reinterpret_cast<PyCFunction>(Link_reason), METH_NOARGS, "why the connection went down"},
    {"close", reinterpret_cast<PyCFunction>(Link_close), METH_NOARGS, "stop serving and close the socket"},
    {nullptr, nullptr, 0, nullptr}};

// parse_request(body, is_write) -> dict: the fields of a request body, or ValueError(why).
PyObject* py_parse_request(PyObject*, PyObject* args) {
  PyObject* body_obj;
  int is_write;
  if (!PyArg_ParseTuple(args, "Op", &body_obj, &is_write)) return nullptr;
  std::string body;
  if (!read_bytes(body_obj, body)) return nullptr;
  Request req;
  std::string why;
  if (!parse_request(reinterpret_cast<const uint8_t*>(body.data()), body.size(), is_write, req, why)) {
    PyErr_SetString(PyExc_ValueError, why.c_str());
    return nullptr;
  }
  PyObject* regions = Py_None;
  Py_INCREF(Py_None);
  if (!req.all_regions) {
    Py_DECREF(Py_None);
    regions = PyList_New(Py_ssize_t(req.regions.size()));
    for (size_t i = 0; i < req.regions.size(); ++i)
      PyList_SET_ITEM(regions, Py_ssize_t(i), PyLong_FromUnsignedLong(req.regions[i]));
  }
  size_t item = req.form == kBlocks ? 8 : 24;
  return Py_BuildValue("{s:i,s:y#,s:y#,s:N,s:y#}", "form", int(req.form), "request_id", req.request_id.data(),
                       Py_ssize_t(req.request_id.size()), "notify", reinterpret_cast<const char*>(req.notify),
                       Py_ssize_t(req.notify_len), "regions", regions, "items",
                       reinterpret_cast<const char*>(req.items), Py_ssize_t(item * req.count));
}

PyMethodDef module_methods[] = {
    {"parse_request", py_parse_request, METH_VARARGS, "parse a data request body as the serving side does"},
    {"hmac_sha256", py_hmac_sha256, METH_VARARGS, "hmac_sha256(key, data): the handshake's MAC"},
    {"use_io_cpus", py_use_io_cpus, METH_NOARGS, "move the calling thread to P2PKV_IO_CPUS (else every CPU)"},
    {"hmac_available", py_hmac_available, METH_NOARGS, "'' where the native handshake can use a token, else why not"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_native",
                          "p2pkv's native data path: tcp links progressed by C++ threads", -1, module_methods};

bool ready_type(PyTypeObject& t, const char* name, Py_ssize_t size, PyMethodDef* methods, destructor dealloc,
                initproc init, const char* doc) {
  t.tp_name = name;
  t.tp_basicsize = size;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_methods = methods;
  t.tp_dealloc = dealloc;
  t.tp_doc = doc;
  if (init != nullptr) {
    t.tp_init = init;
    t.tp_new = PyType_GenericNew;
  }
  return PyType_Ready(&t) == 0;
}

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
  if (!ready_type(GeometryType, "p2pkv._native.Geometry", sizeof(GeometryObject), Geometry_methods,
                  reinterpret_cast<destructor>(Geometry_dealloc), reinterpret_cast<initproc>(Geometry_init),
                  "block geometry of one side: regions, strides and pieces") ||
      !ready_type(OpType, "p2pkv._native.Op", sizeof(OpObject), Op_methods, reinterpret_cast<destructor>(Op_dealloc),
                  nullptr, "one posted transfer") ||
      !ready_type(InboxType, "p2pkv._native.Inbox", sizeof(InboxObject), Inbox_methods,
                  reinterpret_cast<destructor>(Inbox_dealloc), reinterpret_cast<initproc>(Inbox_init),
                  "messages received from peers") ||
      !ready_type(AcceptorType, "p2pkv._native.Acceptor", sizeof(AcceptorObject), Acceptor_methods,
                  reinterpret_cast<destructor>(Acceptor_dealloc), reinterpret_cast<initproc>(Acceptor_init),
                  "accepts connections natively (and hand-shakes them, in handshake mode)") ||
      !ready_type(DialerType, "p2pkv._native.Dialer", sizeof(DialerObject), Dialer_methods,
                  reinterpret_cast<destructor>(Dialer_dealloc), reinterpret_cast<initproc>(Dialer_init),
                  "dials and hand-shakes a peer on a native thread") ||
      !ready_type(HeldType, "p2pkv._native.Held", sizeof(HeldObject), Held_methods,
                  reinterpret_cast<destructor>(Held_dealloc), reinterpret_cast<initproc>(Held_init),
                  "request ids whose reads may be served (held blocks)") ||
      !ready_type(InitiatorType, "p2pkv._native.Initiator", sizeof(LinkObject), Initiator_methods,
                  reinterpret_cast<destructor>(Link_dealloc), reinterpret_cast<initproc>(Initiator_init),
                  "the dialling side of a data connection") ||
      !ready_type(ServerType, "p2pkv._native.Server", sizeof(LinkObject), Server_methods,
                  reinterpret_cast<destructor>(Link_dealloc), reinterpret_cast<initproc>(Server_init),
                  "the serving side of a data connection"))
    return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyObject* types[] = {reinterpret_cast<PyObject*>(&GeometryType), reinterpret_cast<PyObject*>(&OpType),
                       reinterpret_cast<PyObject*>(&InboxType), reinterpret_cast<PyObject*>(&InitiatorType),
                       reinterpret_cast<PyObject*>(&ServerType), reinterpret_cast<PyObject*>(&HeldType),
                       reinterpret_cast<PyObject*>(&AcceptorType), reinterpret_cast<PyObject*>(&DialerType)};
  const char* names[] = {"Geometry", "Op", "Inbox", "Initiator", "Server", "Held", "Acceptor", "Dialer"};
  for (int i = 0; i < 8; ++i) {
    Py_INCREF(types[i]);
    if (PyModule_AddObject(m, names[i], types[i]) < 0) return nullptr;
  }
  PyModule_AddIntConstant(m, "VERSION", kVersion);
  PyModule_AddIntConstant(m, "MAX_ROWS", long(kMaxRows));
  PyModule_AddIntConstant(m, "MAX_NOTIFY", long(kMaxNotify));
  PyModule_AddIntConstant(m, "MAX_HELLO_INFO", long(kMaxHelloInfo));
  return m;
}
