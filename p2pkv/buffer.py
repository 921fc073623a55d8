"""Lookup buffer keyed by request: the producer `insert(key, tensors)` and keeps them,
bounded in bytes (a full buffer makes the producer wait, with a timeout, instead of
growing); the consumer `drop_select(key)` takes them over a pair of tensor pipes."""
from __future__ import annotations

import threading
import time
from typing import Sequence

import torch

from p2pkv.pipe import TensorPipe
from p2pkv.transport.base import off_engine_cpus

__all__ = ["LookupBuffer"]


def _key_tensor(key: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(key.encode()), dtype=torch.uint8)


def _key_of(t: torch.Tensor | None) -> str:
    return bytes(t.numpy()).decode(errors="replace") if t is not None else ""


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"lookup buffer keys are str, got {type(key).__name__} {key!r}")
    return key


class LookupBuffer:
    """One end of a lookup buffer. `send` and `recv` are this process's outgoing and
    incoming pipes: on the producer they carry answers out and requests in, on the
    consumer the reverse. Each answer starts with the key it answers, so one that
    comes after its lookup timed out is kept for a later lookup of that key rather
    than taken for the answer to another."""

    def __init__(self, send: TensorPipe, recv: TensorPipe, *, capacity_bytes: int = 1 << 30, timeout: float = 30.0):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.send, self.recv = send, recv
        self.capacity_bytes, self.timeout = capacity_bytes, timeout
        self._items: dict[str, list[torch.Tensor]] = {}
        self._used = 0
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._server: threading.Thread | None = None
        self._partial: tuple[str, int | None, list[torch.Tensor]] | None = None
        self._late: dict[str, list[torch.Tensor]] = {}

    @property
    def used_bytes(self) -> int:
        return self._used

    # ------------------------------------------------------------------ producer
    def insert(self, key: str, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> None:
        """Keep `tensors` under `key` until a consumer takes them; waits while the buffer is full."""
        _check_key(key)
        if not isinstance(tensors, Sequence):
            raise TypeError(f"insert() takes a sequence of tensors for key {key!r}, got {type(tensors).__name__}")
        tensors = list(tensors)
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"insert() got a {type(t).__name__} among the tensors for key {key!r}")
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.capacity_bytes:
            raise ValueError(f"{size} bytes for key {key!r} exceed the buffer's capacity of {self.capacity_bytes}")
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed.is_set() or key in self._items
                                       or self._used + size <= self.capacity_bytes,
                                       self.timeout if timeout is None else timeout):
                raise TimeoutError(f"lookup buffer full ({self._used} of {self.capacity_bytes} bytes held): "
                                   f"no consumer took anything within the timeout, so {key!r} was not inserted")
            self._check_open()
            if key in self._items:
                raise ValueError(f"key {key!r} is already in the buffer")
            self._items[key] = tensors
            self._used += size
        if self._server is None:
            self._server = threading.Thread(target=self._serve, name="p2pkv-lookup", daemon=True)
            self._server.start()

    def _serve(self) -> None:
        off_engine_cpus()
        while not self._closed.is_set():
            try:
                req = self.recv.recv_tensor(timeout=0.5)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - a broken pipe ends serving
                return
            key = _key_of(req)
            with self._cond:
                items = self._items.pop(key, None)
                if items is not None:
                    self._used -= sum(t.numel() * t.element_size() for t in items)
                    self._cond.notify_all()
            self.send.send_tensor(_key_tensor(key))
            self.send.send_tensor(torch.tensor([-1 if items is None else len(items)]))
            for t in items or []:
                self.send.send_tensor(t)

    # ------------------------------------------------------------------ consumer
    def drop_select(self, key: str, timeout: float | None = None) -> list[torch.Tensor] | None:
        """Take (and remove) the tensors stored under `key` on the producer; None if there are none."""
        self._check_open()
        _check_key(key)
        if key in self._late:
            return self._late.pop(key)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self.send.send_tensor(_key_tensor(key))
        while True:
            try:
                got, items = self._next_answer(deadline)
            except TimeoutError as e:
                raise TimeoutError(f"lookup of {key!r}: the producer did not answer within {wait:g} s") from e
            if got == key:
                return items
            if items is not None:
                self._late[got] = items

    def _next_answer(self, deadline: float) -> tuple[str, list[torch.Tensor] | None]:
        """The next answer on the incoming pipe, resuming one that a timed-out lookup left half read."""
        if self._partial is None:
            self._partial = (_key_of(self.recv.recv_tensor(timeout=deadline - time.monotonic())), None, [])
        key, n, items = self._partial
        if n is None:
            count = self.recv.recv_tensor(timeout=deadline - time.monotonic())
            n = int(count.item()) if count is not None else -1
            self._partial = (key, n, items)
        while len(items) < n:
            items.append(self.recv.recv_tensor(timeout=deadline - time.monotonic()))
        self._partial = None
        return key, items if n >= 0 else None

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("lookup buffer is closed")

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.join(timeout=2)
