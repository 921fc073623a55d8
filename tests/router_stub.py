"""A stand-in vLLM instance for the router tests, in its own process so that a test can
kill it and start it again on the same port:

    python tests/router_stub.py prefill|decode PORT

GET /health answers 200. POST /v1/completions: as prefill, answers with P-style
kv_transfer_params naming this process; as decode, answers with the params it got
(`got`) and its own port (`who`). GET /v1/models lists one model."""
from __future__ import annotations

import os
import sys

from aiohttp import web


def main() -> None:
    role, port = sys.argv[1], int(sys.argv[2])
    count = 0

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def completions(request: web.Request) -> web.Response:
        nonlocal count
        body = await request.json()
        count += 1
        if role == "prefill":
            params = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_mode": "pull",
                      "remote_address": f"127.0.0.1:{port + 1}", "remote_request_id": f"p{os.getpid()}-{count}",
                      "remote_block_ids": [1, 2], "remote_num_tokens": 40}
            return web.json_response({"choices": [{"text": "P"}], "kv_transfer_params": params})
        return web.json_response({"choices": [{"text": "D"}], "got": body.get("kv_transfer_params"), "who": port})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
