"""Turn a video collection into a token store (`vimpac tokenize`): decode, tokenize, write shards.

Pipeline (one process per host; each host takes the videos [i::n] of the list, `lists.py`):
  decode_many (`data/video_decode.py`, worker processes: PyAV decode at --fps, resize, crop/flip
       into the variants)
    -> FrameBatcher (`batcher.py`: frames of many videos packed into full batches, sharded over the
       local devices, two batches in flight so the host prepares one while the devices run the other)
    -> ShardWriter (`shards.py`: per (video, variant) a header record and its chunk records of
       --chunk-frames frames, see token_store.encode_video_records, into ArrayRecord shards of
       --shard-size videos), each closed shard committed by a journal line (`journal.py`).
A store is extended only by a run of the same identity (`identity.py`).

Store layout (see `vimpac_jax.data.token_store`):
  shards/p{process:03d}-{seq:06d}.array_record   "chunked" records of whole videos (every variant of
                                                 a video lands in the same shard)
  progress/config.json                           what the store is made of (its identity)
  progress/process-{process:03d}.jsonl           the journal of one process
  progress/process-{process:03d}.lock            held by the job writing that share (pid, host)
  errors.txt, metadata.json                      written last, once every video is accounted for

--tfds NAME[/CONFIG]:SPLIT replaces the list with a prepared TFDS dataset: `tfds_source` lists its
examples and stands in for decode_many; everything after that is the same.

Resumability. A process appends one journal line (flushed and fsynced) after it closes a shard:
the shard's name, the videos in it (id, frames, records) and the videos that failed to decode
since the last line. The journal is the only truth: a shard file that no journal line names was
cut short by a kill and is deleted on restart, and its videos are done again; a video named in
any journal is never done again. So a run killed at any point and started again ends with every
video exactly once. When the journals cover every video of the list, the process that notices
(each one checks after its last commit, so the last to finish always does) writes errors.txt
and then metadata.json with "complete": true, both by atomic rename: a store without that file
is unfinished, whatever else it holds.

Counts: `frames` is the number of tokenized frames, all variants included (a video of F sampled
frames with 12 variants adds 12·F); `records` the number of (video, variant) pairs (each is a
header record and its chunk records).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vimpac_jax import io_utils
from vimpac_jax.data import annotations, token_store
from vimpac_jax.data import video_decode as vd
from vimpac_jax.tokenize.batcher import FrameBatcher
from vimpac_jax.tokenize.identity import CONFIG_FILE, check_out_dir, store_identity
from vimpac_jax.tokenize.journal import (PROGRESS_DIR, StoreCounts, StoreError, journal_path, lock_path,
                                         read_all_journals, read_journal, repair_duplicates, rewrite_journal,
                                         summarize)
from vimpac_jax.tokenize.lists import check_video_root, read_items
from vimpac_jax.tokenize.options import TokenizeOptions
from vimpac_jax.progress import Progress
from vimpac_jax.tokenize.shards import ShardWriter, check_shard_options, next_shard_seq, remove_unlisted_shards

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    counts: StoreCounts  # over the whole store (every process, every run) as journaled now
    complete: bool  # metadata.json says complete (this run or an earlier one wrote it)
    processed: int  # videos this run decoded (ok or failed)


# ---------------------------------------------------------------------------------------------
# Finishing the store


def finalize_if_complete(out: Path, identity: dict, items: Sequence[annotations.VideoItem],
                         extra_meta: dict) -> StoreCounts | None:
    """If the journals account for every video, write errors.txt and then metadata.json
    (complete) and return the counts; else None. Safe to run from several processes at once:
    each writes the same shard list and counts, by atomic rename."""
    summary = summarize(read_all_journals(out))
    wanted = {it.video_id for it in items}
    done = summary.done_ids()
    if wanted - done:
        return None
    if done - wanted:  # cannot happen with the identity check; refuse to label such a store complete
        raise StoreError(f"{out}: the journals name videos that are not in the list, e.g. {sorted(done - wanted)[0]!r}")
    listed = sorted(summary.shards)
    remove_unlisted_shards(out, set(listed), None)
    errors = sorted(summary.failed.values())
    io_utils.write_text_atomic(out / token_store.ERRORS_FILE,
                               "".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in errors))
    counts = summary.counts()
    meta = {
        **identity,
        **extra_meta,
        "format": token_store.STORE_FORMAT,
        "format_version": token_store.STORE_VERSION,
        "complete": True,
        "counts": dataclasses.asdict(counts),
        "shards": listed,
        "errors_file": token_store.ERRORS_FILE,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    io_utils.write_json_atomic(out / token_store.METADATA_FILE, meta)  # last: it marks the store complete
    return counts


# ---------------------------------------------------------------------------------------------
# The job


def check_options(opts: TokenizeOptions) -> None:
    """Clear errors naming the flag, before anything is loaded."""
    if (opts.videos is None) == (opts.tfds is None):
        raise ValueError("give exactly one of --videos (video files) and --tfds (a prepared TFDS dataset)")
    if opts.tfds is None and (opts.tfds_data_dir is not None or opts.source_fps is not None):
        raise ValueError("--data-dir and --source-fps go with --tfds")
    if opts.tfds is not None and opts.video_root is not None:
        raise ValueError("--video-root goes with --videos, not --tfds")
    if opts.tfds is not None and opts.class_names_file is not None:
        raise ValueError("--class-names goes with --videos; a TFDS dataset's names come from its label feature")
    if opts.source_fps is not None and not opts.source_fps > 0:
        raise ValueError(f"--source-fps must be positive, got {opts.source_fps}")
    if not opts.fps > 0:
        raise ValueError(f"--fps must be positive, got {opts.fps}")
    if opts.size < 1:
        raise ValueError(f"--size must be positive, got {opts.size}")
    if opts.resize is not None and opts.resize < opts.size:
        raise ValueError(f"--resize ({opts.resize}) must be at least --size ({opts.size})")
    if opts.variants not in vd.VARIANT_SETS:
        raise ValueError(f"--variants must be one of {sorted(vd.VARIANT_SETS)}, got {opts.variants!r}")
    if opts.sampling not in vd.SAMPLING_RULES:
        raise ValueError(f"--sampling must be one of {vd.SAMPLING_RULES}, got {opts.sampling!r}")
    if opts.max_seconds is not None and not opts.max_seconds > 0:
        raise ValueError(f"--max-seconds must be positive, got {opts.max_seconds}")
    if opts.max_frames is not None and opts.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {opts.max_frames}")
    if opts.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {opts.shard_size}")
    if opts.chunk_frames < 1:
        raise ValueError(f"--chunk-frames must be >= 1, got {opts.chunk_frames}")
    if opts.workers is not None and opts.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {opts.workers}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    check_shard_options(opts.shard_options)
    if (opts.process_index is None) != (opts.process_count is None):
        raise ValueError("--process-index and --process-count go together")
    if opts.process_count is not None and not 0 <= opts.process_index < opts.process_count:
        raise ValueError(f"--process-index must be in [0, --process-count), got {opts.process_index} "
                         f"of {opts.process_count}")


def _process_share(opts: TokenizeOptions) -> tuple[int, int]:
    if opts.process_count is not None:
        return opts.process_index, opts.process_count
    import jax

    return jax.process_index(), jax.process_count()


def tokenize_videos(opts: TokenizeOptions) -> TokenizeResult:
    """Run (or resume, or find finished) the job; see the module docstring (status lines: the
    `vimpac_jax.tokenize.job` logger, progress: `vimpac_jax.progress`). Raises ValueError /
    FileNotFoundError (StoreError, TokenizerLoadError) for bad input before any video is decoded."""
    import jax.numpy as jnp

    from vimpac_jax.tokenizer.interface import TokenizerLoadError, load_tokenizer

    check_options(opts)
    source = None
    if opts.tfds is not None:  # opened (dataset, features, frame rate checked) now, listed once the tokenizer loads
        from vimpac_jax.data.tfds_source import TfdsVideoSource

        source = TfdsVideoSource(opts.tfds, data_dir=opts.tfds_data_dir, source_fps=opts.source_fps)
    else:
        given = None if opts.class_names_file is None else annotations.read_label_map(opts.class_names_file)
        if given is not None and not given:
            raise ValueError(f"--class-names {opts.class_names_file}: no class names (one per line)")
        items, class_names = read_items(opts.videos, opts.video_root, given,
                                        f"--class-names {opts.class_names_file}")
        if not items:
            raise ValueError(f"--videos {opts.videos}: no videos listed")
    variants = vd.variants_for(opts.variants, opts.size, opts.resize)
    try:
        tok = load_tokenizer(opts.tokenizer, dtype=jnp.dtype(opts.dtype), batch_size=opts.batch_size)
    except TokenizerLoadError as e:
        raise TokenizerLoadError(f"--tokenizer: {e}") from e
    if opts.size % tok.downsample:
        raise ValueError(f"--size {opts.size} is not a multiple of the tokenizer's downsampling ({tok.downsample})")
    if tok.vocab_size > 2 ** 15:
        raise ValueError(f"tokenizer vocabulary {tok.vocab_size} does not fit the store's int16 tokens")
    if source is not None:
        items, class_names = source.items(), source.class_names
        if not items:
            raise ValueError(f"--tfds {opts.tfds}: the split has no examples")
    identity = store_identity(tok.identity(), opts, variants, items, class_names)
    if source is not None:  # the frames sampled depend on it
        identity["source_fps"] = source.source_fps
    out = Path(opts.out)
    existing = check_out_dir(out, identity)
    if existing is not None and not opts.verify:
        c = existing["counts"]
        log.info(f"tokenize: {out} is already a complete store of this configuration; nothing to do "
                 f"(--verify reads every shard and redoes the videos of damaged ones)")
        return TokenizeResult(StoreCounts(c["videos_ok"], c["videos_failed"], c["frames"], c["records"]), True, 0)
    if source is None:
        check_video_root(items, opts.video_root)
    pi, pc = _process_share(opts)
    hw = tok.token_hw(opts.size, opts.size)
    # tokenizer_dir: where `vimpac predict` finds the tokenizer again (its identity is checked on load).
    extra_meta = {"token_shape": list(hw), "token_dtype": "int16",
                  "tokenizer_dir": os.path.abspath(opts.tokenizer),
                  "source": os.path.abspath(opts.videos) if source is None else f"tfds:{opts.tfds}",
                  "process_count": pc, "shard_options": opts.shard_options,
                  "layout": token_store.CHUNKED_LAYOUT,
                  **({} if source is None else {"tfds": source.metadata()})}

    # One job per process share: a second `vimpac tokenize` on this --out and share would record
    # its videos twice in the journal (a lock that a killed job left is stale: io_utils).
    with io_utils.exclusive_lock(lock_path(out, pi), f"--out {out} (process share {pi} of {pc})"):
        return _tokenize_share(opts, tok, variants, hw, items, identity, extra_meta, out, pi, pc, source)


def _tokenize_share(opts: TokenizeOptions, tok, variants, hw, items, identity, extra_meta, out: Path, pi: int,
                    pc: int, source) -> TokenizeResult:
    """The rest of `tokenize_videos`, holding this share's lock."""
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    config_path = out / PROGRESS_DIR / CONFIG_FILE
    if not config_path.is_file():
        io_utils.write_json_atomic(config_path, identity)  # several processes may race here: same content
    (out / token_store.SHARDS_DIR).mkdir(exist_ok=True)

    # Restart: trust the journals, drop this process's shards they do not name (cut by a kill).
    read_journal(journal_path(out, pi), repair=True)
    if opts.verify:
        _drop_damaged_shards(out, pi)
    share, processed = items[pi::pc], 0
    _repair_duplicates(out, pi)
    for second_pass in (False, True):  # the second redoes videos of lines a repair dropped after the first
        entries = read_all_journals(out)
        summary = summarize(entries)
        removed = remove_unlisted_shards(out, set(summary.shards), pi)
        if removed:
            log.info(f"tokenize: removed {len(removed)} unfinished shard(s) of an earlier run: {removed[:3]}")
        done = summary.done_ids()
        todo = [it for it in share if it.video_id not in done]
        if len(todo) < len(share) and not second_pass:
            log.info(f"tokenize: resuming: {len(share) - len(todo)} of this process's {len(share)} videos are done")
        if todo:
            _run(opts, tok, variants, hw, todo, out, pi, next_shard_seq(entries, pi),
                 Progress(len(todo), label=f"tokenize[{pi}/{pc}]: ", unit="videos", counted=("frames",), failed=True,
                          every_seconds=opts.progress_interval),
                 decode_many=_decode_files if source is None else source.decode_many)
            processed += len(todo)
        if not _repair_duplicates(out, pi):  # another job may have written this store meanwhile
            break

    counts = finalize_if_complete(out, identity, items, extra_meta)
    if counts is not None:
        return TokenizeResult(counts, True, processed)
    summary = summarize(read_all_journals(out))
    left = len(items) - len(summary.done_ids())
    log.info(f"tokenize: this process's share is done; {left} video(s) of other processes are not yet; "
             "the last process to finish marks the store complete")
    return TokenizeResult(summary.counts(), False, processed)


