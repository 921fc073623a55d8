"""The P/D router against stub OpenAI servers: what P and D receive in pull and
push mode, that D's streamed answer reaches the client unchanged, that in push
mode P is contacted only when D says it needs P (or does not say in time), and,
with stand-in instances in their own processes, that /health and /metrics report
an instance killed and brought back, which the router skips meanwhile."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from p2pkv.integrations.router import Router, make_app  # noqa: E402

async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="")


P_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_address": "10.0.0.1:7000",
            "remote_request_id": "cmpl-1", "remote_block_ids": [3, 4], "remote_num_tokens": 40}


def stub(name: str, seen: list, params: dict | None = None, status: int = 200) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((name, body))
        if status != 200:
            return web.json_response({"error": "boom"}, status=status)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for tok in ["a", "b", "c"]:
                await resp.write(f"data: {json.dumps({'choices': [{'text': tok}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"choices": [{"text": f"{name}-answer"}], "kv_transfer_params": params})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", healthy)
    return app


async def run_flow(mode: str, stream: bool, p_status: int = 200, need_timeout: float = 0.0,
                   extra: dict | None = None):
    seen: list = []
    p = TestServer(stub("P", seen, P_PARAMS, p_status))
    d = TestServer(stub("D", seen))
    await p.start_server()
    await d.start_server()
    router = Router([str(p.make_url("")).rstrip("/")], [str(d.make_url("")).rstrip("/")], mode,
                    prefill_kv=["127.0.0.1:7777"] if mode == "push" else None, need_timeout=need_timeout)
    client = TestClient(TestServer(make_app(router)))
    await client.start_server()
    try:
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 9,
                                                       "stream": stream, **(extra or {})})
        assert r.status == 200
        text = await r.text()
        health = await (await client.get("/health")).json()
    finally:
        await client.close()
        await p.close()
        await d.close()
    return seen, text, health


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", [False, True])
def test_pull_sends_p_first_then_d_with_ps_params(stream):
    seen, text, _ = asyncio.run(run_flow("pull", stream))
    assert [n for n, _ in seen] == ["P", "D"]
    p_body, d_body = seen[0][1], seen[1][1]
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False
    assert p_body["kv_transfer_params"] == {"do_remote_decode": True}
    assert d_body["kv_transfer_params"] == P_PARAMS and d_body["max_tokens"] == 9 and d_body["stream"] is stream
    if stream:
        assert text.count("data:") == 4 and text.endswith("data: [DONE]\n\n")
    else:
        assert json.loads(text)["choices"][0]["text"] == "D-answer"


@pytest.mark.timeout(30)
def test_push_sends_both_with_one_transfer_id_and_ps_kv_address():
    seen, text, _ = asyncio.run(run_flow("push", True))
    bodies = dict(seen)
    assert set(bodies) == {"P", "D"}
    d_params, p_params = bodies["D"]["kv_transfer_params"], bodies["P"]["kv_transfer_params"]
    assert d_params["do_remote_prefill"] and d_params["transfer_mode"] == "push"
    assert d_params["remote_address"] == "127.0.0.1:7777"
    assert p_params == {"do_remote_decode": True, "transfer_id": d_params["transfer_id"]}
    assert bodies["P"]["max_tokens"] == 1 and text.endswith("data: [DONE]\n\n")
    assert "router_callback" not in d_params  # need_timeout=0: P at once, D is not asked


def push_d(answer: str | None, seen: list, p_arrived: asyncio.Event) -> web.Application:
    """A push-mode D: POSTs `answer` ('yes'/'no') to the router's callback, or stays
    silent; then, like a real D, waits for P's prefill unless it needs nothing from P."""
    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(("D", body))
        kv = body["kv_transfer_params"]
        if answer is not None:
            async with aiohttp.ClientSession() as s:
                async with s.post(kv["router_callback"], json={"transfer_id": kv["transfer_id"],
                                                               "need_prefill": answer == "yes"}) as r:
                    assert (await r.json())["known"] is True
        if answer != "no":
            await asyncio.wait_for(p_arrived.wait(), 10)
        return web.json_response({"choices": [{"text": "D-answer"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", healthy)
    return app


async def run_push(answer: str | None, need_timeout: float = 5.0):
    seen: list = []
    p_arrived = asyncio.Event()

    async def on_p(request: web.Request) -> web.Response:
        seen.append(("P", await request.json()))
        p_arrived.set()
        return web.json_response({"choices": [{"text": "P"}], "kv_transfer_params": P_PARAMS})

    p_app = web.Application()
    p_app.router.add_post("/v1/completions", on_p)
    p_app.router.add_get("/health", healthy)
    p, d = TestServer(p_app), TestServer(push_d(answer, seen, p_arrived))
    await p.start_server()
    await d.start_server()
    router = Router([str(p.make_url("")).rstrip("/")], [str(d.make_url("")).rstrip("/")], "push",
                    prefill_kv=["127.0.0.1:7777"], need_timeout=need_timeout)
    client = TestClient(TestServer(make_app(router)))
    await client.start_server()
    try:
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 9})
        assert r.status == 200 and (await r.json())["choices"][0]["text"] == "D-answer"
        health = await (await client.get("/health")).json()
    finally:
        await client.close()
        await p.close()
        await d.close()
    return seen, health


@pytest.mark.timeout(30)
def test_push_skips_p_when_d_says_it_holds_the_prompt():
    seen, health = asyncio.run(run_push("no"))
    assert [n for n, _ in seen] == ["D"]
    kv = seen[0][1]["kv_transfer_params"]
    assert kv["router_callback"].endswith("/p2pkv/need") and kv["transfer_mode"] == "push"
    assert health["prefill_skipped"] == 1 and not health.get("prefill_sent")


@pytest.mark.timeout(30)
def test_push_sends_to_p_after_d_says_it_needs_p():
    seen, health = asyncio.run(run_push("yes"))
    assert [n for n, _ in seen] == ["D", "P"]
    assert seen[1][1]["kv_transfer_params"] == {"do_remote_decode": True,
                                                "transfer_id": seen[0][1]["kv_transfer_params"]["transfer_id"]}
    assert health["prefill_sent"] == 1 and not health.get("need_timeouts")


@pytest.mark.timeout(30)
def test_push_sends_to_p_when_d_stays_silent_past_the_need_timeout():
    seen, health = asyncio.run(run_push(None, need_timeout=0.3))
    assert [n for n, _ in seen] == ["D", "P"]
    assert health["need_timeouts"] == 1 and health["prefill_sent"] == 1


@pytest.mark.timeout(30)
def test_push_need_callback_ignores_unknown_ids_and_refuses_bad_bodies():
    async def go():
        client = TestClient(TestServer(make_app(Router(["http://p"], ["http://d"], "push",
                                                       prefill_kv=["127.0.0.1:1"], probe_interval=0))))
        await client.start_server()
        try:
            r = await client.post("/p2pkv/need", json={"transfer_id": "nope", "need_prefill": False})
            assert r.status == 200 and (await r.json())["known"] is False
            assert (await client.post("/p2pkv/need", json={"need_prefill": True})).status == 400
        finally:
            await client.close()
    asyncio.run(go())


def test_push_without_p_kv_address_is_refused():
    with pytest.raises(ValueError, match="prefill-kv-address"):
        Router(["http://p"], ["http://d"], "push")


@pytest.mark.timeout(30)
def test_pull_falls_back_to_d_alone_when_p_fails():
    seen, text, health = asyncio.run(run_flow("pull", False, p_status=500))
    assert [n for n, _ in seen] == ["P", "D"] and health["prefill_fallbacks"] == 1
    assert "kv_transfer_params" not in seen[1][1] and seen[1][1]["max_tokens"] == 9
    assert json.loads(text)["choices"][0]["text"] == "D-answer"


CLIENT_PARAMS = {"kv_transfer_params": {"do_remote_prefill": True, "remote_address": "203.0.113.9:7000",
                                        "router_callback": "http://169.254.169.254/latest", "transfer_id": "t"}}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode,p_status", [("pull", 200), ("pull", 500), ("push", 200)])
def test_client_kv_transfer_params_never_reach_p_or_d(mode, p_status):
    seen, _, health = asyncio.run(run_flow(mode, False, p_status=p_status, extra=CLIENT_PARAMS))
    assert {n for n, _ in seen} == {"P", "D"}
    for _, body in seen:
        sent = json.dumps(body)
        assert "203.0.113.9" not in sent and "169.254.169.254" not in sent
    assert health["client_params_dropped"] == 1


@pytest.mark.timeout(30)
def test_non_object_body_is_refused_with_400():
    async def go():
        client = TestClient(TestServer(make_app(Router(["http://p"], ["http://d"], probe_interval=0))))
        await client.start_server()
        try:
            r = await client.post("/v1/completions", json=["not", "an", "object"])
            assert r.status == 400 and "JSON object" in await r.text()
        finally:
            await client.close()
    asyncio.run(go())


# ---------------------------------------------------------------- instances in their own processes
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """A stand-in vLLM instance (tests/router_stub.py) that can be killed and started again."""

    def __init__(self, role: str):
        self.role, self.port = role, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Instance":
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "router_stub.py"), self.role,
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < end, f"{self.role} stand-in did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text, None if absent."""
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class Client:
    """The router on a real loopback port, and an HTTP client of it."""

    def __init__(self, router: Router):
        self.router = router

    async def __aenter__(self) -> "Client":
        self.runner = web.AppRunner(make_app(self.router))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.runner.cleanup()

    async def complete(self) -> tuple[int, dict, dict]:
        async with self.session.post(self.base + "/v1/completions",
                                     json={"model": "m", "prompt": "hi", "max_tokens": 5}) as r:
            return r.status, (await r.json() if r.status == 200 else {"text": await r.text()}), dict(r.headers)

    async def health(self) -> tuple[int, dict]:
        async with self.session.get(self.base + "/health") as r:
            return r.status, await r.json()

    async def metrics(self) -> str:
        async with self.session.get(self.base + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            return await r.text()

    async def until_health(self, status: int, timeout: float = 15) -> dict:
        end = time.monotonic() + timeout
        while True:
            got, body = await self.health()
            if got == status:
                return body
            assert time.monotonic() < end, f"/health stayed {got}: {body}"
            await asyncio.sleep(0.1)


@pytest.mark.timeout(90)
def test_health_and_metrics_follow_an_instance_killed_and_brought_back():
    """P and two D stand-ins in their own processes. P killed: /health says 503 and names it,
    requests fall back to D (counted, and said in a header), a probe brings P back. D killed:
    requests go to the other D; with no D left the router answers 503."""
    p, d1, d2 = Instance("prefill"), Instance("decode"), Instance("decode")

    async def go():
        router = Router([p.url], [d1.url, d2.url], probe_interval=0.2, probe_timeout=1)
        async with Client(router) as c:
            assert (await c.until_health(200))["status"] == "ok"
            answers = [await c.complete() for _ in range(2)]
            assert all(st == 200 and b["got"]["remote_request_id"].startswith("p") for st, b, _ in answers)
            assert {b["who"] for _, b, _ in answers} == {d1.port, d2.port}  # in turn
            m = await c.metrics()
            assert sample(m, "p2pkv_router_requests_total", flow="pull") == 2
            assert sample(m, "p2pkv_router_instance_up", role="prefill", url=p.url) == 1
            assert sample(m, "p2pkv_router_upstream_seconds_count", role="prefill", url=p.url) == 2

            p.kill()
            st, body, headers = await c.complete()  # P refuses the connection, or is already known down
            assert st == 200 and body["got"] is None
            assert headers["X-P2pKV-Fallback"].startswith(("unreachable", "prefill_down"))
            health = await c.until_health(503)
            (down,) = health["down"]
            assert (down["role"], down["url"], down["up"]) == ("prefill", p.url, False)
            assert "unreachable" in down["error"] and health["status"] == "degraded"
            st, body, headers = await c.complete()  # skipped now: P is known to be down
            assert st == 200 and body["got"] is None
            assert headers["X-P2pKV-Fallback"].startswith("prefill_down") and p.url in headers["X-P2pKV-Fallback"]
            m = await c.metrics()
            assert sample(m, "p2pkv_router_instance_up", role="prefill", url=p.url) == 0
            assert sample(m, "p2pkv_router_requests_total", flow="decode_only") == 2
            assert sample(m, "p2pkv_router_prefill_fallbacks_total", reason="prefill_down") >= 1
            assert (await c.health())[1]["prefill_fallbacks"] == 2

            p.start()  # same port: a probe finds it back
            assert (await c.until_health(200))["down"] == []
            st, body, headers = await c.complete()
            assert st == 200 and body["got"]["remote_request_id"].startswith("p") and "X-P2pKV-Fallback" not in headers
            assert sample(await c.metrics(), "p2pkv_router_instance_up", role="prefill", url=p.url) == 1

            d1.kill()
            whos = [(await c.complete())[1]["who"] for _ in range(4)]
            assert whos == [d2.port] * 4  # d1 is skipped (or, before a probe saw it, retried on d2)
            health = (await c.until_health(503))
            assert [x["url"] for x in health["down"]] == [d1.url]
            d2.kill()
            await c.until_health(503)
            assert len((await c.health())[1]["down"]) == 2
            st, body, _ = await c.complete()
            assert st == 503 and d1.url in body["text"] and d2.url in body["text"]
            assert sample(await c.metrics(), "p2pkv_router_unavailable_total") == 1

    for inst in (p, d1, d2):
        inst.start()
    try:
        asyncio.run(go())
    finally:
        for inst in (p, d1, d2):
            inst.kill()


@pytest.mark.timeout(30)
def test_push_with_p_down_sends_d_the_plain_request_and_counts_the_fallback():
    async def go():
        seen: list = []
        d = TestServer(stub("D", seen))
        await d.start_server()
        dead = f"http://127.0.0.1:{free_port()}"
        router = Router([dead], [str(d.make_url("")).rstrip("/")], "push", prefill_kv=["127.0.0.1:1"],
                        probe_interval=0)
        client = TestClient(TestServer(make_app(router)))
        await client.start_server()
        try:
            r = await client.get("/health")
            body = await r.json()
            assert r.status == 503 and body["down"][0]["url"] == dead and body["down"][0]["role"] == "prefill"
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
            assert r.status == 200 and r.headers["X-P2pKV-Fallback"].startswith("prefill_down")
            assert [n for n, _ in seen] == ["D"] and "kv_transfer_params" not in seen[0][1]
            m = await (await client.get("/metrics")).text()
            assert sample(m, "p2pkv_router_prefill_fallbacks_total", reason="prefill_down") == 1
            assert sample(m, "p2pkv_router_requests_total", flow="decode_only") == 1
        finally:
            await client.close()
            await d.close()
    asyncio.run(go())


_CALLBACK_AFFINITY = """
from p2pkv.integrations.vllm.notify import NeedNotifier
n = NeedNotifier()
import time
n.post("http://127.0.0.1:9/p2pkv/need", "t-1", True, 10)  # nobody listens: the thread only has to run
end = time.monotonic() + 20
while n._q.qsize() and time.monotonic() < end:  # it has taken the callback: past its first line
    time.sleep(0.01)
cpus = sorted(os.sched_getaffinity(n._thread.native_id))
n.close()
print(cpus)
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_router_callback_thread_leaves_the_core_the_engine_pinned():
    """D's scheduler posts need-P callbacks from its pinned thread; the thread that sends them takes
    every CPU (P2PKV_IO_CPUS unset) instead of waiting behind the engine for that core."""
    from procs import run_pinned
    assert run_pinned(_CALLBACK_AFFINITY, timeout=100) == sorted(os.sched_getaffinity(0))
