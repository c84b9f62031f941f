"""The project's own VQ tokenizer (vimpac_jax.tokenizer.vq): EMA codebook math, dead-code
restarts, the straight-through gradient, a tiny model trained on CPU, tokenizer directories,
the config presets and the frame pool of vq_data.

The CPU budget is dominated by one module-scoped training run (`trained`): compiling the
init and the train step, then 200 steps of a 32 px model. It is a training run, so its two
tests (what training reaches) are in the slow layer; the fast layer saves and loads an
initialised model (`initialised`) and runs functions on hand-made arrays.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OPTIMIZED
from vimpac_jax.config_utils import load_config
from vimpac_jax.configs import tokenizer as tokenizer_config
from vimpac_jax.tokenizer import store, vq, vq_data, vq_train

REPO = Path(__file__).resolve().parents[1]

BACKGROUNDS = np.array([[0, 0, 0], [0.3, 0.3, 0.3], [0.1, 0.1, 0.4]], np.float32)
PALETTE = np.array([[1, 0.1, 0.1], [0.1, 0.9, 0.2], [0.2, 0.3, 1], [1, 0.9, 0.1]], np.float32)


def moving_shapes(num_videos: int, frames_per_video: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """float32 [num_videos · frames_per_video, size, size, 3] in [0, 1]: per video, a background
    colour and a square and a disc of palette colours moving in straight lines and bouncing off
    the borders. Structured (a tokenizer can learn it) yet varied (the mean frame is a blur)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = []
    for _ in range(num_videos):
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        shapes = [(kind, PALETTE[rng.integers(len(PALETTE))], rng.uniform(size / 8, size / 4),
                   rng.uniform(0, size, 2), rng.uniform(-size / 16, size / 16, 2)) for kind in ("square", "disc")]
        for t in range(frames_per_video):
            img = np.broadcast_to(bg, (size, size, 3)).copy()
            for kind, colour, r, p0, v in shapes:
                span = size - 2 * r  # reflect the free path into [r, size - r]
                q = (p0 + v * t - r) % (2 * span)
                cy, cx = r + np.minimum(q, 2 * span - q)
                if kind == "square":
                    mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
                else:
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                img[mask] = colour
            out.append(img)
    return np.stack(out)


def fast_init():
    """Non-partitionable threefry while initialising: XLA:CPU compiles the ~50 parameter
    initialisers about 3x faster that way (measured: ~27 vs ~8 CPU-s). Only the random values
    of the test model's initial weights depend on it."""
    ctx = getattr(jax, "threefry_partitionable", None)
    return ctx(False) if ctx is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------
# EMA codebook statistics on hand-made batches


# One compilation each instead of one per primitive in eager mode.
quantize = jax.jit(vq.quantize)
ema_update = jax.jit(vq_train.ema_update)
restart_dead_codes = jax.jit(vq_train.restart_dead_codes)


def _stats(codebook, cluster_size=None):
    codebook = jnp.asarray(codebook, jnp.float32)
    cluster_size = jnp.ones(len(codebook)) if cluster_size is None else jnp.asarray(cluster_size, jnp.float32)
    return {"codebook": codebook, "cluster_size": cluster_size, "embed_sum": codebook * cluster_size[:, None]}