# A video file cut short (a libav error, or fewer frames than its index lists) is a failure
# listed in errors.txt, not a shorter video in the store.
_decode_files = functools.partial(vd.decode_many, allow_partial=False)


def _drop_damaged_shards(out: Path, pi: int) -> list[str]:
    """--verify: read every record of the shards this process's journal names; a shard that
    cannot be read (cut short, a flipped bit: `token_store.StoreDamagedError`) loses its journal
    line (the journal rewritten atomically, under this share's lock) and its file, and the store
    its metadata.json, so the resume that follows tokenizes its videos (and the failures of that
    line) again and marks the store complete anew. Returns the shards dropped."""
    path = journal_path(out, pi)
    entries = read_journal(path)
    shards = [e["shard"] for e in entries if e.get("shard")]
    progress = Progress(len(shards), label=f"verify[{pi}]: ", unit="shards", every_seconds=10)
    damaged = {}
    for i, shard in enumerate(shards):
        try:
            reader = token_store.RecordReader([str(out / shard)])
            for lo in range(0, len(reader), 256):
                reader.read(np.arange(lo, min(lo + 256, len(reader))))
        except (token_store.StoreDamagedError, FileNotFoundError) as e:
            damaged[shard] = getattr(e, "reason", str(e))
        progress.update(i + 1)
    if not damaged:
        log.info(f"tokenize: verified the {len(shards)} shard(s) of process {pi}: every record reads")
        return []
    for e in entries:
        if e.get("shard") in damaged:
            videos = [v[0] for v in e.get("videos", [])]
            log.warning(f"tokenize: shard {out / e['shard']} is damaged ({damaged[e['shard']]}); its {len(videos)} "
                        f"video(s) are tokenized again: {', '.join(videos[:5])}{', ...' if len(videos) > 5 else ''}")
    (out / token_store.METADATA_FILE).unlink(missing_ok=True)  # first: a store missing shards is not complete
    rewrite_journal(path, [e for e in entries if e.get("shard") not in damaged])
    for shard in damaged:
        (out / shard).unlink(missing_ok=True)
    return sorted(damaged)


