"""Devices without a GPU: ``warmserve up --devices``, the GPU pin of a worker, local indices.

The number of visible GPUs is an argument of what decides, so GPU cases run on any machine;
nothing here needs NVML, CUDA or a cluster.
"""

from __future__ import annotations

import os

import dask
import pytest
from click.testing import CliRunner

from warmserve import launcher
from warmserve.worker_plugin import devices
from warmserve.worker_plugin.devices import (
    Device,
    cuda_pin,
    expand_devices,
    parse_devices,
    pin_cuda,
)

MiB = 1 << 20


@pytest.mark.parametrize(
    ("spec", "gpus", "expected"),
    [
        ("2", 0, ["cpu:0", "cpu:1"]),
        ("3", 4, ["cpu:0", "cpu:1", "cpu:2"]),  # a count is CPU slots, GPUs or not
        (1, None, ["cpu:0"]),  # serving(devices=1), as tests and benchmarks call it
        (None, 0, ["cpu:0", "cpu:1"]),
        (None, 2, ["cuda:0", "cuda:1"]),
        ("cuda", 3, ["cuda:0", "cuda:1", "cuda:2"]),
        (" cuda ", 1, ["cuda:0"]),
        ("cuda:0,cuda:1", 0, ["cuda:0", "cuda:1"]),  # listed GPUs need no NVML
        ("cuda:1", 2, ["cuda:1"]),
        ("cpu:0, cpu:1", 0, ["cpu:0", "cpu:1"]),
        ("cpu:00,cuda:01", 1, ["cpu:0", "cuda:1"]),
    ],
)
def test_expand_devices(spec, gpus, expected):
    assert expand_devices(spec, gpus=gpus) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "at least 1"),
        ("gpu", "'gpu' is not a count of CPU slots"),
        ("-1", "is not a count of CPU slots"),
        ("", "is not a count of CPU slots"),
        ("cuda:x", "bad device 'cuda:x': expected cpu:N or cuda:N"),
        ("gpu:0", "bad device 'gpu:0'"),
        ("cuda:0,", "bad device ''"),
        ("cuda:0,cuda:0", "cuda:0 listed twice"),
        ("cpu:1,cpu:01", "cpu:1 listed twice"),
        ("cuda", "no GPU visible (NVML found none); use a count of CPU slots"),
    ],
)
def test_expand_devices_rejects(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand_devices(spec, gpus=0)


def test_visible_gpus_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert devices._visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert devices._visible_gpus() == 0
    assert expand_devices(None) == ["cpu:0", "cpu:1"]


@pytest.mark.parametrize(
    ("spec", "visible", "expected"),
    [
        ("cuda:3", None, "3"),  # one GPU, variable unset: pin
        ("cuda:0", None, "0"),
        ("cuda:1,cpu:0", None, "1"),  # CPU slots beside it need no GPU
        ("cuda:1", "2,3", "3"),  # set: cuda:1 is its second GPU, the process sees only it
        ("cuda:0", "GPU-aa, GPU-bb", "GPU-aa"),
        ("cuda:0", "", None),  # set to nothing: no GPU to pin to
        ("cuda:2", "5", None),  # listed no more: pinned already
        ("cuda:0,cuda:1", None, None),  # several GPUs: the process sees them all
        ("cpu:0,cpu:1", None, None),
        (None, None, None),  # no flag: every visible GPU
    ],
)
def test_cuda_pin(spec, visible, expected):
    assert cuda_pin(spec, visible) == expected


def test_pin_cuda_sets_the_variable_once(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored, or removed, after the test
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert not pin_cuda("cpu:0")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert pin_cuda("cuda:3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not pin_cuda("cuda:3")  # a second call finds it set


def test_pinned_gpu_keeps_its_id_and_is_the_process_cuda0(monkeypatch):
    asked = []
    monkeypatch.setattr(devices, "_gpu_memory", lambda i: asked.append(i) or 80 * MiB)
    (gpu,) = parse_devices("cuda:3", "n", pinned=True)
    assert (gpu.id, gpu.index, gpu.local_index, gpu.memory) == ("n/cuda:3", 3, 0, 80 * MiB)
    assert asked == [0]  # NVML is asked for the process's cuda:0, the pinned GPU
    unpinned = parse_devices("cuda:0,cuda:2,cpu:1", "n", memory=MiB)
    assert [(d.id, d.local_index) for d in unpinned] == [
        ("n/cuda:0", 0),
        ("n/cuda:2", 2),
        ("n/cpu:1", 1),
    ]
    assert Device("n", "cpu", 4, MiB).local_index == 4


def test_gpu_budget_is_nvml_total_unless_configured(monkeypatch):
    monkeypatch.setattr(devices, "_gpu_memory", lambda i: 80 * MiB)
    assert [d.memory for d in parse_devices("cuda:0,cpu:0", "n")] == [
        80 * MiB,
        2048 * MiB,  # warmserve.worker.device-memory
    ]
    with dask.config.set({"warmserve.worker.gpu-memory": "60MiB"}):
        gpu, cpu = parse_devices("cuda:0,cpu:0", "n")
        assert (gpu.memory, cpu.memory) == (60 * MiB, 2048 * MiB)
        assert parse_devices("cuda:0", "n", memory=MiB)[0].memory == MiB  # the flag wins


def test_device_pool_uses_the_local_index(monkeypatch):
    from warmserve.worker_plugin import weight_store

    made = []

    class Switcher:
        chunk_size = MiB

        def __init__(self, size, backend, device):
            made.append((size, backend, device))

    monkeypatch.setattr(weight_store, "MemorySwitcher", Switcher)
    weight_store.DeviceMemory(Device("n", "cuda", 3, 64 * MiB, 0))
    assert made == [(64 * MiB, "auto", 0)]


def test_launcher_one_worker_per_device():
    _, workers = launcher.cluster_spec("r.yaml", "warmserve", ["cuda:0", "cuda:1"])
    argv = [w["options"]["preload_argv"][0] for w in workers.values()]
    assert argv == [
        ["--warmserve-devices", "cuda:0", "--warmserve-registry", "r.yaml"],
        ["--warmserve-devices", "cuda:1", "--warmserve-registry", "r.yaml"],
    ]
    assert all(w["options"]["nthreads"] == 1 for w in workers.values())


def test_cli_up_help_documents_devices():
    res = CliRunner().invoke(launcher.command, ["--help"])
    assert res.exit_code == 0, res.output
    help_text = " ".join(res.output.split())
    assert "a count of CPU slots" in help_text
    assert "cuda (every visible GPU)" in help_text
    assert "cuda:0,cuda:1" in help_text
    assert "default: every visible GPU, else 2 CPU slots" in help_text


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "at least 1"), ("gpu", "not a count"), ("cuda", "no GPU visible")],
)
def test_cli_up_rejects_bad_devices(monkeypatch, value, message):
    monkeypatch.setattr(devices, "_visible_gpus", lambda: 0)
    res = CliRunner().invoke(launcher.command, ["--devices", value])
    assert res.exit_code == 2
    assert "Invalid value for '--devices'" in res.output and message in res.output
