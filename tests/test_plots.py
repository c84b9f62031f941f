"""Pictures in process, on synthetic inputs: Fig. 5's layout, labels and mask outline; PNG and
TensorBoard images; the confusion matrix; the sweep plot; the message without the `viz` extra."""

import struct
import sys

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")

from vimpac_jax import plots, visualize  # noqa: E402


def _reconstruction(n=2, t=3, h=2, w=2, downsample=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = {name: rng.random((n, t, h * downsample, w * downsample, 3), dtype=np.float32)
            for name in ("original", "roundtrip", "masked", "predicted")}
    mask = np.zeros((n, t, h, w), bool)
    mask[0, 1, 0, 0] = mask[0, 1, 0, 1] = True  # a 1x2 block of tokens
    mask[1, 2, 1, 1] = True
    tokens = rng.integers(0, 8, (n, t, h, w))
    return visualize.Reconstruction(**rows, mask=mask, tokens=tokens, predicted_tokens=tokens)


def test_mask_border_is_the_inner_edge_of_the_region():
    mask = np.zeros((6, 7), bool)
    mask[1:5, 2:7] = True  # touches the right edge
    border = visualize.mask_border(mask)
    expected = mask.copy()
    expected[2:4, 3:6] = False  # the interior; column 6 is the image edge, so it is border
    np.testing.assert_array_equal(border, expected)
    assert visualize.mask_border(mask, 2).sum() == mask.sum()  # 4 rows: no pixel 2 away from the edge


def test_figure_has_labelled_rows_and_outlines_the_masked_tokens_in_rows_3_and_4():
    rec = _reconstruction()
    scale, downsample = 2, 4
    image = visualize.figure_image(rec, scale=scale)
    layout = visualize.figure_layout(rec, scale=scale)
    n, t, height, width, _ = rec.original.shape
    assert layout.margin > 0 and image.shape == layout.shape
    assert image.shape == (n * (4 * height * scale + 3 * 2) + (n - 1) * 8, layout.margin + t * (width * scale + 2) - 2, 3)
    pixels = np.repeat(np.repeat(rec.mask, downsample * scale, -2), downsample * scale, -1)
    border = visualize.mask_border(pixels, scale // 2)
    arrays = (rec.original, rec.roundtrip, rec.masked, rec.predicted)
    for i in range(n):
        for r, name in enumerate(visualize.ROWS):
            top = layout.top(i, r)
            # The row's name is written in the margin beside its cells, nowhere else.
            label = image[top:top + layout.cell_h, :layout.margin]
            assert (label != 255).any(), (i, name)
            for f in range(t):
                left = layout.left(f)
                cell = image[top:top + layout.cell_h, left:left + layout.cell_w]
                want = np.clip(np.rint(arrays[r][i, f] * 255), 0, 255).astype(np.uint8)
                want = np.repeat(np.repeat(want, scale, 0), scale, 1)
                outlined = border[i, f] if name in visualize.OUTLINED_ROWS else np.zeros(border.shape[2:], bool)
                np.testing.assert_array_equal(cell[~outlined], want[~outlined])
                assert (cell[outlined] == visualize.OUTLINE).all()
    assert border[0, 1].any() and border[1, 2].any() and not border[0, 0].any()


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(plots.decode_png(plots.encode_png(image)), image)
    path = plots.write_png(tmp_path / "sub" / "x.png", image)
    np.testing.assert_array_equal(plots.read_png(path), image)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left
    with pytest.raises(ValueError, match="uint8"):
        plots.encode_png(image.astype(np.float32))


def _events(path):
    """The Event records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return out


def test_tensorboard_images_hold_the_png(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    plots.write_tensorboard_images(tmp_path / "tb", 7, {"eval/confusion_matrix": image})
    (path,) = (tmp_path / "tb").iterdir()
    (event,) = [e for e in _events(path) if e.HasField("summary")]
    (value,) = event.summary.value
    assert event.step == 7 and value.tag == "eval/confusion_matrix"
    assert (value.image.height, value.image.width) == (6, 4)
    np.testing.assert_array_equal(plots.decode_png(value.image.encoded_image_string), image)


def test_confusion_matrix_counts_and_image():
    matrix = plots.confusion_matrix([0, 1, 2, 2, 2], [0, 2, 2, 2, 1], 3)
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        plots.confusion_matrix([3], [0], 3)
    image = plots.confusion_matrix_image(matrix, ["a", "b", "c"], title="t")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # Row-normalised "Blues": the full diagonal cell of class a is much darker than the empty (a, b).
    assert image.std() > 10
    big = plots.confusion_matrix_image(np.eye(61, dtype=np.int64) * 3)  # > 60 classes: no names or counts drawn
    assert big.shape[0] > image.shape[0]


def test_sweep_plot_numeric_and_categorical():
    numeric = plots.sweep_plot_image([(1e-3, {"eval/top1": 50.0}), (1e-4, {"eval/top1": 40.0}),
                                      (1e-2, {"eval/top1": 20.0, "eval/top5": 60.0})],
                                     "optim.lr", ["eval/top1", "eval/top5"])
    categorical = plots.sweep_plot_image([("T,H|W", {"eval/top1": 1.0}), ("T,H,W", {"eval/top1": 2.0})],
                                         "model.layout", ["eval/top1"])
    assert numeric.shape[1] > categorical.shape[1]  # two panels side by side
    with pytest.raises(ValueError, match="no metrics"):
        plots.sweep_plot_image([], "x", [])


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # `import PIL.Image` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plots.VizExtraMissing, match=r"needs Pillow.*vimpac-jax\[viz\]"):
        plots.encode_png(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(plots.VizExtraMissing, match=r"needs matplotlib.*vimpac-jax\[viz\]"):
        plots.confusion_matrix_image(np.eye(2, dtype=np.int64))


def test_evaluate_writes_the_confusion_matrix(tmp_path):
    import ml_collections

    from vimpac_jax.commands.evaluate import write_confusion_matrix

    config = ml_collections.ConfigDict({"model": {"num_classes": 3}, "class_names": ["a", "b", "c"]})
    result = {"top1": 50.0, "num_clips": 2, "crops": ["r32_center_noflip"], "num_videos": 4,
              "predictions": [{"label": l, "prediction": p} for l, p in ((0, 0), (1, 2), (2, 2), (2, 1))]}
    path = write_confusion_matrix(tmp_path, result, config, step=12)
    assert path == tmp_path / "confusion_matrix.png" and plots.read_png(path).ndim == 3
    (events,) = (tmp_path / "tensorboard").iterdir()
    (event,) = [e for e in _events(events) if e.HasField("summary")]
    assert event.step == 12 and event.summary.value[0].tag == "eval/confusion_matrix"
    np.testing.assert_array_equal(plots.decode_png(event.summary.value[0].image.encoded_image_string),
                                  plots.read_png(path))


def test_sweep_summary_plots_the_swept_value_against_the_final_metrics(tmp_path):
    from vimpac_jax import sweeps as sw

    def row(i, lr, status="ok", **metrics):
        return dict(run=f"{i:02d}", index=i, overrides={"optim.lr": lr, "seed": 0}, status=status, returncode=0,
                    step=10, metrics={"train/loss": 1.0 / (i + 1), **metrics}, note="")

    rows = [row(0, 1e-3, **{"eval/top1": 40.0}), row(1, 1e-4, **{"eval/top1": 30.0}),
            row(2, 1e-2, status="failed (rc=1)")]
    field, points, metrics = sw.plot_points(rows)
    # The varied field only (seed is the same in every run); finished runs only; eval metrics first.
    assert field == "optim.lr" and [x for x, _ in points] == [1e-3, 1e-4] and metrics == ["eval/top1"]
    path = sw.plot_summary(tmp_path, rows)
    assert path == tmp_path / sw.SUMMARY_PLOT and plots.read_png(path).ndim == 3
    (events,) = (tmp_path / "tensorboard").iterdir()
    assert [e.summary.value[0].tag for e in _events(events) if e.HasField("summary")] == ["sweep/summary"]
    assert sw.plot_summary(tmp_path / "none", [row(0, 1e-3, status="not finished")]) is None


def test_evaluate_without_the_extra_says_which_before_any_work(tmp_path, monkeypatch, capsys):
    import json

    from vimpac_jax.commands import evaluate

    (tmp_path / "config.json").write_text(json.dumps({"task": "finetune", "data": {"eval_store": str(tmp_path / "no")},
                                                        "format_version": 2}))
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "confusion_matrix.png needs Pillow" in err and "vimpac-jax[viz]" in err and "--no-pictures" in err


def test_visualize_without_the_extra_says_which_before_any_work(tmp_path, monkeypatch, capsys):
    from vimpac_jax.commands import visualize as visualize_cmd

    (tmp_path / "list.txt").write_text("a.mp4 0\n")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    args = ["--workdir", str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--videos", str(tmp_path / "list.txt"),
            "--out", str(tmp_path / "fig.png")]
    assert visualize_cmd.main(args) == 2
    err = capsys.readouterr().err
    assert "drawing Fig. 5 needs Pillow" in err and "vimpac-jax[viz]" in err and not (tmp_path / "fig.png").exists()