def _repair_duplicates(out: Path, pi: int) -> bool:
    """Repair videos recorded twice in the journals (`journal.repair_duplicates`), with a warning;
    True when a journal line was dropped."""
    repair = repair_duplicates(out, pi)
    if repair is None:
        return False
    log.warning(f"tokenize: warning: {len(repair.videos)} video(s) recorded more than once in the journals of {out} "
          f"(two jobs wrote this store at once), e.g. {repair.videos[:3]}; kept the first record of each, "
          f"dropped {len(repair.dropped)} journal line(s) ({', '.join(repair.dropped[:3])}) and deleted "
          f"{len(repair.deleted_shards)} shard(s); the other videos of those lines are done again (by the run of their "
          "process share)")
    for skipped in repair.skipped_journals:
        log.warning(f"tokenize: warning: not repaired now: {skipped}")
    return bool(repair.dropped)


def _run(opts: TokenizeOptions, tok, variants: Sequence[vd.Variant], hw: tuple[int, int],
         todo: Sequence[annotations.VideoItem], out: Path, process_index: int, next_seq: int,
         progress: Progress, decode_many: Callable = _decode_files) -> None:
    """decode_many: `video_decode.decode_many` or a source's equivalent (`TfdsVideoSource.decode_many`)."""
    workers = max(1, (os.cpu_count() or 2) - 1) if opts.workers is None else opts.workers
    writer = ShardWriter(out, process_index, opts.shard_size, next_seq, opts.shard_options)
    batcher = FrameBatcher(lambda b: tok.encode_tokens_async(b, checked=True), tok.batch_size, hw)
    n_var = len(variants)

    def write(index: int, tokens: np.ndarray) -> None:
        item = todo[index]
        per = len(tokens) // n_var  # every variant has the same frames (one decode, several crops)
        records = [token_store.encode_video_records(tokens[k * per:(k + 1) * per], video_id=item.video_id,
                                                    label=item.label, fps=opts.fps, variant=v.name,
                                                    chunk_frames=opts.chunk_frames)
                   for k, v in enumerate(variants)]
        writer.add_video(item, records, len(tokens))
        progress.update(add=1, frames=len(tokens))

    try:
        results = decode_many([it.path for it in todo], opts.fps, variants, workers, max_seconds=opts.max_seconds,
                              max_frames=opts.max_frames, sampling=opts.sampling)
        for index, _, result in results:
            if isinstance(result, vd.VideoDecodeError):
                writer.add_failure(todo[index], result.reason)
                progress.update(failed=1)
                continue
            frames = np.concatenate([result[v.name] for v in variants])  # [n_var·F, S, S, 3] uint8
            for key, tokens in batcher.add(index, frames):
                write(key, tokens)
        for key, tokens in batcher.flush():
            write(key, tokens)
        writer.commit()
    finally:
        progress.close()
