"""Lookup buffer keyed by request: the producer `insert(key, tensors)` and keeps them,
bounded in bytes (a full buffer makes the producer wait, with a timeout, instead of
growing); the consumer `drop_select(key)` takes them over a pair of tensor pipes."""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from p2pkv.pipe import TensorPipe

__all__ = ["LookupBuffer"]


def _key_tensor(key: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(key.encode()), dtype=torch.uint8)


class LookupBuffer:
    """One end of a lookup buffer. `send` and `recv` are this process's outgoing and
    incoming pipes: on the producer they carry answers out and requests in, on the
    consumer the reverse."""

    def __init__(self, send: TensorPipe, recv: TensorPipe, *, capacity_bytes: int = 1 << 30, timeout: float = 30.0):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.send, self.recv = send, recv
        self.capacity_bytes, self.timeout = capacity_bytes, timeout
        self._items: dict[str, list[torch.Tensor]] = {}
        self._used = 0
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._server: threading.Thread | None = None

    @property
    def used_bytes(self) -> int:
        return self._used

    # ------------------------------------------------------------------ producer
    def insert(self, key: str, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> None:
        """Keep `tensors` under `key` until a consumer takes them; waits while the buffer is full."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.capacity_bytes:
            raise ValueError(f"{size} bytes for key {key!r} exceed the buffer's capacity of {self.capacity_bytes}")
        with self._cond:
            if key in self._items:
                raise ValueError(f"key {key!r} is already in the buffer")
            if not self._cond.wait_for(lambda: self._used + size <= self.capacity_bytes,
                                       self.timeout if timeout is None else timeout):
                raise TimeoutError(f"lookup buffer full ({self._used} of {self.capacity_bytes} bytes held): "
                                   f"no consumer took anything within the timeout, so {key!r} was not inserted")
            self._items[key] = list(tensors)
            self._used += size
        if self._server is None:
            self._server = threading.Thread(target=self._serve, name="p2pkv-lookup", daemon=True)
            self._server.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                req = self.recv.recv_tensor(timeout=0.5)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - a broken pipe ends serving
                return
            key = bytes(req.numpy()).decode(errors="replace") if req is not None else ""
            with self._cond:
                items = self._items.pop(key, None)
                if items is not None:
                    self._used -= sum(t.numel() * t.element_size() for t in items)
                    self._cond.notify_all()
            self.send.send_tensor(torch.tensor([-1 if items is None else len(items)]))
            for t in items or []:
                self.send.send_tensor(t)

    # ------------------------------------------------------------------ consumer
    def drop_select(self, key: str) -> list[torch.Tensor] | None:
        """Take (and remove) the tensors stored under `key` on the producer; None if there are none."""
        self.send.send_tensor(_key_tensor(key))
        count = self.recv.recv_tensor(timeout=self.timeout)
        n = int(count.item()) if count is not None else -1
        if n < 0:
            return None
        return [self.recv.recv_tensor(timeout=self.timeout) for _ in range(n)]

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.join(timeout=2)
