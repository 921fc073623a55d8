"""The P/D router against stub OpenAI servers: what P and D receive in pull and
push mode, that D's streamed answer reaches the client unchanged, and that in push
mode P is contacted only when D says it needs P (or does not say in time)."""
from __future__ import annotations

import asyncio
import json

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from p2pkv.integrations.router import Router, make_app  # noqa: E402

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
                                                       prefill_kv=["127.0.0.1:1"]))))
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
    seen, text, _ = asyncio.run(run_flow("pull", False, p_status=500))
    assert [n for n, _ in seen] == ["P", "D"]
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
        client = TestClient(TestServer(make_app(Router(["http://p"], ["http://d"]))))
        await client.start_server()
        try:
            r = await client.post("/v1/completions", json=["not", "an", "object"])
            assert r.status == 400 and "JSON object" in await r.text()
        finally:
            await client.close()
    asyncio.run(go())
