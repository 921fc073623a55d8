"""Push mode, D's scheduler: tells the router whether a transfer needs P, by a small JSON
POST to the request's `router_callback` URL, off vLLM's scheduler thread."""
from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from typing import Any

from p2pkv.transport.base import off_engine_cpus

__all__ = ["NeedNotifier"]

log = logging.getLogger("p2pkv.vllm")


class NeedNotifier:
    """Posts go from one daemon thread with a short timeout, so vLLM's scheduler never waits
    on the router; a router that cannot be reached only costs it its wait (it then sends to P)."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout
        self._q: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._warned = False

    def post(self, url: Any, transfer_id: str, need: bool, tokens: int) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="p2pkv-router-callback", daemon=True)
            self._thread.start()
        self._q.put((url, {"transfer_id": transfer_id, "need_prefill": need, "tokens": tokens}))

    def _run(self) -> None:
        off_engine_cpus()
        while (item := self._q.get()) is not None:
            url, body = item
            req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read()
            except (OSError, ValueError) as e:
                if not self._warned:
                    log.warning("could not tell the router at %s whether transfer %s needs P (%s); it will "
                                "send the request to P after its own wait", url, body["transfer_id"], e)
                    self._warned = True

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None
