"""--report-to sinks: TensorBoard, wandb (offline) and MLflow (a local file: store) each receive every
step's metrics, the run configuration and the curves image, with no network."""
import csv
import glob
import json
import math
import struct

import pytest

from nanogrpo.metrics import MetricsLog, check_report_to
from nanogrpo.runconfig import RunConfig

STEPS = 5


def _rows():
    """Rows as launch writes them: some values missing (eval only every few steps, nan gaps)."""
    for s in range(1, STEPS + 1):
        yield {"step": s, "loss": 0.5 / s, "reward_mean": 0.1 * s, "ratio_max": 1.0 + s / 100,
               "eval_success": 0.25 * s if s % 2 == 0 else None, "logprob_gap": float("nan") if s == 3 else 1e-3}


def _expected():
    want = {}
    for r in _rows():
        for k, v in r.items():
            if k != "step" and v is not None and math.isfinite(v):
                want.setdefault(k, {})[r["step"]] = v
    return want


def _assert_every_step(got: dict):
    """got: {metric: {step: value}} read back from a sink; TensorBoard stores float32."""
    want = _expected()
    assert sorted(got) == sorted(want)
    for k, steps in want.items():
        assert sorted(got[k]) == sorted(steps), k
        assert [got[k][s] for s in sorted(steps)] == pytest.approx([steps[s] for s in sorted(steps)], rel=1e-6), k


def _write_run(tmp_path, report_to):
    cfg = RunConfig(lr=3e-4, group_size=4)
    log = MetricsLog(tmp_path, None, report_to=report_to, run_config=json.loads(cfg.to_json()))
    for r in _rows():
        log.write(r)
    png = tmp_path / "curves.png"
    from nanogrpo.plot import plot_run
    plot_run(tmp_path / "metrics.csv", png)
    log.close(png)
    log.close(png)  # a second close (an error path after the normal one) is harmless
    return png


def _leveldb_records(path):
    """The records of a wandb offline run file (LevelDB log format: a 7-byte header, then 32 KiB
    blocks of records, each with a 7-byte crc/length/type header). wandb ships no reader of it."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            yield buf
            buf = b""


def test_wandb_offline_gets_every_step(tmp_path, monkeypatch):
    """Guards a wandb sink that drops steps (a step logged out of order is discarded by wandb),
    needs a network, or loses the config: read back from the offline run file."""
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _write_run(tmp_path, "wandb")
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    got, config, image_steps = {}, {}, []
    for data in _leveldb_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_") and "/" not in k:
                    got.setdefault(k, {})[items["_step"]] = v
            if "curves/_type" in items:
                image_steps.append(items["_step"])
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    _assert_every_step(got)
    assert config["lr"] == 3e-4 and config["group_size"] == 4
    assert image_steps == [STEPS]


def test_mlflow_file_store_gets_every_step(tmp_path, monkeypatch):
    """Guards an MLflow sink that drops steps or params, or needs a tracking server: the default
    store is a file: store inside the run directory, read back with MLflow's own client."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    _write_run(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("nanogrpo").experiment_id])
    got = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in _expected()}
    _assert_every_step(got)
    assert run.data.params["lr"] == "0.0003" and run.data.params["group_size"] == "4"
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["curves.png"]


def test_tensorboard_event_file_gets_every_step(tmp_path):
    """Guards a TensorBoard sink that drops steps, the config text or the curves image."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _write_run(tmp_path, "tensorboard")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    got = {k: {e.step: e.value for e in acc.Scalars(k)} for k in acc.Tags()["scalars"]}
    _assert_every_step(got)
    assert [e.step for e in acc.Images("curves")] == [STEPS]
    assert "run_config/text_summary" in acc.Tags()["tensors"]


def test_csv_is_unchanged_by_the_sinks(tmp_path):
    """Guards metrics.csv (the record every run keeps) changing with --report-to none."""
    _write_run(tmp_path, "none")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert rows[2]["logprob_gap"] == "" and rows[0]["eval_success"] == ""
    assert not (tmp_path / "tensorboard").exists()


def test_report_to_errors_name_the_flag(monkeypatch):
    """Guards a typo in --report-to or a missing package failing mid-run instead of up front."""
    with pytest.raises(ValueError, match="--report-to: 'wandbb' is not one of"):
        check_report_to("tensorboard,wandbb")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"--report-to mlflow: the mlflow package is not installed"):
        RunConfig(report_to="mlflow").validate()
    assert check_report_to("auto") == [] and check_report_to("none") == []
