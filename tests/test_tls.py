"""Dask TLS in ``warmserve up --tls`` (a certificate made at start, in memory) and the TLS
flags that ``warmserve frontdoor`` and ``warmserve status`` share. The README's deploy commands
over TLS are in ``tests/test_deploy.py``."""

from __future__ import annotations

import os
from pathlib import Path

import click
import dask.config
import httpx
import pytest
from click.testing import CliRunner

from tests.certs import make_certs, no_certificate, refused
from tests.stack import BackgroundStack
from tests.test_deploy import DEADLINE
from warmserve import options
from warmserve.registry import Registry


@pytest.mark.engine
def test_up_over_tls(tiny_registry: Registry, models_dir):
    registry_file = os.path.join(models_dir, "registry.yaml")
    with BackgroundStack(tiny_registry, registry_file, devices=1, tls=True) as stack:
        assert stack.scheduler.startswith("tls://")
        workers = stack.cluster.scheduler_info["workers"]
        assert workers and all(w.startswith("tls://") for w in workers), workers
        body = {"model": "tiny-0", "prompt": "Secure", "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=DEADLINE)
        assert r.status_code == 200, r.text
        assert refused(stack.scheduler, no_certificate())
        assert refused(stack.scheduler.replace("tls://", "tcp://"))


def test_tls_flags_set_the_client_certificate(tmp_path: Path):
    ca, cert, key = make_certs(tmp_path, "cluster")

    @click.command()
    @options.tls_options()
    def show() -> None:
        click.echo(dask.config.get("distributed.comm.tls.client.cert"))
        click.echo(dask.config.get("distributed.comm.require-encryption"))

    # Leaf keys, so that leaving the block puts back what the flags set for good.
    keys = [f"distributed.comm.tls.{name}" for name in ("ca-file", "client.cert", "client.key")]
    saved = {name: dask.config.get(name) for name in [*keys, "distributed.comm.require-encryption"]}
    with dask.config.set(saved):
        given = CliRunner().invoke(
            show, ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
        )
        assert given.exit_code == 0 and given.output.split() == [cert, "True"], given.output
    with dask.config.set(saved):
        alone = CliRunner().invoke(show, ["--tls-ca-file", ca])
    assert {name: dask.config.get(name) for name in saved} == saved
    assert alone.exit_code == 1
    assert alone.output.strip().splitlines()[-1] == (
        "Error: --tls-ca-file and --tls-cert come together (and --tls-key)"
    )