def test_quantize_picks_nearest_code_and_logits_are_negative_squared_distances():
    codebook = np.array([[0, 0], [10, 10], [-5, 5]], np.float32)
    z = np.array([[1, 1], [2, 0], [9, 11], [-4, 4]], np.float32)
    tokens, logits, z_q = quantize(jnp.asarray(z), jnp.asarray(codebook))
    np.testing.assert_array_equal(tokens, [0, 0, 1, 2])
    expected = -((z[:, None, :] - codebook[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(z_q, codebook[[0, 0, 1, 2]])


def test_ema_update_matches_hand_computation():
    stats = _stats([[0, 0], [10, 10], [-5, 5]])
    z = jnp.array([[1, 1], [2, 0], [9, 11]], jnp.float32)
    tokens = jnp.array([0, 0, 1])
    new = ema_update(stats, z, tokens, 0.5, 0.0)
    # counts [2, 1, 0], sums [[3, 1], [9, 11], [0, 0]]; x <- 0.5 x + 0.5 batch.
    np.testing.assert_allclose(new["cluster_size"], [1.5, 1.0, 0.5])
    np.testing.assert_allclose(new["embed_sum"], [[1.5, 0.5], [9.5, 10.5], [-2.5, 2.5]])
    # An unused code keeps its place: its sum and count decay together.
    np.testing.assert_allclose(new["codebook"], [[1.0, 1 / 3], [9.5, 10.5], [-5, 5]], rtol=1e-6)

    # Laplace smoothing: sizes become (c + eps) / (n + K eps) * n, total mass unchanged.
    eps = 0.1
    smoothed = ema_update(stats, z, tokens, 0.5, eps)
    c = np.array([1.5, 1.0, 0.5])
    n = c.sum()
    expected = np.array([[1.5, 0.5], [9.5, 10.5], [-2.5, 2.5]]) / ((c + eps) / (n + 3 * eps) * n)[:, None]
    np.testing.assert_allclose(smoothed["codebook"], expected, rtol=1e-6)


def test_ema_codebook_moves_to_the_mean_of_its_vectors():
    stats = _stats([[0, 0], [10, 10], [-5, 5]])
    z = jnp.array([[1, 1], [2, 0], [9, 11], [11, 9], [10, 12]], jnp.float32)
    update = jax.jit(lambda s: vq_train.ema_update(s, z, vq.quantize(z, s["codebook"])[0], 0.8, 1e-5))
    distances = []
    for _ in range(60):
        stats = update(stats)
        distances.append(float(jnp.linalg.norm(stats["codebook"][0] - jnp.array([1.5, 0.5]))))
    assert distances[0] > 0.5 and distances[-1] < 1e-3, distances[::10]
    np.testing.assert_allclose(stats["codebook"][1], [10, 32 / 3], atol=1e-3)
    # (Code 2, never assigned, is not checked: after 60 steps at decay 0.8 its count 0.8^60 is
    # below epsilon and the smoothing pulls it toward 0; restarts replace such codes long before.)


def test_dead_code_restart_revives_an_unused_code():
    # Code 1 sits far from the data: never the nearest, its EMA count has decayed below 1.
    stats = _stats([[0, 0], [100, 100], [5, 5], [-5, -5]], cluster_size=[6.0, 0.05, 3.0, 2.0])
    z = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)) + 2, jnp.float32)
    assert 1 not in np.asarray(quantize(z, stats["codebook"])[0])

    new, restarted = restart_dead_codes(stats, z, jax.random.key(0), 1.0)
    assert int(restarted) == 1
    assert any(np.array_equal(new["codebook"][1], row) for row in np.asarray(z))  # a batch vector
    assert float(new["cluster_size"][1]) == 1.0
    np.testing.assert_allclose(new["embed_sum"][1], new["codebook"][1])
    for k in (0, 2, 3):  # live codes untouched
        np.testing.assert_array_equal(new["codebook"][k], stats["codebook"][k])
        assert float(new["cluster_size"][k]) == float(stats["cluster_size"][k])

    # Revived: it now wins vectors, and an EMA step on this batch keeps it alive.
    tokens = quantize(z, new["codebook"])[0]
    assert int(jnp.sum(tokens == 1)) >= 1
    after = ema_update(new, z, tokens, 0.9, 1e-5)
    assert float(after["cluster_size"][1]) >= 1.0

    # A threshold of 0 disables restarts; with M >= K dead codes get distinct vectors.
    same, none = restart_dead_codes(stats, z, jax.random.key(0), 0.0)
    assert int(none) == 0 and np.array_equal(same["codebook"], stats["codebook"])
    all_dead, n = restart_dead_codes(stats, z, jax.random.key(1), 100.0)
    assert int(n) == 4 and len({tuple(np.asarray(r)) for r in all_dead["codebook"]}) == 4


