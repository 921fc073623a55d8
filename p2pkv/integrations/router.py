"""A small OpenAI-compatible router that puts vLLM prefill (P) and decode (D)
instances running P2pKvConnector behind one address.

    python -m p2pkv.integrations.router --prefill http://P:8100 --decode http://D:8200 \\
        [--mode pull|push] [--prefill-kv-address HOST:PORT] [--need-timeout S] [--callback-url URL]
        [--host 127.0.0.1] [--port 8000]

pull ("P then D"): the request goes to P with one output token and
`kv_transfer_params={"do_remote_decode": true}`; P's answer carries the params D
needs, which go to D unchanged with the original request; D's answer (streamed or
not) goes back to the client. push ("D then P"): the router names a transfer id and
sends the request to D first, with P's p2pkv address, that id and the router's
callback URL. D allocates its blocks, sends their ids to P itself, and POSTs to
the callback whether it needs P (not when its own prefix cache holds the prompt).
Only then does the router send the request to P, with the id and one output token;
P writes the prompt's KV straight into D's blocks. If D's answer does not come
within --need-timeout seconds, P gets the request anyway (0: send to P at once,
without asking). If P fails in pull mode, D gets the plain request and computes the
prompt itself. Several --prefill / --decode URLs are used in turn (with push,
--prefill-kv-address pairs with --prefill by position). A client's own
`kv_transfer_params` are dropped: only the router tells P and D where to send KV
and whom to call back, so a client cannot point D at another host or URL.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import uuid
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["make_app", "main"]

log = logging.getLogger("p2pkv.router")
ROUTES = ("/v1/completions", "/v1/chat/completions")
NEED_PATH = "/p2pkv/need"


def prefill_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The request P sees: one output token, no streaming, P's transfer params."""
    out = dict(body, max_tokens=1, stream=False, kv_transfer_params=params)
    out.pop("stream_options", None)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


