"""What a new user hits (#26): bad output paths and inputs refused before anything is written, Ctrl-C in one
line, no stray folders, pictures whose labels and exact matches read right."""

import numpy as np
import pytest

import models
from export.cli import main
from export.pipeline import export_job

DEMO = str(models.demo_checkpoint("sta"))


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("make_out, says", [
    (lambda tmp: (tmp / "taken").write_text("x") and tmp / "taken", "is a file, not a folder"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "out", "is a file, so the folder cannot be"),
])
def test_an_output_path_that_cannot_be_a_folder_is_refused_before_loading(make_out, says, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(export_job, "read_inputs", lambda *a: pytest.fail("the model was loaded"))
    out = make_out(tmp_path)
    assert main(["--weights", DEMO, "--out", str(out), "--no-parity"]) == 2
    assert says in _one_error_line(capsys)


@pytest.mark.parametrize("code, says", [("missing", "not a folder"), ("file.py", "not a folder"),
                                        ("empty", "no Python files")])
def test_a_code_folder_that_is_not_a_fork_is_refused(code, says, tmp_path, capsys):
    (tmp_path / "file.py").write_text("x = 1\n")
    (tmp_path / "empty").mkdir()
    assert main(["--weights", DEMO, "--code", str(tmp_path / code), "--out", str(tmp_path / "out")]) == 2
    assert says in _one_error_line(capsys) and not (tmp_path / "out").exists()


def test_calibration_files_that_are_not_images_are_refused_before_any_artifact(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(3):
        (calib / f"{k}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["--weights", DEMO, "--int8", "--calib", str(calib), "--out", str(out), "--no-parity"]) == 2
    assert "cannot be read as an image" in _one_error_line(capsys) and not out.exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_job, "run", interrupted)
    assert main(["--weights", DEMO, "--out", str(tmp_path)]) == 130
    assert "interrupted" in _one_error_line(capsys)


def test_labelled_scoring_leaves_no_runs_folder(tmp_path, monkeypatch):
    from calib.demo import demo_dataset
    from export.verify.accuracy import LabelledMAP

    data = demo_dataset()
    monkeypatch.chdir(tmp_path)
    LabelledMAP(data, (64, 64)).measure({})
    assert list(tmp_path.iterdir()) == []  # ultralytics' validator made runs/detect/train-N here before


def test_labels_are_drawn_least_confident_first():
    from export.report.pictures import _draw

    drawn = []

    class Recorder:
        def box_label(self, box, label, color):
            drawn.append(label)

    dets = np.array([[0, 0, 9, 9, 0.47, 0], [0, 0, 9, 9, 0.86, 1], [0, 0, 9, 9, 0.33, 1]], np.float32)
    _draw(Recorder(), dets, dets, None, {0: "circle", 1: "square"}, lambda c, bgr: (0, 0, 0))
    assert drawn == ["square 0.33", "circle 0.47", "square 0.86"]  # the most confident label ends on top


def test_an_exact_block_is_labelled_exact_not_a_full_bar(tmp_path, monkeypatch):
    from export.report import pictures

    figures = []
    monkeypatch.setattr(pictures, "_save", lambda fig, path: figures.append(fig))
    report = {"modules": [{"name": "model.10", "rel": 0.0}, {"name": "model.22", "rel": 3e-7}]}
    pictures.block_errors_plot(report, tmp_path / "errors.png")
    ax = figures[0].axes[0]
    assert [t.get_text().strip() for t in ax.texts] == ["exact"]
    assert np.isnan(ax.patches[0].get_width()) and ax.patches[1].get_width() == pytest.approx(3e-7)


def test_bench_with_one_model_shows_latencies_and_claims_no_ratio(tmp_path):
    from export.report.bench_report import bench_markdown, bench_table, write_bench
    from export.verify.timing import latency_stats, relative_to_first

    rows = [{"model": "only", "precision": p, "onnx": f"only_{p}.onnx", "flops": 8.7e9, "params": 3.2e6,
             "blocks": None, **latency_stats(medians, 10, 1)}
            for p, medians in (("fp32", [40.0, 42.0, 41.0, 45.0]), ("fp16", [38.0, 39.0, 37.5, 40.0]))]
    relative_to_first(rows)
    result = {"imgsz": [640, 640], "batch": 1, "rounds": 4, "iterations_per_round": 10, "warmup": 5,
              "threads": {"onnxruntime_intra_op_threads": 2, "torch_threads": 2, "cpu_count": 2}, "input": "x",
              "rows": rows}
    text = bench_markdown(result) + bench_table(result)
    assert "41.50" in text and "40.75 .. 42.75" in text  # median of round medians, and their IQR
    assert "over first" not in text and "within" not in text and "bound" not in text
    write_bench(result, tmp_path)
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_bad_option_value_is_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--engine", "fp64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'fp64'" in err and "--help" in err


def test_both_onnxruntime_distributions_are_detected(monkeypatch):
    import importlib.metadata

    from export.verify import runners

    installed = {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert runners.ort_installed_twice()
    del installed["onnxruntime-gpu"]
    assert not runners.ort_installed_twice()


def test_backend_labels_name_each_precision_once():
    from export.report.labels import backend_label

    assert backend_label("onnxruntime_fp32", "fp32") == "ONNX Runtime (fp32)"
    assert backend_label("onnxruntime", "int8") == "ONNX Runtime (int8)"
    assert backend_label("tensorrt") == "TensorRT"


def test_latency_plot_takes_a_median_a_rounding_below_its_quartiles(tmp_path):
    from export.report.pictures import latency_plot

    # one round: the round median is kept to 3 decimals (41.001), the median itself is not (41.0006)
    latency_plot([{"model": "m", "precision": "fp32", "median_ms": 41.0006}], [[41.001, 41.001]], tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0
