"""A small OpenAI-compatible router that puts vLLM prefill (P) and decode (D)
instances running P2pKvConnector behind one address.

    python -m p2pkv.integrations.router --prefill http://P:8100 --decode http://D:8200 \\
        [--mode pull|push] [--prefill-kv-address HOST:PORT] [--need-timeout S] [--callback-url URL]
        [--probe-interval S] [--host 127.0.0.1] [--port 8000]

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
without asking). Several --prefill / --decode URLs are used in turn (with push,
--prefill-kv-address pairs with --prefill by position). A client's own
`kv_transfer_params` are dropped: only the router tells P and D where to send KV
and whom to call back, so a client cannot point D at another host or URL.

Instances are probed (GET /health) every --probe-interval seconds; one that does not
answer, or that refused a connection, is skipped until a probe finds it back. When no
P is up, or P fails, D computes the prompt itself: a fallback, counted on /metrics
and named in the answer's `X-P2pKV-Fallback` header. GET /health answers 200 when
every instance is up and 503 naming those that are not; GET /metrics is Prometheus.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from p2pkv.integrations.params import MODES, TransferParams

__all__ = ["Router", "Upstream", "RouterMetrics", "make_app", "main", "FALLBACK_HEADER"]

log = logging.getLogger("p2pkv.router")
ROUTES = ("/v1/completions", "/v1/chat/completions")
NEED_PATH = "/p2pkv/need"
FALLBACK_HEADER = "X-P2pKV-Fallback"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# errors that say nobody is listening (or the process went away), as opposed to a slow or failing answer
DOWN_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def prefill_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The request P sees: one output token, no streaming, P's transfer params."""
    out = dict(body, max_tokens=1, stream=False, kv_transfer_params=params)
    out.pop("stream_options", None)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


class Upstream:
    """One P or D instance: its URL (and, for P in push mode, its p2pkv address) and
    whether it is up; `error` says why not."""

    def __init__(self, role: str, url: str, kv_address: str | None = None):
        self.role, self.url, self.kv_address = role, url, kv_address
        self.up, self.error = True, None  # type: bool, str | None

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "url": self.url, "up": self.up, **({"error": self.error} if self.error else {})}


class Pool:
    """The instances of one role, used in turn, skipping those that are down."""

    def __init__(self, upstreams: list[Upstream]):
        self.upstreams, self._next = upstreams, 0

    def candidates(self) -> list[Upstream]:
        """The instances that are up, starting with the next one's turn."""
        n = len(self.upstreams)
        start, self._next = self._next, (self._next + 1) % n
        return [u for u in (self.upstreams[(start + i) % n] for i in range(n)) if u.up]