def test_straight_through_passes_the_decoder_gradient_to_the_encoder_output():
    quantizer = vq.VectorQuantizer(codebook_size=4, embedding_dim=3)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 3)), jnp.float32)
    variables = jax.jit(quantizer.init)(jax.random.key(0), z)  # jitted: one compile, not one per op
    w = jnp.asarray(np.random.default_rng(2).normal(size=z.shape), jnp.float32)

    def f(z):
        out = quantizer.apply(variables, z)
        return jnp.sum(w * out["z_st"]), out

    grad, out = jax.jit(jax.grad(f, has_aux=True))(z)
    np.testing.assert_allclose(out["z_st"], out["z_q"], atol=1e-6)  # forward: the codes (z + (z_q - z))
    np.testing.assert_allclose(grad, w)  # backward: identity to z
    assert not np.allclose(out["z_q"], z)  # (so the test is not trivial)


# ------------------------------------------------------------------------------------------
# A tiny tokenizer trained on CPU


STEPS = 200


@pytest.fixture(scope="module")
def trained():
    """Train the 'tiny' preset (32 px, 64 codes, widths 16/32/64/64) for STEPS steps of 8
    frames from 64 synthetic videos; evaluate on 8 other videos."""
    config = tokenizer_config.get_config("tiny")
    config.train.num_steps = STEPS
    config.data.batch_size = 8
    config.optim.update(learning_rate=3e-3, warmup=10)
    # uint8, as vq_data.frame_dataset yields them (train_step scales them on the device).
    train = (moving_shapes(64, 8, seed=0) * 255).round().astype(np.uint8)
    test = moving_shapes(8, 8, seed=1)
    with fast_init():
        state = vq_train.init_state(config.model, config.optim, config.tokenizer, config.train.num_steps,
                                    jax.random.key(config.seed))
    init_params = jax.tree.map(np.asarray, state.params)
    # This program runs 200 times: compiled with LLVM optimisation (conftest.OPTIMIZED; the suite
    # turns it off), it costs ~4 s less CPU in all than compiling cheaply.
    step = jax.jit(vq_train.train_step, donate_argnums=0, compiler_options=OPTIMIZED)
    rng = np.random.default_rng(0)
    key = jax.random.key(1)
    history = []
    for i in range(STEPS):
        batch = jnp.asarray(train[rng.integers(0, len(train), config.data.batch_size)])
        state, metrics = step(state, batch, jax.random.fold_in(key, i))
        history.append(metrics)
    history = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(history))
    return dict(config=config, state=state, test=test, history=history, init_params=init_params)


@pytest.fixture(scope="module")
def initialised():
    """The 'tiny' preset initialised as `trained` initialises it (same seed: the parameters it
    starts from), its step counter set to STEPS (what a save records), and 8 held-out frames: for
    what does not depend on training (save and load)."""
    config = tokenizer_config.get_config("tiny")
    with fast_init():
        state = vq_train.init_state(config.model, config.optim, config.tokenizer, STEPS, jax.random.key(config.seed))
    return dict(config=config, state=state.replace(step=jnp.asarray(STEPS, state.step.dtype)),
                test=moving_shapes(8, 1, seed=1))


@pytest.mark.slow
def test_tiny_tokenizer_beats_the_mean_frame(trained):
    config, state, test = trained["config"], trained["state"], trained["test"]
    tok = state.tokenizer_params()
    tokens, logits = vq.vq_encode(tok, config.model, test)
    recon = vq.vq_decode(tok, config.model, tokens)
    mse = float(jnp.mean((recon - test) ** 2))
    baseline = float(vq_train.mean_frame_mse(test))
    used = len(np.unique(np.asarray(tokens)))
    h = trained["history"]
    print(f"\nheld-out MSE {mse:.4f} vs mean-frame MSE {baseline:.4f}: ratio {mse / baseline:.3f}; "
          f"PSNR {10 * np.log10(1 / mse):.1f} dB; {used}/64 codes used on 64 held-out frames; "
          f"train: first/last recon_mse {h['recon_mse'][0]:.4f}/{h['recon_mse'][-1]:.4f}, "
          f"last perplexity {h['perplexity'][-1]:.1f}, restarts {int(h['restarted'].sum())}")
    # The mean frame is the best input-independent prediction; a tokenizer whose 16 tokens of
    # 6 bits carry where the shapes are must do far better. Measured: ratio 0.34 here, 0.34-0.36
    # with three other init/data seeds (jax 0.10.2, CPU).
    assert mse < 0.5 * baseline
    assert used > 8
    # Shapes: 8x down-sampling, logits over the 64 codes whose argmax is the token.
    assert tokens.shape == (64, 4, 4) and tokens.dtype == jnp.int32
    assert logits.shape == (64, 4, 4, 64)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), tokens)
    assert recon.shape == test.shape and float(recon.min()) >= 0 and float(recon.max()) <= 1


