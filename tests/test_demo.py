"""The built-in default's chain (`vimpac demo`) at the `smoke` preset, and `vimpac visualize`.

The smoke preset runs every stage of the README's main command on a few 16-px videos for a few
steps: dataset -> VQ tokenizer -> token stores -> pre-training -> figure -> two fine-tunes ->
multi-view tests -> `vimpac predict` on val files. Its accuracies mean nothing; that every stage
hands the next what it needs does. The fine-tuned run also serves the tests of `vimpac predict`.
"""

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("av")

from installed_copy import installed_vimpac  # noqa: E402
from vimpac_jax import plots, visualize  # noqa: E402
from vimpac_jax.commands import visualize as visualize_cmd  # noqa: E402
from vimpac_jax.data import video_decode as vd  # noqa: E402
from vimpac_jax.demo.data import PRESETS as DATA_PRESETS  # noqa: E402
from vimpac_jax.demo.chain import FIGURE_VIDEOS, format_ablation, format_table, run_ablation  # noqa: E402
from vimpac_jax.export.source import load_exportable  # noqa: E402
from vimpac_jax.models.model import build_model  # noqa: E402
from vimpac_jax.tokenizer.interface import load_tokenizer  # noqa: E402

# The commands run in process on the chain's outputs on one device, as the chain ran them.
pytestmark = pytest.mark.usefixtures("one_device_module")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`vimpac demo --preset smoke` of a non-editable install, run from outside the checkout
    (tests/installed_copy.py): the chain's one run also tests the installed configs."""
    installed, cwd = installed_vimpac(tmp_path_factory), tmp_path_factory.mktemp("cwd")
    workdir = tmp_path_factory.mktemp("demo")
    result = installed.run("demo", "--preset", "smoke", "--seed", "0", "--workdir", workdir, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, json.loads((workdir / "demo_summary.json").read_text())


@pytest.mark.slow
def test_smoke_chain_runs_every_stage(smoke):
    workdir, summary = smoke
    preset = DATA_PRESETS["smoke"]
    for split, count in (("pool", preset.pool), ("train", preset.train), ("val", preset.val)):
        meta = json.loads((workdir / "tokens" / split / "metadata.json").read_text())
        assert meta["complete"] and meta["counts"]["videos_ok"] == count and meta["counts"]["videos_failed"] == 0
        assert meta["token_shape"] == [preset.size // 8] * 2
    for name in ("pretrained", "scratch"):
        result = summary["results"][name]
        assert result["num_videos"] == preset.val and len(result["crops"]) == 3
        assert 0.0 <= result["top1"] <= 100.0
        config = json.loads((workdir / f"finetune_{name}" / "config.json").read_text())
        assert config["init_from"] == (str(workdir / "pretrain") if name == "pretrained" else "")
    table = format_table(summary)
    assert "VIMPAC pre-training" in table and "scratch (same budget)" in table
    assert str(workdir / "reconstruction.png") in table


def _figure_inputs(workdir, num_videos):
    model_cfg, variables = load_exportable(workdir / "pretrain")
    tokenizer = load_tokenizer(workdir / "tokenizer_run" / "tokenizer")
    size = model_cfg["height"] * tokenizer.downsample
    (center,) = vd.variants_for("pretrain", size)
    clip_fps = json.loads((workdir / "pretrain" / "config.json").read_text())["data"]["clip_fps"]
    paths = visualize_cmd.read_video_paths(str(workdir / "val_abs.txt"), None)[:num_videos]
    frames = np.stack([vd.decode_variants(p, clip_fps, [center], max_frames=model_cfg["clip_len"])[center.name]
                       for p in paths])
    return build_model(model_cfg), variables, tokenizer, frames


@pytest.mark.slow
def test_reconstruction_differs_from_the_masked_input_exactly_where_masked(smoke):
    workdir, _ = smoke
    model, variables, tokenizer, frames = _figure_inputs(workdir, 3)
    rec = visualize.reconstruct(model, variables, tokenizer, frames, jax.random.key(3), num_blocks=1)
    assert rec.mask.any() and not rec.mask.all()
    mask_px = np.broadcast_to(visualize.token_mask_to_pixels(rec.mask, tokenizer.downsample), rec.masked.shape)
    # Outside the mask every row after the first shows the tokenizer's round-trip.
    np.testing.assert_array_equal(rec.predicted[~mask_px], rec.masked[~mask_px])
    np.testing.assert_array_equal(rec.masked[~mask_px], rec.roundtrip[~mask_px])
    np.testing.assert_array_equal(rec.predicted_tokens[~rec.mask], rec.tokens[~rec.mask])
    # Inside it, the masked row is grey and the prediction is decoded pixels: every masked token's
    # block differs from the grey somewhere.
    assert np.all(rec.masked[mask_px] == visualize.MASK_GREY)
    d = tokenizer.downsample
    diff = np.abs(rec.predicted - rec.masked).max(axis=-1)  # [N, T, H, W]
    n, t, h, w = rec.mask.shape
    per_token = diff.reshape(n, t, h, d, w, d).max(axis=(3, 5))
    assert np.all(per_token[rec.mask] > 0) and np.all(per_token[~rec.mask] == 0)
    assert rec.predicted_tokens.min() >= 0 and rec.predicted_tokens.max() < tokenizer.vocab_size


@pytest.mark.slow
def test_demo_figure_is_the_reconstruction_of_the_first_val_clips(smoke):
    workdir, _ = smoke
    image = plots.read_png(workdir / "reconstruction.png")
    model, variables, tokenizer, frames = _figure_inputs(workdir, FIGURE_VIDEOS)
    blocks = json.loads((workdir / "pretrain" / "config.json").read_text())["pretrain"]["mask_blocks"]
    rec = visualize.reconstruct(model, variables, tokenizer, frames, jax.random.key(0), blocks)
    np.testing.assert_array_equal(image, visualize.figure_image(rec))
    size, t = frames.shape[2], frames.shape[1]
    margin = visualize.figure_layout(rec).margin  # the row labels' column
    assert image.shape == (FIGURE_VIDEOS * (4 * 4 * size + 3 * 2) + (FIGURE_VIDEOS - 1) * 8,
                           margin + t * 4 * size + (t - 1) * 2, 3)


@pytest.mark.slow
def test_visualize_cli_skips_bad_videos_and_refuses_bad_input(smoke, tmp_path, capsys):
    workdir, _ = smoke
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    good = visualize_cmd.read_video_paths(str(workdir / "val_abs.txt"), None)[:2]
    videos = tmp_path / "list.txt"
    videos.write_text("\n".join([str(bad), *good]) + "\n")
    out = tmp_path / "fig.png"
    assert visualize_cmd.main(["--workdir", str(workdir), "--videos", str(videos), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"skipped {bad}" in captured.err and "2 clips" in captured.out
    assert plots.read_png(out).shape[0] == 2 * (4 * 4 * 16 + 3 * 2) + 8

    def refused(args, words):
        assert visualize_cmd.main(args) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err

    refused(["--workdir", str(workdir), "--videos", str(videos), "--out", str(tmp_path / "x.jpg")], ["--out", ".png"])
    refused(["--workdir", str(workdir / "pretrain"), "--videos", str(videos), "--out", str(out)], ["--tokenizer"])
    refused(["--workdir", str(workdir / "finetune_scratch"), "--tokenizer", str(workdir / "tokenizer_run" / "tokenizer"),
             "--videos", str(videos), "--out", str(out)], ["pre-training model"])
    refused(["--workdir", str(workdir), "--videos", str(tmp_path / "nothing.txt"), "--out", str(out)], ["nothing.txt"])


@pytest.mark.slow
def test_ablation_runs_every_variant_with_its_losses(smoke, monkeypatch):
    """The orchestration of run_ablation (which runs, with which loss weights, initialised from
    what); training itself is the smoke chain's, so it is stubbed here to keep the suite short."""
    import vimpac_jax.demo.chain as demo

    workdir, _ = smoke
    calls = []

    def fake_pretrain(prepared, run_dir, preset, seed, overrides=None):
        config = demo.demo_config("pretrain", preset, {"seed": seed, **overrides})
        calls.append(("pretrain", run_dir.name, seed, config.pretrain.mlm_weight, config.pretrain.nce_weight))
        return run_dir

    def fake_finetune(prepared, run_dir, preset, seed, init_from):
        calls.append(("finetune", run_dir.name, seed, str(init_from)))
        assert prepared["stores"]["train"] == workdir / "tokens" / "train"  # the shared stores
        return {"top1": 10.0 * len(calls)}

    monkeypatch.setattr(demo, "pretrain", fake_pretrain)
    monkeypatch.setattr(demo, "finetune_and_test", fake_finetune)
    summary = run_ablation(workdir, preset="smoke", seeds=(5, 6))
    seed_dir = workdir / "ablation" / "seed5"
    assert calls[:7] == [
        ("finetune", "finetune_scratch", 5, ""),
        ("pretrain", "pretrain_mask_only", 5, 1.0, 0.0),
        ("finetune", "finetune_mask_only", 5, str(seed_dir / "pretrain_mask_only")),
        ("pretrain", "pretrain_contrastive_only", 5, 0.0, 1.0),
        ("finetune", "finetune_contrastive_only", 5, str(seed_dir / "pretrain_contrastive_only")),
        ("pretrain", "pretrain_both", 5, 1.0, 1.0),
        ("finetune", "finetune_both", 5, str(seed_dir / "pretrain_both"))]
    assert [c[2] for c in calls[7:]] == [6] * 7
    assert summary["top1"] == {"scratch": [10.0, 80.0], "mask_only": [30.0, 100.0],
                               "contrastive_only": [50.0, 120.0], "both": [70.0, 140.0]}
    table = format_ablation(summary)
    assert table.count("\n") == 5 and "| no pre-training | 45.0 ± 49.5 |" in table


def test_ablation_table_statistics():
    summary = {"seeds": [0, 1, 2], "top1": {"scratch": [10.0, 20.0, 30.0], "mask_only": [50.0, 50.0, 50.0],
                                            "contrastive_only": [1.0, 2.0, 3.0], "both": [60.0, 62.0, 64.0]}}
    table = format_ablation(summary)
    assert "| no pre-training | 20.0 ± 10.0 | 10.0-30.0 | 10.0, 20.0, 30.0 | 41.3 |" in table
    assert "| mask + contrastive | 62.0 ± 2.0 | 60.0-64.0 |" in table


@pytest.mark.slow
def test_mlm_codes_must_cover_the_store_tokenizer_codes(smoke):
    from vimpac_jax.tasks.pretrain import _check_mlm_codes

    workdir, _ = smoke
    store = str(workdir / "tokens" / "pool")  # its tokenizer has 16 codes (the smoke preset)
    _check_mlm_codes({"mlm_codes": 16}, store)
    _check_mlm_codes({"mlm_codes": None}, store)
    with pytest.raises(ValueError, match="mlm_codes=8 .* 16 codes"):
        _check_mlm_codes({"mlm_codes": 8}, store)


# ------------------------------------------------------------------------------------------
# `vimpac predict` / `vimpac_jax.load_classifier` on the chain's fine-tuned run (its stores were
# made by `vimpac tokenize` from the generated val videos; test_predict.py has the released model)


def _val_videos(workdir) -> tuple[list[str], list[int]]:
    rows = [line.split() for line in (workdir / "val_abs.txt").read_text().splitlines() if line.strip()]
    return [path for path, _ in rows], [int(label) for _, label in rows]


@pytest.mark.slow
def test_demo_ends_with_predictions_of_two_val_videos(smoke):
    workdir, summary = smoke
    paths, labels = _val_videos(workdir)
    names = (workdir / "data" / "classes.txt").read_text().split()
    assert [p["path"] for p in summary["predictions"]] == paths[:2]
    assert [p["true"] for p in summary["predictions"]] == [names[label] for label in labels[:2]]
    table = format_table(summary)
    for p in summary["predictions"]:
        assert len(p["top"]) == 3 and all(name in names for name, _ in p["top"])
        assert f"(true: {p['true']}): {p['top'][0][0]} {p['top'][0][1]:.2f}" in table


@pytest.mark.slow
def test_predict_equals_evaluate_on_the_same_files(smoke, tmp_path, capsys):
    from vimpac_jax.commands import predict as predict_cmd

    workdir, _ = smoke
    run = workdir / "finetune_pretrained"
    # The multi-view test that ended the chain's fine-tuning (what `vimpac evaluate --workdir RUN`
    # repeats: the last checkpoint, the run's 2 clips x 3 crops) wrote these predictions.
    with open(run / "predictions.csv") as f:
        evaluated = {Path(row["video_id"]).name: (int(row["prediction"]), float(row["score"]))
                     for row in csv.DictReader(f)}
    names = (workdir / "data" / "classes.txt").read_text().split()
    out = tmp_path / "pred.json"
    # The val list itself as VIDEO: read like `vimpac tokenize --videos`.
    rc = predict_cmd.main(["--workdir", str(run), str(workdir / "val_abs.txt"), "--top", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert result["views"]["clips"] == 2 and len(result["views"]["crops"]) == 3  # the run's 2 clips x 3 crops
    assert result["model"]["kind"] == "workdir" and result["model"]["step"] is not None and not result["failed"]
    assert len(result["predictions"]) == len(evaluated) == DATA_PRESETS["smoke"].val
    for pred in result["predictions"]:
        index, score = evaluated[Path(pred["path"]).stem]
        assert pred["top"][0]["class"] == names[index]
        assert pred["top"][0]["probability"] == pytest.approx(score, abs=2e-6)
        assert len(pred["top"]) == 3 and pred["path"] in printed


@pytest.mark.slow
def test_classifier_api_reuses_its_compilation_and_matches_the_stored_tokens(smoke):
    import vimpac_jax
    from vimpac_jax.data import pipelines, token_store

    workdir, _ = smoke
    paths, _ = _val_videos(workdir)
    clf = vimpac_jax.load_classifier(workdir / "finetune_pretrained")
    first = clf.predict(paths[0], top=None)
    assert len(first) == clf.num_classes and sum(p for _, p in first) == pytest.approx(1.0, abs=1e-5)

    # The stored tokens of that video, cut into views by the test's code, give the same scores:
    # decoding + tokenizing the file here is what `vimpac tokenize` stored.
    index = pipelines.load_index(workdir / "tokens" / "val")
    video = [Path(v).name for v in index.video_ids].index(Path(paths[0]).stem)
    video_id = index.video_ids[video]
    by_variant = {r["variant"]: r["tokens"] for r in token_store.iter_videos(index.store_dir)
                  if r["video_id"] == video_id}
    stored = [by_variant[v.name] for v in clf.protocol.crops]
    views = pipelines.test_views(stored, clf.protocol.clip_len, clf.protocol.clip_step, clf.protocol.num_clips)

    traces = []

    def on_trace(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_trace)
    try:
        from_tokens = clf.predict_tokens(views, top=None)
        again = clf.predict(paths[0], top=None)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_trace)
    assert traces == []  # loaded once: later calls of a seen shape never trace (nor compile) again
    assert [n for n, _ in from_tokens] == [n for n, _ in first] and again == first
    np.testing.assert_allclose([p for _, p in from_tokens], [p for _, p in first], atol=1e-6)
    t, h, w = clf.protocol.clip_len, clf.model_config["height"], clf.model_config["width"]
    with pytest.raises(ValueError, match=rf"\[B, {t}, {h}, {w}\]"):
        clf.predict_tokens(np.zeros((2, t + 1, h, w), np.int32))


@pytest.mark.slow
def test_predict_lists_and_skips_bad_files(smoke, tmp_path, capsys):
    from vimpac_jax.commands import predict as predict_cmd

    workdir, _ = smoke
    paths, _ = _val_videos(workdir)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    bad = [tmp_path / "missing.mp4", tmp_path / "text.mp4", tmp_path / "empty.mp4"]
    out = tmp_path / "pred.json"
    rc = predict_cmd.main(["--workdir", str(workdir / "finetune_pretrained"), paths[0], *map(str, bad), paths[1],
                           "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    result = json.loads(out.read_text())
    assert [p["path"] for p in result["predictions"]] == paths[:2]
    reasons = {Path(f["path"]).name: f["error"] for f in result["failed"]}
    assert set(reasons) == {"missing.mp4", "text.mp4", "empty.mp4"}
    assert "not found" in reasons["missing.mp4"] and "0 bytes" in reasons["empty.mp4"]
    assert "cannot open" in reasons["text.mp4"]
    assert all(f"skipped {path}" in captured.err for path in bad)
    assert "2 predicted, 3 failed" in captured.out


@pytest.mark.slow
def test_predict_from_a_stablehlo_export_and_tokenizer_checks(smoke, tmp_path):
    import vimpac_jax
    from vimpac_jax.commands import export as export_cmd
    from vimpac_jax.tokenizer.testing import write_random_vq_tokenizer
    from vimpac_jax.predict import PredictError

    workdir, _ = smoke
    run, tokenizer = workdir / "finetune_pretrained", workdir / "tokenizer_run" / "tokenizer"
    paths, _ = _val_videos(workdir)
    from_run = vimpac_jax.load_classifier(run)
    export = tmp_path / "export"
    assert export_cmd.main(["--workdir", str(run), "--format", "stablehlo", "--out", str(export),
                            "--platforms", "cpu"]) == 0
    with pytest.raises(PredictError, match="pass --tokenizer"):
        vimpac_jax.load_classifier(export)
    # An export records no protocol: given the run's, it scores like the run.
    exported = vimpac_jax.load_classifier(export, tokenizer=tokenizer, num_clips=2, fps=from_run.protocol.fps,
                                          class_names=from_run.class_names)
    assert exported.protocol == from_run.protocol and exported.identity["kind"] == "stablehlo"
    for x, y in zip(exported.predict_files(paths[:3]), from_run.predict_files(paths[:3])):
        np.testing.assert_allclose(x.probs, y.probs, atol=1e-5)
    # A run's tokenizer is recorded: another one (same kind and config, other weights) is refused.
    other = write_random_vq_tokenizer(tmp_path / "other", codes=16, seed=1)
    with pytest.raises(PredictError, match="not the one that made .*weights_sha256"):
        vimpac_jax.load_classifier(run, tokenizer=other)


def test_the_figure_decodes_videos_at_the_rate_of_the_runs_clips(tmp_path):
    """Fig. 5 cuts its clips as the run did: data.clip_fps when set, else (None: the stored fps)
    the training store's fps from its metadata.json, else the README's pre-training rate."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "metadata.json").write_text(json.dumps({"complete": True, "fps": 16.0, "format_version": 1,
                                                    "layout": "chunked", "chunk_frames": 16}))
    run = {"data": {"train_store": str(store), "clip_fps": None}}
    meta = visualize._train_store_meta(run)
    assert visualize.clip_fps_of_run(run, meta) == 16.0
    assert visualize.clip_fps_of_run({"data": {"train_store": str(store), "clip_fps": 4.0}}, meta) == 4.0
    missing = {"data": {"train_store": str(tmp_path / "gone"), "clip_fps": None}}
    assert visualize._train_store_meta(missing) == {}
    assert visualize.clip_fps_of_run(missing, {}) == visualize.DEFAULT_CLIP_FPS == 2.0
    assert visualize.clip_fps_of_run({}, {}) == 2.0  # a model checkpoint without its workdir
