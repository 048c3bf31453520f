"""Request size limits of the front door over real HTTP: a head (request line and headers) over
``warmserve.frontdoor.max-header-bytes`` or with more than ``max-headers`` headers is 431 in
OpenAI's error shape, before it is whole; a body over ``max-body-bytes`` is 400; what fits
passes, also several requests on one connection and a large body read with its head."""

from __future__ import annotations

import asyncio
import json

import dask.config
import httpx
from distributed import LocalCluster

from warmserve.frontdoor.app import create_app
from warmserve.frontdoor.server import HeadLimits, listening
from warmserve.launcher import HOST
from warmserve.registry import Registry

LIMITS = {
    "warmserve.frontdoor.max-header-bytes": "4KiB",
    "warmserve.frontdoor.max-headers": 16,
    "warmserve.frontdoor.max-body-bytes": "64KiB",
}


def head(*headers: bytes, path: bytes = b"/v1/models") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, b"".join(h + b"\r\n" for h in headers))


async def exchange(port: int, *requests: bytes) -> list[tuple[int, dict]]:
    """Send each request on one connection, reading its answer before the next; the status and
    JSON body of each answer (a closed connection ends the list)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                break
            headers = {}
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            body = await reader.readexactly(int(headers["content-length"]))
            answers.append((int(status_line.split()[1]), json.loads(body) if body else {}))
    finally:
        writer.close()
    return answers


def test_limits_default_to_the_configuration():
    assert HeadLimits.from_config() == HeadLimits(64 * 1024, 256)


def test_head_and_body_limits(tiny_registry: Registry):
    async def scenario() -> dict:
        async with LocalCluster(
            n_workers=0, processes=False, asynchronous=True, dashboard_address="127.0.0.1:0"
        ) as cluster:
            app = create_app(cluster.scheduler_address, tiny_registry)
            async with listening(app, HOST, 0) as door:
                port = int(door.url.rsplit(":", 1)[1])
                fits = b"X-Fits: " + b"a" * 3000
                got = {
                    "fits twice": await exchange(port, head(fits), head(fits)),
                    "big header": await exchange(port, head(b"X-Big: " + b"a" * 5000)),
                    "long url": await exchange(port, head(path=b"/v1/models?" + b"q" * 5000)),
                    "many headers": await exchange(
                        port, head(*(b"X-%d: v" % i for i in range(17)))
                    ),
                    # a head that never ends: answered once more than 4 KiB of it are read
                    "endless": await exchange(port, b"GET / HTTP/1.1\r\nX-Endless: " + b"a" * 8192),
                }
                async with httpx.AsyncClient(base_url=door.url, timeout=60) as http:
                    big_prompt = {"model": "none", "prompt": "a" * 60_000}  # head + body > 4 KiB
                    got["body fits"] = await http.post("/v1/completions", json=big_prompt)
                    too_big = {"model": "tiny-0", "prompt": "a" * 70_000}
                    got["body"] = await http.post("/v1/completions", json=too_big)

                    async def chunks():
                        yield json.dumps(too_big).encode()

                    got["chunked body"] = await http.post(
                        "/v1/completions",
                        content=chunks(),
                        headers={"Content-Type": "application/json"},
                    )
                return got

    with dask.config.set(LIMITS):
        got = asyncio.run(scenario())
    assert [status for status, _ in got["fits twice"]] == [200, 200]
    for name, word in [
        ("big header", "4096 bytes"),
        ("long url", "4096 bytes"),
        ("many headers", "more than 16 headers"),
        ("endless", "4096 bytes"),
    ]:
        [(status, body)] = got[name]
        assert status == 431, name
        assert body["error"]["type"] == "RequestHeaderFieldsTooLarge"
        assert word in body["error"]["message"], body
    assert got["body fits"].status_code == 404, got["body fits"].text  # read whole, no such model
    for name in ("body", "chunked body"):
        r = got[name]
        assert r.status_code == 400, r.text
        assert "larger than 65536 bytes" in r.json()["error"]["message"]