@pytest.mark.slow
def test_training_metrics_report_learning_and_codebook_use(trained):
    h = trained["history"]
    for name in ("loss", "recon_mse", "psnr", "commitment", "perplexity", "codes_used", "codes_alive",
                 "restarted", "learning_rate"):
        assert h[name].shape == (STEPS,) and np.isfinite(h[name]).all(), name
    late, early = h["recon_mse"][-20:].mean(), h["recon_mse"][:5].mean()
    assert late < 0.5 * early, (early, late)
    assert h["psnr"][-20:].mean() > h["psnr"][:5].mean() + 3
    # The first step restarts the codes no vector chose (a data-dependent initialisation).
    assert h["restarted"][0] > 32
    assert h["perplexity"][-20:].mean() > 8 and h["codes_used"][-1] > 0.2
    assert h["learning_rate"][0] == 0 and h["learning_rate"].max() == pytest.approx(3e-3, rel=1e-3)
    assert int(trained["state"].step) == STEPS
    # Training moved the encoder down to its first layer (test_reconstruction_gradient_reaches_the_encoder
    # shows the gradient path on a small instance).
    assert not np.allclose(trained["init_params"]["encoder"]["input"]["kernel"],
                           trained["state"].params["encoder"]["input"]["kernel"])


def test_reconstruction_gradient_reaches_the_encoder():
    # The wiring encoder -> quantiser (straight-through) -> decoder, on a block-free instance
    # (n_blk_per_group=0 leaves the input, pooling/upsampling and output convs): the same
    # __call__, a fraction of the compile time of the trained model's gradient.
    model = vq.VQTokenizer(codebook_size=8, embedding_dim=4, widths=(8, 8, 8, 8), n_blk_per_group=0)
    images = jnp.asarray(moving_shapes(2, 1, seed=1))
    with fast_init():
        variables = jax.jit(model.init)(jax.random.key(0), images)

    def recon_loss(params):  # no commitment term: only the straight-through path feeds the encoder
        out = model.apply({"params": params, "vq_stats": variables["vq_stats"]}, images)
        return jnp.mean((out["recon"] - vq.to_model_range(images)) ** 2)

    grads = jax.jit(jax.grad(recon_loss))(variables["params"])
    for name in ("input", "output"):
        assert float(jnp.abs(grads["encoder"][name]["kernel"]).max()) > 0, name


