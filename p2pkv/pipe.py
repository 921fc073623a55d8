"""Ordered tensor pipe: `send_tensor(t | None)` on one side, `recv_tensor()` on the
other, in order, over any transport. The receiver owns a ring of fixed-size slots
registered with the transport; the sender writes into free slots and learns of
freed ones from credit messages, so a slow receiver applies backpressure."""
from __future__ import annotations

import collections
import math
import time
from typing import Any

import numpy as np
import torch

from p2pkv.layout import KVCacheSpec
from p2pkv.segments import Segments
from p2pkv.transport import TransferError, get_transport

__all__ = ["TensorPipe"]

_POLL = 2e-4


def _dtype(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"pipe received an unknown dtype {name!r}")
    return dt


def _sendable(tensor: Any) -> torch.Tensor:
    """`tensor` as a dense tensor whose bytes are its values, or a TypeError saying why the pipe cannot send it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"send_tensor() takes a torch.Tensor or None, got {type(tensor).__name__}")
    if tensor.is_quantized:
        raise TypeError(f"the pipe cannot send quantized tensors ({tensor.dtype}): send int_repr() and the "
                        "quantization parameters instead")
    if tensor.layout != torch.strided:
        raise TypeError(f"the pipe sends dense tensors only, got a {tensor.layout} (sparse) tensor: send to_dense()")
    if tensor.is_meta:
        raise TypeError("the pipe cannot send a tensor on the meta device: it has no data")
    return tensor.detach().resolve_conj().resolve_neg().contiguous()


class TensorPipe:
    """One direction of an ordered tensor pipe. The receiving end listens (`address`);
    the sending end calls `connect(receiver_address)`."""

    def __init__(self, backend: str = "tcp", *, slots: int = 64, slot_bytes: int = 1 << 20, device: str = "cpu",
                 timeout: float = 30.0, **options: Any):
        if slots <= 0 or slot_bytes <= 0:
            raise ValueError(f"slots and slot_bytes must be positive, got {slots} and {slot_bytes}")
        self.slots, self.slot_bytes, self.timeout = slots, slot_bytes, timeout
        self.ring = torch.zeros(slots, slot_bytes, dtype=torch.uint8, device=device)
        self.spec = KVCacheSpec.from_tensors([self.ring], block_dim=0, layout="pipe")
        self.transport = get_transport(backend, timeout=timeout, **options)
        self.transport.register([self.ring], self.spec)
        self._flat = self.ring.view(-1)
        self._peer: Any = None
        self._free: collections.deque[int] = collections.deque(range(slots))
        self._pending: dict[int, dict[str, Any]] = {}
        self._seq = 0
        self._closed = False

    @property
    def address(self) -> str:
        return self.transport.address

    def connect(self, receiver_address: str) -> None:
        """Sender side: connect to the receiver and say hello; it sends credits back to whoever said it,
        as its transport names the hello's sender (no address travels in the message)."""
        self._check_open()
        self._peer = self.transport.connect(receiver_address)
        self.transport.send_notif(self._peer, {"pipe": "hello"})

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("pipe is closed")

    # ------------------------------------------------------------------ sender
    def _poll(self) -> None:
        for n in self.transport.get_notifs():
            m = n.message
            if "credit" in m:
                self._free.extend(int(s) for s in m["credit"])
            elif m.get("pipe") == "hello":
                back = self.transport.reply_address(n.peer)
                if back is None:
                    raise TransferError(f"the {self.transport.name} transport cannot say where the pipe's sender is "
                                        "(reply_address), so no credit can reach it", peer=n.peer)
                self._peer = self.transport.connect(back)
            elif "seq" in m:
                self._pending[int(m["seq"])] = m

    def send_tensor(self, tensor: torch.Tensor | None) -> None:
        """Send a tensor (or None) after every earlier one; waits for free slots up to the timeout."""
        self._check_open()
        if self._peer is None:
            raise RuntimeError("send_tensor() before connect(receiver_address)")
        if tensor is None:
            seq, self._seq = self._seq, self._seq + 1
            self.transport.send_notif(self._peer, {"seq": seq, "none": True})
            return
        t = _sendable(tensor)
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        n = raw.numel()
        need = max(1, math.ceil(n / self.slot_bytes))
        if need > self.slots:
            raise ValueError(f"tensor of {n} bytes exceeds the pipe's capacity of {self.slots * self.slot_bytes} bytes")
        deadline = time.monotonic() + self.timeout
        while len(self._free) < need:
            self._poll()
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipe receiver freed no slots within {self.timeout:g} s (backpressure)")
            time.sleep(_POLL)
        ids = [self._free.popleft() for _ in range(need)]
        seq, self._seq = self._seq, self._seq + 1
        lens = [min(self.slot_bytes, n - i * self.slot_bytes) for i in range(need)]
        offs = [s * self.slot_bytes for s in ids]
        for i, (o, k) in enumerate(zip(offs, lens)):
            if k > 0:
                self._flat[o:o + k].copy_(raw[i * self.slot_bytes:i * self.slot_bytes + k])
        keep = [i for i, k in enumerate(lens) if k > 0]
        segs = Segments(np.zeros(len(keep), dtype=np.int32), np.array([offs[i] for i in keep], dtype=np.int64),
                        np.array([offs[i] for i in keep], dtype=np.int64), np.array([lens[i] for i in keep], dtype=np.int64))
        meta = {"seq": seq, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "slots": ids, "nbytes": n}
        self.transport.write(self._peer, segs, request_id=f"pipe-{seq}", notify=meta).wait(self.timeout)

    # ------------------------------------------------------------------ receiver
    def recv_tensor(self, timeout: float | None = None) -> torch.Tensor | None:
        """The next tensor in send order (None where None was sent); TimeoutError if none arrives in time."""
        self._check_open()
        seq = self._seq
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while seq not in self._pending:
            self._poll()
            if seq in self._pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no tensor #{seq} arrived on the pipe within the timeout")
            time.sleep(_POLL)
        m = self._pending.pop(seq)
        self._seq += 1
        if m.get("none"):
            return None
        dtype, shape, ids, n = _dtype(m.get("dtype")), m.get("shape"), m.get("slots"), m.get("nbytes")
        if not (isinstance(shape, list) and isinstance(ids, list) and isinstance(n, int)
                and all(isinstance(s, int) and 0 <= s for s in shape) and all(isinstance(i, int) and 0 <= i < self.slots for i in ids)
                and math.prod(shape) * torch.empty(0, dtype=dtype).element_size() == n
                and len(ids) == max(1, math.ceil(n / self.slot_bytes))):
            raise ValueError(f"pipe message #{seq} is inconsistent: {m!r}")
        out = torch.empty(n, dtype=torch.uint8, device=self.ring.device)
        for i, s in enumerate(ids):
            k = min(self.slot_bytes, n - i * self.slot_bytes)
            if k > 0:
                out[i * self.slot_bytes:i * self.slot_bytes + k].copy_(self._flat[s * self.slot_bytes:s * self.slot_bytes + k])
        if self._peer is not None:
            try:
                self.transport.send_notif(self._peer, {"credit": ids})
            except TransferError:
                pass  # the sender is gone; what it sent has arrived, and nobody needs the credit

        return out.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self._closed = True
        self.transport.close()
