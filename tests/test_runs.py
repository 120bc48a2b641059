"""Evaluation runs: resume after a real SIGKILL, torchrun with 2 processes, report regeneration."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffusion_classifier.store import array_from_bytes

from .conftest import image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data"), ["cat", "dog", "bird"], 8, size=12)


def _evaluate_cmd(model, folder, out, *extra):
    return [sys.executable, "-m", "diffusion_classifier", "evaluate", "--model", str(model), "--data", str(folder),
            "--out", str(out), "--timesteps", "20", "--images-per-batch", "2", "--quiet", "--json", *extra]


def _store_rows(out: Path) -> dict:
    db = sqlite3.connect(out / "results.sqlite")
    rows = {idx: (pred, blob) for idx, pred, blob in db.execute("SELECT idx, prediction, errors FROM results")}
    db.close()
    return rows


def _assert_same_results(a: dict, b: dict) -> None:
    """Same images, same predictions, error matrices equal up to float summation order."""
    assert a.keys() == b.keys()
    for idx in a:
        assert a[idx][0] == b[idx][0]
        np.testing.assert_allclose(array_from_bytes(a[idx][1]), array_from_bytes(b[idx][1]), rtol=1e-5)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(models, folder, tmp_path_factory) -> Path:
    """One uninterrupted single-process run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_evaluate_cmd(models["pixel_class"], folder, out), check=True, env=_env(), capture_output=True)
    return out


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(models, folder, reference, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_evaluate_cmd(models["pixel_class"], folder, killed), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until some, but not all, batches are committed
        if (killed / "results.sqlite").exists():
            try:
                if len(_store_rows(killed)) >= 4:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _store_rows(killed)
    assert 0 < len(partial) < 24, "the kill should land mid-run"
    out = subprocess.run(_evaluate_cmd(models["pixel_class"], folder, killed), check=True, env=_env(),
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1])["images"] == 24
    _assert_same_results(_store_rows(killed), _store_rows(reference))


def test_torchrun_two_processes_equal_one(models, folder, reference, tmp_path):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "diffusion_classifier", *_evaluate_cmd(models["pixel_class"], folder, two)[3:]]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metric_lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(metric_lines) == 1, "only rank 0 prints the merged metrics"
    assert json.loads(metric_lines[0])["images"] == 24
    _assert_same_results(_store_rows(reference), _store_rows(two))


def test_report_regenerates_metrics_and_plots_from_the_store(reference, tmp_path, capsys):
    from diffusion_classifier.cli import main

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    stored = json.loads((out / "metrics.json").read_text())
    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(stored["accuracy"])  # same aggregation: same predictions
    assert np.array(report["confusion_matrix"]).sum() == 24
    assert [r["timesteps"] for r in report["accuracy_vs_timesteps"]] == [1, 2, 5, 10, 20]
    assert report["accuracy_vs_timesteps"][-1]["accuracy"] == pytest.approx(stored["accuracy"])
    assert len(report["error_by_timestep"]["timesteps"]) == 20
    for name in ("confusion.png", "accuracy_vs_timesteps.png", "error_by_timestep.png", "report.json"):
        assert (out / "report" / name).stat().st_size > 0
    # re-scoring with a timestep range uses fewer columns and can change predictions, without the model
    assert main(["report", str(out), "--t-min", "500", "--json", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["rescoring"]["t_min"] == 500
    assert main(["report", str(tmp_path)]) == 2


def test_error_matrices_are_stored_as_float32_without_loss(reference):
    import io
    import sqlite3

    from diffusion_classifier.store import ResultsStore, array_from_bytes, errors_bytes

    with ResultsStore(reference) as store:
        matrices = store.error_matrices()
    blob = sqlite3.connect(reference / "results.sqlite").execute("SELECT errors FROM results").fetchone()[0]
    assert np.load(io.BytesIO(blob)).dtype == np.float32
    assert all(m.dtype == np.float64 for _, m, _ in matrices)  # read back as float64, as computed
    exact = np.array([[0.1, np.nan]])  # not a float32 value: kept as float64
    assert np.array_equal(array_from_bytes(errors_bytes(exact)), exact, equal_nan=True)