def test_save_load_round_trip_gives_identical_tokens(initialised, tmp_path):
    config, state, test = initialised["config"], initialised["state"], initialised["test"]
    dst = vq.save_vq_tokenizer(tmp_path / "tok", config.model, state, metadata={"preset": "tiny"})
    meta = store.read_meta(dst)
    assert meta["kind"] == "vq" and meta["step"] == STEPS and meta["metadata"] == {"preset": "tiny"}
    assert meta["config"]["vocab_size"] == 64 and meta["config"]["downsample"] == 8
    loaded_config, params = vq.load_vq_tokenizer(dst)
    assert loaded_config == vq.model_json_config(config.model)
    assert set(params) == {"encoder", "decoder", "codebook"} and params["codebook"].shape == (64, 16)
    ours, _ = vq.vq_encode(state.tokenizer_params(), config.model, test)
    theirs, _ = vq.vq_encode(params, loaded_config, test)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(vq.vq_decode(state.tokenizer_params(), config.model, ours),
                                  vq.vq_decode(params, loaded_config, theirs))

    # The kind-independent interface loads it (the 'vq' entry of TOKENIZER_KINDS).
    from vimpac_jax.tokenizer import interface
    tokenizer = interface.load_tokenizer(dst)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.downsample) == ("vq", 64, 8)
    assert interface.read_grid(dst) == tokenizer.grid  # from tokenizer.json alone, before any weight
    test_u8 = (test * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(tokenizer.encode_tokens(test_u8), vq.vq_encode(params, loaded_config, test_u8)[0])
    np.testing.assert_allclose(tokenizer.decode(ours), vq.vq_decode(params, loaded_config, ours), atol=1e-6)

    with pytest.raises(FileExistsError):
        vq.save_vq_tokenizer(dst, config.model, state)
    # A config that does not describe the state is refused before anything is written.
    wrong = dict(vq.model_json_config(config.model), codebook_size=32)
    with pytest.raises(ValueError, match="does not match"):
        vq.save_vq_tokenizer(tmp_path / "wrong", wrong, state)
    assert not (tmp_path / "wrong").exists()


def test_load_refuses_other_kinds_and_bad_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / store.META_FILE).write_text(json.dumps({"kind": "dalle", "config": {}}))
    with pytest.raises(ValueError, match="not 'vq'"):
        vq.load_vq_tokenizer(tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        vq.load_vq_tokenizer(tmp_path / "missing")
    config = tokenizer_config.get_config("tiny").model
    with pytest.raises(ValueError, match="multiples of 8"):
        vq.vq_encode({}, config, np.zeros((1, 30, 32, 3), np.float32))
    with pytest.raises(ValueError, match="widths"):
        vq.model_json_config(dict(vq.model_json_config(config), widths=[16, 32, 64]))


# ------------------------------------------------------------------------------------------
# Config


def test_config_presets():
    for preset, (k, size) in {"tiny": (64, 32), "small": (1024, 128), "dalle_like": (8192, 128)}.items():
        config = tokenizer_config.get_config(preset)
        assert config.model.codebook_size == k and config.data.size == size
        assert vq.model_json_config(config.model)["vocab_size"] == k  # a valid model block
    assert tokenizer_config.get_config("dalle_like").model.widths == (256, 512, 1024, 2048)
    local = tokenizer_config.get_config("small,runlocal")
    assert local.train.num_steps == 20 and local.data.workers == 0
    with pytest.raises(ValueError, match="preset"):
        tokenizer_config.get_config("preset=huge")
    config = load_config(["--config", f"{REPO}/configs/tokenizer.py:tiny", "--config.optim.learning_rate=0.01",
                          "--config.data.videos=/x/list.txt"])
    assert config.optim.learning_rate == 0.01 and config.data.videos == "/x/list.txt"
    with pytest.raises(ValueError, match="bad --config"):
        load_config(["--config", f"{REPO}/configs/tokenizer.py:tiny", "--config.optim.learning_rat=0.01"])


# ------------------------------------------------------------------------------------------
# Frames from video files


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    pytest.importorskip("av", reason="PyAV not installed: pip install 'vimpac-jax[video]'")
    sys.path.insert(0, str(Path(__file__).parent))
    from video_fixtures import write_video

    d = tmp_path_factory.mktemp("videos")
    frames = (moving_shapes(2, 12, size=48, seed=3) * 255).astype(np.uint8)
    a = write_video(d / "a.mp4", frames[:12], rate=10)
    (d / "sub").mkdir()
    b = write_video(d / "sub" / "b.mp4", frames[12:], rate=10)
    bad = d / "broken.mp4"
    bad.write_text("not a video\n" * 20)
    return dict(dir=d, good=[a, b], bad=bad)


def test_frame_pool_decodes_once_and_skips_bad_files(videos):
    paths = vq_data.resolve_videos(str(videos["dir"]))
    assert sorted(Path(p).name for p in paths) == ["a.mp4", "b.mp4", "broken.mp4"]
    assert vq_data.resolve_videos(str(videos["dir"] / "*.mp4")) == sorted(
        str(p) for p in (videos["good"][0], videos["bad"]))
    pool = vq_data.load_frame_pool(paths, fps=5, size=32, max_frames_per_video=4)
    # 12 frames at 10 fps = 1.2 s -> ceil(1.2 * 5) = 6 sampled, capped at 4 per video.
    assert pool.frames.shape == (8, 32, 32, 3) and pool.frames.dtype == np.uint8
    good = [paths.index(str(p)) for p in videos["good"]]
    np.testing.assert_array_equal(pool.sources, np.repeat(sorted(good), 4))
    assert [Path(p).name for p, _ in pool.skipped] == ["broken.mp4"]
    assert pool.frames.std() > 20  # real picture content, not blank frames

    data = tokenizer_config.get_config("tiny,runlocal").data
    data.update(videos=str(videos["dir"] / "*.mp4"), fps=5.0, max_frames_per_video=2)
    from_config = vq_data.frame_pool_from_config(data)
    assert from_config.frames.shape == (2, 32, 32, 3) and len(from_config.skipped) == 1

    with pytest.raises(ValueError, match="multiple of 8"):
        vq_data.load_frame_pool(paths, fps=5, size=30)
    with pytest.raises(MemoryError, match="max_pool_gib"):
        vq_data.load_frame_pool(paths, fps=5, size=32, max_pool_gib=1e-6)
    with pytest.raises(ValueError, match="none of the 1 videos"):
        vq_data.load_frame_pool([videos["bad"]], fps=5, size=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vq_data.resolve_videos(str(videos["dir"] / "nope.txt"))
    with pytest.raises(ValueError, match="empty"):
        vq_data.resolve_videos("")


def test_frame_dataset_is_a_function_of_seed_and_step():
    frames = (np.arange(10)[:, None, None, None] * np.ones((1, 8, 8, 3))).astype(np.uint8)
    frames[:, :, :4] += 100  # left half brighter: flips are visible
    ds = vq_data.frame_dataset(frames, batch_size=4, seed=7, flip=True)
    again = vq_data.frame_dataset(frames, batch_size=4, seed=7, flip=True)
    other = vq_data.frame_dataset(frames, batch_size=4, seed=8, flip=True)
    assert ds[3]["images"].shape == (4, 8, 8, 3) and ds[3]["images"].dtype == np.uint8
    for step in (0, 3, 100):
        np.testing.assert_array_equal(ds[step]["images"], again[step]["images"])
    assert any(not np.array_equal(ds[s]["images"], other[s]["images"]) for s in range(5))
    # Each epoch (10 frames; batches 0-1 hold its first 8) visits distinct frames.
    ids = np.concatenate([ds[s]["images"][:, 0, 7, 0] % 100 for s in range(2)])
    assert len(set(ids.tolist())) == 8
    flipped = np.concatenate([ds[s]["images"][:, 0, 0, 0] < 100 for s in range(10)])
    assert 0 < flipped.sum() < len(flipped)
    # Two processes split the global order without overlap.
    p0 = vq_data.frame_dataset(frames, batch_size=2, seed=7, process_index=0, process_count=2)
    p1 = vq_data.frame_dataset(frames, batch_size=2, seed=7, process_index=1, process_count=2)
    np.testing.assert_array_equal(np.concatenate([p0[0]["images"], p1[0]["images"]])[[0, 2, 1, 3]],
                                  vq_data.frame_dataset(frames, batch_size=4, seed=7)[0]["images"])
    with pytest.raises(ValueError, match="uint8"):
        vq_data.frame_dataset(frames.astype(np.float32), batch_size=2, seed=0)


def test_tokenizer_kinds_do_not_import_the_interface():
    """`interface.py` builds every kind's backend; the kinds' modules (model, training) never import
    it back, so there is no import circle between them."""
    import ast

    tokenizer_dir = Path(vq.__file__).parent
    for name in ("vq.py", "vq_train.py", "dalle.py"):
        tree = ast.parse((tokenizer_dir / name).read_text())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert "vimpac_jax.tokenizer.interface" not in modules, name
        assert not any(n.module == "vimpac_jax.tokenizer" and any(a.name == "interface" for a in n.names)
                       for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)), name
