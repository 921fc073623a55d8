"""The ucx backend's `baseline()` for `p2pkv bench`: the same bytes as one contiguous ucxx tag
message, driven by the caller's thread as a plain ucxx user's would be, so that p2pkv's
ratio to it stays comparable. Never a transfer's path."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from p2pkv.transport.base import Peer, PeerClosedError, TransferError, TransferTimeout
from p2pkv.transport.conn import Conn
from p2pkv.transport.posting import check_baseline_args
from p2pkv.transport.ucx.link import KIND_BASE, Link, link_of
from p2pkv.transport.ucx.ucp import MEM_CUDA, Ucp
from p2pkv.wire import FrameType, send_frame

__all__ = ["UcxBaseline"]


class UcxBaseline:
    """Mixin for UcxTransport: the baseline of one-sided connections in the caller's thread, and the
    control plane's baseline hooks for staged ones (run on their op threads)."""

    device: torch.device
    timeout: float
    _api: Any
    _ucp: Ucp
    _wh: Any
    _mem: int
    _baseline_bufs: dict[int, Any]
    _bind_cuda: Callable[[], None]
    _conn: Callable[[Peer | str], Conn]
    _drop: Callable[[Conn, BaseException], None]
    _expect_ack: Callable[[Conn], Any]
    _as_transfer_error: Callable[[BaseException, Conn, Any], TransferError]

    def baseline(self, peer: Peer | str, nbytes: int, iters: int = 1) -> float:
        conn = self._conn(peer)
        if conn.thread is not None:  # a staged connection: its op thread runs it
            return super().baseline(peer, nbytes, iters)
        check_baseline_args(nbytes, iters)
        times: list[float] = []
        with conn.lock:
            for _ in range(iters):
                if conn.dead is not None:
                    raise PeerClosedError(f"connection is down ({conn.dead})", peer=conn.peer.name,
                                          request_id="baseline")
                try:
                    t0 = time.perf_counter()
                    send_frame(conn.sock, FrameType.BASELINE, {"nbytes": int(nbytes)})
                    self._expect_ack(conn)
                    self._baseline_recv(conn, int(nbytes))
                    times.append(time.perf_counter() - t0)
                except BaseException as e:  # noqa: BLE001 - reported as a TransferError, the connection dropped
                    err = self._as_transfer_error(e, conn, "baseline")
                    self._drop(conn, err)
                    raise err from None
        return min(times)

    def _baseline_buf(self, nbytes: int) -> Any:
        buf = self._baseline_bufs.get(nbytes)
        if buf is None:
            self._baseline_bufs.clear()
            if self._mem == MEM_CUDA:
                buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
            else:
                buf = np.ones(nbytes, dtype=np.uint8)
            self._baseline_bufs[nbytes] = buf
        return buf

    def _baseline_send(self, conn: Conn, nbytes: int) -> None:
        link = link_of(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_send(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag_out(KIND_BASE, link.base_seq)))
        self._wait_ucxx(conn, link, req)

    def _baseline_recv(self, conn: Conn, nbytes: int) -> None:
        link = link_of(conn, "baseline")
        link.base_seq += 1
        req = link.ep.tag_recv(self._array(self._baseline_buf(nbytes)),
                               self._api.UCXXTag(link.tag_in(KIND_BASE, link.base_seq)))
        self._wait_ucxx(conn, link, req)

    def _array(self, buf: Any) -> Any:
        from ucxx._lib.arr import Array
        return Array(buf)

    def _wait_ucxx(self, conn: Conn, link: Link, req: Any) -> None:
        """The bench's raw baseline (never a transfer's path): this thread drives progress, as a plain ucxx
        user's would, exactly as before the one-sided data path, so ratios stay comparable."""
        self._bind_cuda()
        deadline = time.monotonic() + self.timeout * 4
        while not req.completed:
            if self._ucp.progress(self._wh) == 0:
                time.sleep(0)
            if time.monotonic() > deadline or link.closed or conn.dead is not None:
                raise TransferTimeout("baseline send did not complete", peer=conn.peer.name, request_id="baseline")
        req.check_error()
