"""Figures, tables and `sweep report` on the real store of tests/test_analysis.py's tiny sweep."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from analysis.figures import FIGURES, save
from analysis.report import choose_trials, code_version, trial_curves
from analysis.tables import TABLES, bits_points, layer_points, pruning_points, quant_tables, to_markdown
from jobs.pruning import target_sparsity
from runner.cli import main
from tests.test_analysis import NAME, analysis_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, uri, _ = analysis_store(tmp_path_factory)
    from analysis import runs_frame

    frame = runs_frame(uri, NAME)
    tid = choose_trials(frame)[0]
    run_id = frame.loc[frame["trial_id"] == tid, "run_id"].iloc[0]
    return path, uri, frame, {tid: trial_curves(uri, run_id)}


def _finished(frame):
    return frame[frame["status"] == "FINISHED"]


def assert_real_png(path: Path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400, image.shape
    pixels = image[..., :3].reshape(-1, 3)
    # many distinct colours: lines, bands, text; a blank or one-colour canvas has one or two
    assert len(np.unique(pixels, axis=0)) > 50 and pixels.std() > 0.05


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_is_drawn_with_labelled_axes(store, tmp_path, name):
    _, _, frame, curves = store
    fig = FIGURES[name](frame, curves)
    assert fig is not None, f"{name}: the tiny sweep has data for every figure"
    for ax in fig.axes:
        if ax.get_visible() and ax.lines:
            assert "[" in ax.get_ylabel() and "]" in ax.get_ylabel(), (name, ax.get_ylabel())
            # stacked panels sharing an x axis label it once, under the bottom one
            labels = [a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax)]
            assert any("[" in label and "]" in label for label in labels), (name, labels)
    assert_real_png(save(fig, tmp_path / f"{name}.png"))


def test_figures_say_when_there_is_nothing_to_show(store):
    _, _, frame, _ = store
    dense = frame[frame["prune.ratio"] == 0]
    for name in ("lottery", "speedup", "bits", "layer_sensitivity"):
        assert FIGURES[name](dense, {}) is None
    assert FIGURES["training_curves"](frame, {}) is None


def test_pruning_points_follow_the_schedule(store):
    _, _, frame, _ = store
    table = pruning_points(frame)
    done = _finished(frame)
    dense = done[done["prune.ratio"] == 0]
    base = table[table["line"] == "dense"].iloc[0]
    per_seed = dense.groupby("seed")["accuracy"].mean() * 100
    assert base["accuracy_pct_mean"] == pytest.approx(per_seed.mean())
    assert base["accuracy_pct_std"] == pytest.approx(per_seed.std(ddof=1))
    imp = table[table["line"] == "rewind=init"]  # IMP, 2 levels to 0.8: a single ratio, drawn through its levels
    assert list(imp["level"]) == [0, 1, 2]
    expected = [100 * (1 - target_sparsity(0.8, 2, level)) for level in (0, 1, 2)]
    assert list(imp["remaining_pct_mean"]) == pytest.approx(expected, abs=0.01)
    assert (imp["theoretical_speedup_mean"].diff().dropna() > 0).all()
    # quantized trials repeat the float training of their quant: none twin; it counts once per seed
    assert (imp["accuracy_pct_count"] == 2).all()


def test_quantization_table_like_the_seeds(store):
    _, _, frame, _ = store
    tables = quant_tables(frame)
    assert list(tables) == ["quantization-digits-lenet_300_100"]
    table = tables["quantization-digits-lenet_300_100"].set_index("stage")
    assert list(table.index) == ["float", "static", "w2", "w2_channel", "w4", "w4_channel"]
    done = _finished(frame)
    after = done[done["stage"] == "static"]
    assert table.loc["static", "accuracy_pct_mean"] == pytest.approx(100 * after["accuracy"].mean())
    assert table.loc["static", "size_kb_mean"] == pytest.approx(after["size_bytes"].mean() / 1e3)
    assert table.loc["static", "size_reduction_x"] > 2  # int8 weights: about 4x smaller
    assert np.isnan(table.loc["float", "output_mse_mean"]) and table.loc["w2", "output_mse_mean"] > 0
    markdown = to_markdown(tables["quantization-digits-lenet_300_100"])
    assert markdown.splitlines()[0].startswith("|   | Accuracy [%] | Top-5 error [%] | Size [KB] | Latency [ms/sample]")
    assert "| before: float |" in markdown and "| after: static |" in markdown


def test_bits_and_layer_sensitivity_points(store):
    path, _, frame, _ = store
    bits = bits_points(frame)
    assert set(map(tuple, bits[["granularity", "bits"]].to_numpy())) == {
        ("float", 32), ("per tensor", 2), ("per tensor", 4), ("per channel", 2), ("per channel", 4)}
    layers = layer_points(frame)
    done = _finished(frame)
    isolated = done[done["prune.scope"] == "layers"]
    # no scope-all trial shares the isolated ones' settings (1 level, no retraining): no "all layers" line
    assert set(layers["layer"]) == set(isolated["prune.layers"]) and len(set(layers["layer"])) == 3
    for layer in isolated["prune.layers"].unique():
        assert sorted(layers.loc[layers["layer"] == layer, "ratio_pct"]) == [0.0, 50.0]


def test_training_curves_artifact(store):
    _, _, frame, curves = store
    (tid, curve), = curves.items()
    levels = frame.loc[frame["trial_id"] == tid, "level"].max()
    assert list(curve["step"]) == list(range(int(levels) + 1))  # train.epochs: 1 per level
    assert {"train_loss", "test_accuracy", "lr", "level"} <= set(curve)


def test_sweep_report_command(store, tmp_path):
    path, _, frame, _ = store
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == sorted(f"{name}.png" for name in FIGURES)  # every figure, relative links
    for image in images:
        assert_real_png(out / image)
    links = set(re.findall(r'<a href="([^"]+)"', page))
    for name in ["summary", "pruning", "bits", "layer-sensitivity", "quantization-digits-lenet_300_100"]:
        assert {f"{name}.csv", f"{name}.md"} <= links and (out / f"{name}.md").read_text().startswith("|")
        assert (out / f"{name}.csv").stat().st_size > 0
    assert len(pd.read_csv(out / "runs.csv")) == len(frame)
    assert f"name: {NAME}" in page and "prune.rewind: &quot;epoch:3&quot;" in page  # the sweep file's text
    assert code_version() in page and code_version() != "unknown"
    failed = frame.loc[frame["status"] == "FAILED", "trial_id"].iloc[0]
    assert "Failed trials (left out of every mean)" in page and failed in page
    summary = pd.read_csv(out / "summary.csv")
    assert summary["failed"].sum() == 1 and summary.loc[summary["failed"] == 1, "accuracy_count"].iloc[0] == 0


def test_report_of_failed_trials_only_has_no_figures_and_says_so(store, tmp_path):
    from analysis import write_report

    _, _, frame, _ = store
    failed = frame[frame["status"] == "FAILED"]
    page = write_report(failed, tmp_path).read_text()
    assert "<img" not in page and "Nothing to show in these sweeps for: lottery" in page
    assert failed["trial_id"].iloc[0] in page and not list(tmp_path.glob("*.png"))


def test_report_rejects_unknown_trials(store, tmp_path):
    path = store[0]
    result = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path), "--trial", "nope"])
    assert result.exit_code == 1 and "not trials of" in result.output


def test_every_table_registry_entry_runs(store):
    _, _, frame, _ = store
    for name, make in TABLES.items():
        made = make(frame)
        assert made and all(len(t) for t in made.values()), name


@pytest.mark.slow
def test_summary_and_report_through_an_mlflow_server(store, tmp_path):
    from runner.ui import start_server, stop_server
    from tests.test_ui import free_port

    _, uri, frame, _ = store
    port = free_port()
    proc = start_server(uri, port)
    try:
        server = f"http://127.0.0.1:{port}"
        result = CliRunner().invoke(main, ["summary", NAME, "--tracking-uri", server, "-o", str(tmp_path / "s.csv")])
        assert result.exit_code == 0, result.output
        local = CliRunner().invoke(main, ["summary", NAME, "--tracking-uri", uri, "-o", str(tmp_path / "l.csv")])
        assert local.exit_code == 0
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "s.csv"), pd.read_csv(tmp_path / "l.csv"))
        result = CliRunner().invoke(main, ["report", NAME, "--tracking-uri", server, "-o", str(tmp_path / "r")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "r" / "training_curves.png").exists()
    finally:
        stop_server(proc)
