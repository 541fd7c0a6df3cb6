"""`--precision auto`: the CPU probe, its per-machine cache, the CUDA rule and resuming."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from trailers12k_feats import runtime
from trailers12k_feats.extraction.extract import EXTRACT_PRECISIONS, ExtractConfig
from trailers12k_feats.runtime import (
    BF16_MARGIN,
    CACHE_ENV,
    check_precision,
    cpu_choice,
    cuda_choice,
    resolve_precision,
)
from trailers12k_feats.training.train import TRAIN_PRECISIONS, TrainConfig
from trailers12k_feats.utils import T12kError


@pytest.fixture
def probe(fake_probe):
    return fake_probe


def no_probe(*a, **k):
    raise AssertionError("the probe ran")


def test_auto_is_the_default_of_training_and_extraction():
    assert TrainConfig().precision == "auto" and ExtractConfig().precision == "auto"
    assert "auto" in TRAIN_PRECISIONS and "auto" in EXTRACT_PRECISIONS
    with pytest.raises(T12kError, match=r"unknown precision 'auto'; valid: fp32, bf16\."):
        check_precision("auto", "cpu", ("fp32", "bf16"))


def test_auto_takes_fp32_where_bf16_is_slower(probe, caplog):
    with caplog.at_level(logging.INFO, logger="trailers12k_feats.runtime"):
        choice = resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    assert (choice.requested, choice.precision) == ("auto", "fp32")
    cpu = runtime.cpu_identity()["model"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto"))
    assert line.startswith(f"precision auto -> fp32: bf16 matmul 144 GFLOP/s vs fp32 259 GFLOP/s on {cpu}")
    assert line.endswith(f"measured at {probe.path}")
    rec = choice.record()
    assert rec["requested"] == "auto" and rec["precision"] == "fp32" and rec["reason"] in line
    assert rec["probe"]["fp32"] == 259.0 and rec["probe"]["bf16"] == 144.0 and rec["probe"]["cached"] is False


def test_auto_takes_bf16_where_it_is_faster_by_the_margin(probe):
    probe.figures.update(fp32=300.0, bf16=2400.0)
    assert resolve_precision("auto", "cpu", TRAIN_PRECISIONS).precision == "bf16"
    assert resolve_precision("auto", "cpu", EXTRACT_PRECISIONS).precision == "bf16"  # never fp16 on the CPU
    assert probe.calls == 1
    assert cpu_choice(100.0, 100.0 * BF16_MARGIN, TRAIN_PRECISIONS) == "bf16"
    assert cpu_choice(100.0, 100.0 * BF16_MARGIN - 1, TRAIN_PRECISIONS) == "fp32"  # a small gain is not enough
    assert cpu_choice(100.0, 1000.0, ("fp32",)) == "fp32"


def test_the_probe_is_kept_per_machine_and_reused(probe, caplog, monkeypatch):
    for name in runtime.ISA_ENV:
        monkeypatch.delenv(name, raising=False)
    first = resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    assert probe.calls == 1
    kept = json.loads(probe.path.read_text())["entries"]
    key = runtime.probe_key()
    assert list(kept) == [key] and kept[key]["fp32"] == 259.0 and kept[key]["bf16"] == 144.0
    assert torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    assert runtime.cpu_identity()["model"] in key and "AMX-BF16" in key and "AVX512-BF16" in key
    with caplog.at_level(logging.INFO, logger="trailers12k_feats.runtime"):
        again = resolve_precision("auto", "cpu", EXTRACT_PRECISIONS)
    assert probe.calls == 1 and again.precision == first.precision == "fp32"
    assert again.probe["cached"] is True and f"cached at {probe.path}" in caplog.text
    # Another thread count is another key: measured again, both kept.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    finally:
        torch.set_num_threads(threads)
    assert probe.calls == 2 and len(json.loads(probe.path.read_text())["entries"]) == 2
    # An instruction cap in the environment (an AMX CPU run as one without) is another machine too.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert runtime.probe_key().endswith("; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16")
    resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    assert probe.calls == 3 and len(json.loads(probe.path.read_text())["entries"]) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"entries": 3}', "\udcff",
                                     '{"entries": {"KEY": {"fp32": -1, "bf16": "fast"}}}'])
def test_a_corrupt_probe_cache_is_measured_again(probe, content, caplog):
    probe.path.parent.mkdir(parents=True)
    content = content.replace("KEY", runtime.probe_key().replace('"', '\\"'))
    probe.path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert resolve_precision("auto", "cpu", TRAIN_PRECISIONS).precision == "fp32"
    assert probe.calls == 1
    assert json.loads(probe.path.read_text())["entries"][runtime.probe_key()]["fp32"] == 259.0
    resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    assert probe.calls == 1  # the repaired file is used


@pytest.mark.parametrize(("load", "spread", "why"), [(9.9, 1.0, "load average 9.9 on 2 CPUs"),
                                                     (0.5, 2.0, "its timings varied 2.0x")])
def test_a_probe_on_a_busy_machine_decides_this_process_only(probe, monkeypatch, caplog, load, spread, why):
    monkeypatch.setattr(runtime, "machine_load", lambda: (load, 2))
    probe.figures["spread"] = spread
    with caplog.at_level(logging.INFO, logger="trailers12k_feats.runtime"):
        choice = resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    assert choice.precision == "fp32" and choice.reason.endswith(f"measured while the machine was busy ({why}), "
                                                                 f"not kept")
    assert not probe.path.exists() and "the machine was busy during the precision probe" in caplog.text
    resolve_precision("auto", "cpu", TRAIN_PRECISIONS)
    assert probe.calls == 1  # this process reuses it
    monkeypatch.setattr(runtime, "_UNKEPT", {})  # another process, on a quiet machine: measured and kept
    monkeypatch.setattr(runtime, "machine_load", lambda: (0.5, 2))
    probe.figures["spread"] = 1.1
    assert not resolve_precision("auto", "cpu", TRAIN_PRECISIONS).probe.get("busy")
    assert probe.calls == 2 and probe.path.exists()


def test_an_unwritable_probe_cache_only_warns(probe, tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "sub"))  # a folder under a regular file
    with caplog.at_level(logging.WARNING, logger="trailers12k_feats.runtime"):
        assert resolve_precision("auto", "cpu", TRAIN_PRECISIONS).precision == "fp32"
    assert "cannot keep the precision probe" in caplog.text and probe.calls == 1


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.cache_dir() == tmp_path / "xdg" / "trailers12k_feats"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.cache_dir() == tmp_path / "home" / ".cache" / "trailers12k_feats"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert runtime.cache_dir() == tmp_path / "mine"


def test_concrete_requests_and_recorded_precisions_need_no_probe(probe, monkeypatch):
    monkeypatch.setattr(runtime, "measure_matmul", no_probe)
    for p in ("fp32", "bf16"):
        c = resolve_precision(p, "cpu", TRAIN_PRECISIONS)
        assert (c.requested, c.precision, c.reason) == (p, p, "requested")
    c = resolve_precision("auto", "cpu", TRAIN_PRECISIONS, recorded="bf16", where="the runs in res")
    assert (c.precision, c.reason) == ("bf16", "resuming the runs in res, made in bf16")
    assert resolve_precision("fp32", "cpu", TRAIN_PRECISIONS, recorded="bf16").precision == "fp32"
    assert not probe.path.exists()


def test_a_recorded_precision_the_device_cannot_run_is_not_taken(probe):
    assert resolve_precision("auto", "cpu", EXTRACT_PRECISIONS, recorded="fp16").precision == "fp32"
    assert probe.calls == 1


def test_auto_on_cuda_is_bf16_from_ampere(monkeypatch):
    assert cuda_choice((8, 0), TRAIN_PRECISIONS)[0] == "bf16"
    assert cuda_choice((9, 0), EXTRACT_PRECISIONS)[0] == "bf16"
    assert cuda_choice((7, 5), EXTRACT_PRECISIONS)[0] == "fp16"  # no bf16 tensor cores: fp16 where allowed
    assert cuda_choice((7, 0), TRAIN_PRECISIONS)[0] == "fp32"
    monkeypatch.setattr(runtime, "measure_matmul", no_probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: seen.append(i) or (9, 0))
    c = resolve_precision("auto", "cuda:1", TRAIN_PRECISIONS)
    assert (c.precision, seen) == ("bf16", [1]) and "compute capability 9.0" in c.reason
    assert resolve_precision("auto", "cuda", EXTRACT_PRECISIONS).precision == "bf16"


def test_the_real_probe_measures_both_quickly():
    m = runtime.measure_matmul()
    assert m["fp32"] > 0 and m["bf16"] > 0 and m["spread"] >= 1.0
    assert m["seconds"] < 5.0  # about 0.1 s on 2 quiet cores; generous for a shared, busy machine
    load, cpus = runtime.machine_load()
    assert load >= 0.0 and cpus >= 1


def test_runtime_imports_no_stage():
    code = ("import sys, trailers12k_feats.runtime; "
            "print([m for m in sys.modules if m.startswith(('trailers12k_feats.training', "
            "'trailers12k_feats.extraction', 'h5py', 'sklearn', 'torchvision'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