class RouterMetrics:
    """The router's Prometheus series, in a registry of its own (one owner of every count)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("p2pkv_router_requests", "Client requests by flow: pull, push, or decode_only "
                                "(D computed the prompt itself).", ["flow"], registry=r)
        self.fallbacks = Counter("p2pkv_router_prefill_fallbacks", "Requests that D computed itself because no P "
                                 "was up (prefill_down) or P failed (unreachable, timeout, error, no_params).",
                                 ["reason"], registry=r)
        self.push_prefill = Counter("p2pkv_router_push_prefill", "Push mode: requests sent to P after D asked "
                                    "(sent), after D's silence (need_timeout), or not sent (skipped).",
                                    ["outcome"], registry=r)
        self.dropped = Counter("p2pkv_router_client_params_dropped", "Client requests whose own "
                               "kv_transfer_params the router dropped.", registry=r)
        self.unavailable = Counter("p2pkv_router_unavailable", "Requests answered 503: no D instance was up.",
                                   registry=r)
        self.up = Gauge("p2pkv_router_instance_up", "1 if the instance answered its last probe or request.",
                        ["role", "url"], registry=r)
        self.latency = Histogram("p2pkv_router_upstream_seconds", "Time of each request to an instance (P: the "
                                 "prefill; D: until its answer ended).", ["role", "url"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("p2pkv_router_upstream_errors", "Requests to an instance that failed.",
                              ["role", "url"], registry=r)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def summary(self) -> dict[str, int]:
        """The counts /health repeats (the names it has always used)."""
        v = self.value
        fallbacks = sum(s.value for m in self.fallbacks.collect() for s in m.samples if s.name.endswith("_total"))
        return {"prefill_sent": int(v("p2pkv_router_push_prefill_total", outcome="sent")
                                    + v("p2pkv_router_push_prefill_total", outcome="need_timeout")),
                "prefill_skipped": int(v("p2pkv_router_push_prefill_total", outcome="skipped")),
                "need_timeouts": int(v("p2pkv_router_push_prefill_total", outcome="need_timeout")),
                "client_params_dropped": int(v("p2pkv_router_client_params_dropped_total")),
                "prefill_fallbacks": int(fallbacks)}


class Router:
    """Round-robin over the P and D instances that are up; one method per flow."""

    def __init__(self, prefill: list[str], decode: list[str], mode: str = "pull",
                 prefill_kv: list[str] | None = None, timeout: float = 600.0, need_timeout: float = 2.0,
                 callback_url: str | None = None, probe_interval: float = 5.0, probe_timeout: float = 2.0):
        """`need_timeout`: push, seconds to wait for D to say whether it needs P (0: send
        to P at once, without asking). `callback_url`: where D reaches this router's
        NEED_PATH (default: the address the client used, plus NEED_PATH). `probe_interval`:
        seconds between health probes of every instance (0: probe only on GET /health)."""
        if mode not in MODES:
            raise ValueError(f"mode must be 'pull' or 'push', got {mode!r}")
        if not prefill or not decode:
            raise ValueError("give at least one --prefill and one --decode URL")
        if mode == "push" and (not prefill_kv or len(prefill_kv) != len(prefill)):
            raise ValueError("push mode needs one --prefill-kv-address (P's p2pkv 'listen'/'advertise' address) "
                             "per --prefill URL")
        self.mode = mode
        self.prefill = Pool([Upstream("prefill", u, kv) for u, kv in zip(prefill, prefill_kv or [None] * len(prefill))])
        self.decode = Pool([Upstream("decode", u) for u in decode])
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.probe_interval, self.probe_timeout = probe_interval, probe_timeout
        self.need_timeout = need_timeout
        self.callback_url = callback_url
        self.metrics = RouterMetrics()
        self.session: aiohttp.ClientSession | None = None
        self._need: dict[str, asyncio.Future[bool]] = {}
        self._prober: asyncio.Task[None] | None = None
        for u in self.upstreams:
            self.metrics.up.labels(u.role, u.url).set(1)

    @property
    def upstreams(self) -> list[Upstream]:
        return self.prefill.upstreams + self.decode.upstreams

    async def start(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        if self.probe_interval > 0:
            self._prober = asyncio.ensure_future(self._probe_loop())

    async def stop(self, _app: web.Application) -> None:
        if self._prober is not None:
            self._prober.cancel()
            try:
                await self._prober
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            await self.session.close()

    # ---------------------------------------------------------------- health
    def _mark(self, u: Upstream, up: bool, error: str | None = None) -> None:
        if up != u.up:
            if up:
                log.info("%s instance %s is back", u.role, u.url)
            else:
                log.warning("%s instance %s is down (%s); skipping it until a probe finds it back", u.role, u.url,
                            error)
        u.up, u.error = up, None if up else error
        self.metrics.up.labels(u.role, u.url).set(1 if up else 0)

    async def _probe(self, u: Upstream) -> None:
        assert self.session is not None
        try:
            async with self.session.get(u.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.probe_timeout)) as r:
                await r.read()
                self._mark(u, r.status == 200, f"/health answered {r.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._mark(u, False, f"unreachable: {type(e).__name__}: {e}" if str(e) else
                       f"unreachable: {type(e).__name__}")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(u) for u in self.upstreams))

    async def _probe_loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.probe_interval)

    async def health(self, request: web.Request) -> web.Response:
        """200 when every instance answers its probe, else 503 naming those that do not."""
        await self.probe_all()
        down = [u.describe() for u in self.upstreams if not u.up]
        body = {"status": "degraded" if down else "ok", "mode": self.mode, "down": down,
                "instances": [u.describe() for u in self.upstreams], **self.metrics.summary()}
        return web.json_response(body, status=503 if down else 200)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---------------------------------------------------------------- upstream calls
    async def _prefill(self, p: Upstream, path: str, body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """P's answer to the prefill request; marks P down if nobody answers there."""
        assert self.session is not None
        t0 = time.monotonic()
        try:
            async with self.session.post(p.url + path, json=prefill_body(body, params)) as r:
                if r.status != 200:
                    raise web.HTTPBadGateway(text=f"prefill instance {p.url} answered {r.status}: {await r.text()}")
                out = await r.json()
        except DOWN_ERRORS as e:
            self._mark(p, False, f"unreachable: {e}")
            self.metrics.errors.labels(p.role, p.url).inc()
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, web.HTTPBadGateway):
            self.metrics.errors.labels(p.role, p.url).inc()
            raise
        self.metrics.latency.labels(p.role, p.url).observe(time.monotonic() - t0)
        return out

    async def _relay(self, request: web.Request, candidates: list[Upstream], body: dict[str, Any],
                     fallback: str | None = None) -> web.StreamResponse:
        """Send `body` to the first D that answers and stream its answer back byte for byte."""
        assert self.session is not None
        tried = []
        for d in candidates:
            t0 = time.monotonic()
            resp: web.StreamResponse | None = None
            try:
                async with self.session.post(d.url + request.path, json=body) as r:
                    headers = {"Content-Type": r.headers.get("Content-Type", "application/json")}
                    if fallback:
                        headers[FALLBACK_HEADER] = fallback
                    resp = web.StreamResponse(status=r.status, headers=headers)
                    await resp.prepare(request)
                    async for chunk in r.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
            except DOWN_ERRORS as e:
                if resp is not None and resp.prepared:
                    raise  # the answer had begun: the client sees it cut
                self._mark(d, False, f"unreachable: {e}")
                self.metrics.errors.labels(d.role, d.url).inc()
                tried.append(f"{d.url} ({e})")
                continue
            self.metrics.latency.labels(d.role, d.url).observe(time.monotonic() - t0)
            return resp
        self.metrics.unavailable.inc()
        raise web.HTTPServiceUnavailable(text=f"no decode instance answered: {'; '.join(tried)}")

    def _no_decode(self) -> web.HTTPServiceUnavailable:
        self.metrics.unavailable.inc()
        down = ", ".join(f"{u.url} ({u.error})" for u in self.decode.upstreams)
        return web.HTTPServiceUnavailable(text=f"no decode instance is up: {down}")

    async def _decode_only(self, request: web.Request, body: dict[str, Any], d: list[Upstream], reason: str,
                           detail: str) -> web.StreamResponse:
        """P could not prefill: D computes the prompt itself; counted, and said in a header."""
        self.metrics.fallbacks.labels(reason).inc()
        self.metrics.requests.labels("decode_only").inc()
        log.warning("no prefill for this request (%s: %s); D computes the prompt itself", reason, detail)
        return await self._relay(request, d, body, fallback=f"{reason}: {detail}"[:200])

    # ---------------------------------------------------------------- flows
    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="request body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="request body must be a JSON object")
        if body.pop("kv_transfer_params", None) is not None:
            self.metrics.dropped.inc()
            log.debug("dropped the client's kv_transfer_params: only the router sets them")
        d = self.decode.candidates()
        if not d:
            raise self._no_decode()
        p = self.prefill.candidates()
        if not p:
            down = ", ".join(f"{u.url} ({u.error})" for u in self.prefill.upstreams)
            return await self._decode_only(request, body, d, "prefill_down", f"no prefill instance is up: {down}")
        if self.mode == "pull":
            return await self._pull(request, body, p, d)
        return await self._push(request, body, p[0], d)

    async def _pull(self, request: web.Request, body: dict[str, Any], p: list[Upstream],
                    d: list[Upstream]) -> web.StreamResponse:
        """P first (the next P that answers), then D with P's params as they came."""
        reason, detail = "error", ""
        for prefill in p:
            try:
                out = await self._prefill(prefill, request.path, body, TransferParams.for_prefill().to_dict())
            except DOWN_ERRORS as e:
                reason, detail = "unreachable", f"{prefill.url}: {e}"
                continue
            except asyncio.TimeoutError:
                reason, detail = "timeout", f"{prefill.url} did not answer within {self.timeout.total:g} s"
                break
            except (aiohttp.ClientError, web.HTTPBadGateway) as e:
                reason, detail = "error", getattr(e, "text", None) or str(e)
                break
            params = out.get("kv_transfer_params")
            if not params:
                reason, detail = "no_params", (f"{prefill.url} returned no kv_transfer_params; is it started "
                                               "with P2pKvConnector as kv_producer or kv_both?")
                break
            self.metrics.requests.labels("pull").inc()
            return await self._relay(request, d, dict(body, kv_transfer_params=params))
        return await self._decode_only(request, body, d, reason, detail)

    async def _push(self, request: web.Request, body: dict[str, Any], p: Upstream,
                    d: list[Upstream]) -> web.StreamResponse:
        """D first; P only once D says it needs P (or does not say within need_timeout)."""
        assert p.kv_address is not None
        tid = f"p2pkv-{uuid.uuid4().hex}"
        need: asyncio.Future[bool] | None = None
        callback = None
        if self.need_timeout > 0:
            need = self._need[tid] = asyncio.get_running_loop().create_future()
            callback = self.callback_url or str(request.url.origin()) + NEED_PATH
        d_params = TransferParams.push_to(p.kv_address, tid, callback).to_dict()
        self.metrics.requests.labels("push").inc()
        p_task = asyncio.ensure_future(self._prefill_if_needed(tid, need, p, request.path, body))
        try:
            return await self._relay(request, d, dict(body, kv_transfer_params=d_params))
        finally:
            self._need.pop(tid, None)
            if need is not None and not need.done():
                need.set_result(False)  # D has answered (or failed) without asking for P
            try:
                await p_task
            except Exception as e:  # noqa: BLE001 - D already answered or failed on its own
                self.metrics.fallbacks.labels("unreachable" if isinstance(e, DOWN_ERRORS) else "error").inc()
                log.warning("prefill of %s on %s failed (D recomputed after its load timeout): %s", tid, p.url, e)

    async def _prefill_if_needed(self, tid: str, need: asyncio.Future[bool] | None, p: Upstream, path: str,
                                 body: dict[str, Any]) -> None:
        outcome = "sent"
        if need is not None:
            try:
                needed = await asyncio.wait_for(asyncio.shield(need), self.need_timeout)
            except asyncio.TimeoutError:
                log.info("decode instance did not say within %.3g s whether %s needs P; sending it to P",
                         self.need_timeout, tid)
                outcome, needed = "need_timeout", True
            if not needed:
                self.metrics.push_prefill.labels("skipped").inc()
                return
        self.metrics.push_prefill.labels(outcome).inc()
        await self._prefill(p, path, body, TransferParams.for_prefill(tid).to_dict())

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
        d = self.decode.candidates()
        if not d:
            raise self._no_decode()
        async with self.session.get(d[0].url + "/v1/models") as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")


def make_app(router: Router) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    for path in ROUTES:
        app.router.add_post(path, router.handle)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    app.router.add_get("/metrics", router.prometheus)
    app.router.add_post(NEED_PATH, router.need)
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m p2pkv.integrations.router", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", action="append", required=True, help="P's OpenAI base URL (repeatable)")
    ap.add_argument("--decode", action="append", required=True, help="D's OpenAI base URL (repeatable)")
    ap.add_argument("--mode", choices=list(MODES), default="pull")
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
    ap.add_argument("--probe-interval", type=float, default=5.0,
                    help="seconds between GET /health probes of every instance (0: only when /health is asked)")
    ap.add_argument("--probe-timeout", type=float, default=2.0, help="seconds a probe waits for an answer")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    router = Router([u.rstrip("/") for u in a.prefill], [u.rstrip("/") for u in a.decode], a.mode,
                    a.prefill_kv_address, a.timeout, a.need_timeout, a.callback_url, a.probe_interval,
                    a.probe_timeout)
    web.run_app(make_app(router), host=a.host, port=a.port)


if __name__ == "__main__":
    main()