class Router:
    """Round-robin over P and D instances; one method per flow."""

    def __init__(self, prefill: list[str], decode: list[str], mode: str = "pull",
                 prefill_kv: list[str] | None = None, timeout: float = 600.0, need_timeout: float = 2.0,
                 callback_url: str | None = None):
        """`need_timeout`: push, seconds to wait for D to say whether it needs P (0: send
        to P at once, without asking). `callback_url`: where D reaches this router's
        NEED_PATH (default: the address the client used, plus NEED_PATH)."""
        if mode not in ("pull", "push"):
            raise ValueError(f"mode must be 'pull' or 'push', got {mode!r}")
        if not prefill or not decode:
            raise ValueError("give at least one --prefill and one --decode URL")
        if mode == "push" and (not prefill_kv or len(prefill_kv) != len(prefill)):
            raise ValueError("push mode needs one --prefill-kv-address (P's p2pkv 'listen'/'advertise' address) "
                             "per --prefill URL")
        self.mode = mode
        self._p = itertools.cycle(list(zip(prefill, prefill_kv or [None] * len(prefill))))
        self._d = itertools.cycle(decode)
        self.decode = decode
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None
        self.need_timeout = need_timeout
        self.callback_url = callback_url
        self._need: dict[str, asyncio.Future[bool]] = {}
        self.stats: Counter[str] = Counter()

    async def start(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout)

    async def stop(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def _prefill(self, url: str, path: str, body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        async with self.session.post(url + path, json=prefill_body(body, params)) as r:
            if r.status != 200:
                raise web.HTTPBadGateway(text=f"prefill instance {url} answered {r.status}: {await r.text()}")
            return await r.json()

    async def _relay(self, request: web.Request, url: str, body: dict[str, Any]) -> web.StreamResponse:
        """Send `body` to D and stream its answer back byte for byte."""
        assert self.session is not None
        async with self.session.post(url + request.path, json=body) as r:
            resp = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get("Content-Type",
                                                                                               "application/json")})
            await resp.prepare(request)
            async for chunk in r.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="request body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="request body must be a JSON object")
        if body.pop("kv_transfer_params", None) is not None:
            self.stats["client_params_dropped"] += 1
            log.debug("dropped the client's kv_transfer_params: only the router sets them")
        p_url, p_kv = next(self._p)
        d_url = next(self._d)
        if self.mode == "pull":
            try:
                out = await self._prefill(p_url, request.path, body, {"do_remote_decode": True})
                params = out.get("kv_transfer_params")
                if not params:
                    raise web.HTTPBadGateway(text=f"prefill instance {p_url} returned no kv_transfer_params; is "
                                                  "it started with P2pKvConnector as kv_producer or kv_both?")
            except (aiohttp.ClientError, asyncio.TimeoutError, web.HTTPBadGateway) as e:
                log.warning("prefill on %s failed (%s); %s computes the prompt itself", p_url,
                            getattr(e, "text", None) or e, d_url)
                return await self._relay(request, d_url, body)
            return await self._relay(request, d_url, dict(body, kv_transfer_params=params))
        return await self._push(request, body, p_url, p_kv, d_url)

    async def _push(self, request: web.Request, body: dict[str, Any], p_url: str, p_kv: str | None,
                    d_url: str) -> web.StreamResponse:
        """D first; P only once D says it needs P (or does not say within need_timeout)."""
        tid = f"p2pkv-{uuid.uuid4().hex}"
        d_params = {"do_remote_prefill": True, "transfer_mode": "push", "remote_address": p_kv, "transfer_id": tid}
        need: asyncio.Future[bool] | None = None
        if self.need_timeout > 0:
            need = self._need[tid] = asyncio.get_running_loop().create_future()
            d_params["router_callback"] = self.callback_url or str(request.url.origin()) + NEED_PATH
        p_task = asyncio.ensure_future(self._prefill_if_needed(tid, need, p_url, request.path, body))
        try:
            return await self._relay(request, d_url, dict(body, kv_transfer_params=d_params))
        finally:
            self._need.pop(tid, None)
            if need is not None and not need.done():
                need.set_result(False)  # D has answered (or failed) without asking for P
            try:
                await p_task
            except Exception as e:  # noqa: BLE001 - D already answered or failed on its own
                log.warning("prefill of %s on %s failed: %s", tid, p_url, e)

    async def _prefill_if_needed(self, tid: str, need: asyncio.Future[bool] | None, p_url: str, path: str,
                                 body: dict[str, Any]) -> None:
        if need is not None:
            try:
                needed = await asyncio.wait_for(asyncio.shield(need), self.need_timeout)
            except asyncio.TimeoutError:
                log.info("decode instance did not say within %.3g s whether %s needs P; sending it to P",
                         self.need_timeout, tid)
                self.stats["need_timeouts"] += 1
                needed = True
            if not needed:
                self.stats["prefill_skipped"] += 1
                return
        self.stats["prefill_sent"] += 1
        await self._prefill(p_url, path, body, {"do_remote_decode": True, "transfer_id": tid})

    async def need(self, request: web.Request) -> web.Response:
        """D's callback: {"transfer_id": id, "need_prefill": bool}. Unknown ids are ignored
        (the request is over, or the id was never this router's)."""
        try:
            m = await request.json()
            tid, needed = str(m["transfer_id"]), bool(m["need_prefill"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"transfer_id": str, "need_prefill": bool}') from None
        fut = self._need.get(tid)
        if fut is None or fut.done():
            return web.json_response({"known": False})
        fut.set_result(needed)
        return web.json_response({"known": True})

    async def models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        async with self.session.get(self.decode[0] + "/v1/models") as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "mode": self.mode, **self.stats})


def make_app(router: Router) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    for path in ROUTES:
        app.router.add_post(path, router.handle)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    app.router.add_post(NEED_PATH, router.need)
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m p2pkv.integrations.router", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", action="append", required=True, help="P's OpenAI base URL (repeatable)")
    ap.add_argument("--decode", action="append", required=True, help="D's OpenAI base URL (repeatable)")
    ap.add_argument("--mode", choices=["pull", "push"], default="pull")
    ap.add_argument("--prefill-kv-address", action="append", default=None,
                    help="push: P's p2pkv address (its 'listen'/'advertise' setting), one per --prefill")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream request")
    ap.add_argument("--need-timeout", type=float, default=2.0,
                    help="push: seconds to wait for D to say whether it needs P before sending to P anyway "
                         "(0: send to P at once, without asking D)")
    ap.add_argument("--callback-url", default=None,
                    help=f"push: the URL at which D reaches this router's {NEED_PATH} (default: the address "
                         f"the client used + {NEED_PATH})")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    router = Router([u.rstrip("/") for u in a.prefill], [u.rstrip("/") for u in a.decode], a.mode,
                    a.prefill_kv_address, a.timeout, a.need_timeout, a.callback_url)
    web.run_app(make_app(router), host=a.host, port=a.port)


if __name__ == "__main__":
    main()
