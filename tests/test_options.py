"""Preload flags are checked and resolved as they are parsed (``warmserve.options``).

Paths become absolute where they are read: flags against the working directory of the command,
paths in a config file against its folder. A preload that cannot start ends ``dask scheduler``
or ``dask worker`` with one ``Error:`` line and a non-zero status, before any server starts.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator

import dask.config
import pytest

from warmserve import config
from warmserve.registry import Registry
from warmserve.scheduler_plugin import dask_setup as scheduler_setup
from warmserve.worker_plugin import dask_setup as worker_setup

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


def parse(command, argv: list[str]) -> dict:
    with command.make_context("dask_setup", argv) as ctx:
        return ctx.params


def test_registry_flag_is_made_absolute(tiny_registry: Registry, models_dir: str, monkeypatch):
    monkeypatch.chdir(os.path.dirname(models_dir))
    relative = os.path.join(os.path.basename(models_dir), "registry.yaml")
    for command in (scheduler_setup, worker_setup):
        params = parse(command, ["--warmserve-registry", relative])
        assert params["warmserve_registry"] == os.path.join(models_dir, "registry.yaml")


def test_plugin_from_a_client_resolves_its_registry_there(tmp_path, monkeypatch):
    from warmserve.worker_plugin.plugin import WarmServeWorker

    monkeypatch.chdir(tmp_path)
    plugin = WarmServeWorker(registry="registry.yaml")  # pickled to the worker after this
    assert plugin._registry_path == os.fspath(tmp_path / "registry.yaml")


@pytest.fixture
def restored_config() -> Iterator[None]:
    """dask.config as it was before the test (a config file merges into it in place)."""
    before = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(before)


def test_config_paths_resolve_against_the_config_file(
    tiny_registry: Registry, models_dir: str, restored_config: None
):
    folder = os.path.dirname(models_dir)
    config_file = os.path.join(folder, "warmserve.yaml")
    with open(config_file, "w") as f:
        f.write(f"models-dir: {os.path.basename(models_dir)}\nscheduler:\n  history-dir: hist\n")
    params = parse(scheduler_setup, ["--warmserve-config", config_file])
    assert config.get("models-dir") == models_dir
    assert config.get("scheduler.history-dir") == os.path.join(folder, "hist")
    assert params["warmserve_registry"] == os.path.join(models_dir, "registry.yaml")


def failed_start(args: list[str], cwd: str, env: dict[str, str] | None = None) -> str:
    """Run a ``dask`` command that must fail at once; its ``Error:`` line."""
    proc = subprocess.run(
        [DASK, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


SCHEDULER = ["scheduler", "--port", "0", "--no-dashboard"]
SCHEDULER += ["--preload", "warmserve.scheduler_plugin"]
# The address refuses connections: the worker must fail before it tries.
WORKER = ["worker", "tcp://127.0.0.1:9", "--no-dashboard", "--preload", "warmserve.worker_plugin"]


@pytest.mark.parametrize("command", [SCHEDULER, WORKER], ids=["scheduler", "worker"])
def test_missing_registry_fails_the_start(tmp_path, command):
    line = failed_start([*command, "--warmserve-registry", "nope.yaml"], cwd=str(tmp_path))
    assert f"{tmp_path / 'nope.yaml'}: no such registry file" in line


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("planner:\n  tick: soon\n", "'soon'"),
        ("planner:\n  tick: 2\n  tik: 3\n", "unknown setting warmserve.planner.tik"),
    ],
    ids=["bad value", "unknown key"],
)
def test_bad_config_fails_the_scheduler(
    tmp_path, tiny_registry: Registry, models_dir: str, text: str, named: str
):
    (tmp_path / "c.yaml").write_text(text)
    registry = os.path.join(models_dir, "registry.yaml")
    argv = [*SCHEDULER, "--warmserve-config", "c.yaml", "--warmserve-registry", registry]
    line = failed_start(argv, cwd=str(tmp_path))
    assert str(tmp_path / "c.yaml") in line and named in line


def test_unknown_variable_fails_the_worker(tmp_path, tiny_registry: Registry, models_dir: str):
    registry = os.path.join(models_dir, "registry.yaml")
    env = {"DASK_WARMSERVE__WORKER__ENGINEKV": "1GiB"}
    line = failed_start([*WORKER, "--warmserve-registry", registry], str(tmp_path), env)
    assert "unknown setting warmserve.worker.enginekv" in line


def test_bad_setting_fails_the_worker(tmp_path, tiny_registry: Registry, models_dir: str):
    registry = os.path.join(models_dir, "registry.yaml")
    env = {"DASK_WARMSERVE__WORKER__ENGINE_KV": "lots"}
    line = failed_start([*WORKER, "--warmserve-registry", registry], str(tmp_path), env)
    assert "'lots'" in line
