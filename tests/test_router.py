"""The P/D router against stub OpenAI servers: what P and D receive in pull and
push mode, and that D's streamed answer reaches the client unchanged."""
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


async def run_flow(mode: str, stream: bool, p_status: int = 200):
    seen: list = []
    p = TestServer(stub("P", seen, P_PARAMS, p_status))
    d = TestServer(stub("D", seen))
    await p.start_server()
    await d.start_server()
    router = Router([str(p.make_url("")).rstrip("/")], [str(d.make_url("")).rstrip("/")], mode,
                    prefill_kv=["127.0.0.1:7777"] if mode == "push" else None)
    client = TestClient(TestServer(make_app(router)))
    await client.start_server()
    try:
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 9,
                                                       "stream": stream})
        assert r.status == 200
        text = await r.text()
    finally:
        await client.close()
        await p.close()
        await d.close()
    return seen, text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", [False, True])
def test_pull_sends_p_first_then_d_with_ps_params(stream):
    seen, text = asyncio.run(run_flow("pull", stream))
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
    seen, text = asyncio.run(run_flow("push", True))
    bodies = dict(seen)
    assert set(bodies) == {"P", "D"}
    d_params, p_params = bodies["D"]["kv_transfer_params"], bodies["P"]["kv_transfer_params"]
    assert d_params["do_remote_prefill"] and d_params["transfer_mode"] == "push"
    assert d_params["remote_address"] == "127.0.0.1:7777"
    assert p_params == {"do_remote_decode": True, "transfer_id": d_params["transfer_id"]}
    assert bodies["P"]["max_tokens"] == 1 and text.endswith("data: [DONE]\n\n")


def test_push_without_p_kv_address_is_refused():
    with pytest.raises(ValueError, match="prefill-kv-address"):
        Router(["http://p"], ["http://d"], "push")


@pytest.mark.timeout(30)
def test_pull_falls_back_to_d_alone_when_p_fails():
    seen, text = asyncio.run(run_flow("pull", False, p_status=500))
    assert [n for n, _ in seen] == ["P", "D"]
    assert "kv_transfer_params" not in seen[1][1] and seen[1][1]["max_tokens"] == 9
    assert json.loads(text)["choices"][0]["text"] == "D-answer"
