"""The front door's API key (``--api-key``, ``WARMSERVE_API_KEY``): ``/v1/*`` needs it, over
real HTTP and through the official ``openai`` client; ``/health`` and ``/metrics`` stay open."""

from __future__ import annotations

import asyncio

import click
import dask.config
import httpx
import openai
import pytest
from click.testing import CliRunner
from distributed import LocalCluster

from warmserve import config, options
from warmserve.frontdoor.app import create_app
from warmserve.frontdoor.server import listening
from warmserve.launcher import HOST
from warmserve.registry import Registry

KEY = "sk-warmserve-test"


def test_v1_needs_the_key_and_probes_do_not(tiny_registry: Registry):
    async def scenario() -> dict:
        async with LocalCluster(
            n_workers=0, processes=False, asynchronous=True, dashboard_address="127.0.0.1:0"
        ) as cluster:
            app = create_app(cluster.scheduler_address, tiny_registry, api_key=KEY)
            async with (
                listening(app, HOST, 0) as door,
                httpx.AsyncClient(base_url=door.url, timeout=60) as http,
            ):
                body = {"model": "tiny-0", "prompt": "x", "max_tokens": 1}
                got = {
                    "none": await http.get("/v1/models"),
                    "wrong": await http.get("/v1/models", headers=bearer("wrong")),
                    "prefix": await http.get("/v1/models", headers=bearer(KEY[:-1])),
                    "basic": await http.get("/v1/models", headers={"Authorization": KEY}),
                    "post": await http.post("/v1/completions", json=body),
                    "right": await http.get("/v1/models", headers=bearer(KEY)),
                    "health": await http.get("/health"),
                    "metrics": await http.get("/metrics"),
                }
                base = f"{door.url}/v1"
                with pytest.raises(openai.AuthenticationError):
                    await openai.AsyncOpenAI(base_url=base, api_key="wrong").models.list()
                listed = await openai.AsyncOpenAI(base_url=base, api_key=KEY).models.list()
                got["listed"] = sorted(m.id for m in listed.data)
                return got

    got = asyncio.run(scenario())
    for refused in ("none", "wrong", "prefix", "basic", "post"):
        r = got[refused]
        assert r.status_code == 401, (refused, r.text)
        assert r.json()["error"]["type"] == "AuthenticationError"
        assert KEY not in r.text
    assert got["right"].status_code == 200
    assert got["health"].status_code == 200 and got["metrics"].status_code == 200
    assert got["listed"] == sorted(tiny_registry)


def test_key_from_the_environment_sets_the_front_door_s_config():
    @click.command()
    @options.api_key_option()
    def show() -> None:
        click.echo(config.get("frontdoor.api-key"))

    with dask.config.set({"warmserve.frontdoor.api-key": None}):
        result = CliRunner().invoke(show, [], env={"WARMSERVE_API_KEY": KEY})
        assert result.exit_code == 0 and result.output.strip() == KEY
        flag = CliRunner().invoke(show, ["--api-key", "other"], env={"WARMSERVE_API_KEY": KEY})
        assert flag.output.strip() == "other"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
