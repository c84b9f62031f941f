"""`vimpac tokenize --tokenizer DIR (--videos LIST_OR_DIR | --tfds NAME[/CONFIG]:SPLIT) --out DIR [options]`:
videos -> token store.

--videos is an mmaction2 list (`path label` or `path` per line), a .csv of video ids, or a
directory scanned for videos. --tfds instead reads decoded videos and labels from a TFDS dataset
prepared beforehand (e.g. `ucf101:train`, with --data-dir; needs `pip install 'vimpac-jax[tfds]'`;
--source-fps where the dataset does not record its frame rate). --class-names FILE (one name per
line, in label order) records what a list's labels mean in the store's metadata.json, as a
directory's class folders and a TFDS dataset's label names are: runs, `vimpac evaluate`,
`vimpac predict` and exports print and carry them. Each video is decoded at --fps,
its shorter side resized to --resize (default --size; the 'finetune' sets also use 1.25x that),
cropped to --size squares (the --variants set: pretrain = 1 view, finetune = 12,
finetune_noflip = 6) and every frame tokenized. Output (see vimpac_jax/tokenize/job.py): ArrayRecord shards holding,
per (video, variant), a header {label, video_id, fps, variant, shape} and its tokens int16 [frames, h, w]
in records of --chunk-frames frames (so a clip reads only its chunks), errors.txt (videos that could not
be decoded or are cut short, with the reason) and metadata.json, written last, once the store is complete.

Killed runs resume where they stopped when started again with the same options. SIGTERM stops the job
and its decode workers (exit 75: run it again to resume). On several hosts
each process takes videos [i::n] (jax.process_index / process_count, or --process-index and
--process-count). Progress and status lines go to stderr (`logging`: vimpac_jax/logs.py); the
last line on stdout is `videos_ok=N videos_failed=M frames=F`, counted over the whole store
(frames: all variants).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from vimpac_jax import exit_codes
from vimpac_jax.data import video_decode as vd
from vimpac_jax.runtime.distributed import maybe_initialize

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpac tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (vimpac convert dalle, or a VQ one)")
    p.add_argument("--videos", default=None, help="video list file (mmaction2 or .csv) or a directory of videos")
    p.add_argument("--tfds", default=None, metavar="NAME[/CONFIG]:SPLIT",
                   help="read decoded videos + labels from a prepared TFDS dataset instead of --videos")
    p.add_argument("--data-dir", default=None, help="with --tfds: the TFDS data_dir it was prepared in")
    p.add_argument("--source-fps", type=float, default=None,
                   help="with --tfds: frame rate of the dataset's videos (default: its metadata, or known for ucf101)")
    p.add_argument("--out", required=True, help="token store directory (created; an unfinished one is resumed)")
    p.add_argument("--video-root", default=None, help="prefix for the list's relative paths (default: as written)")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="class names, one per line in label order (label 0 first), recorded in the store")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second to sample (default 2)")
    p.add_argument("--size", type=int, default=128, help="square frame size in pixels (default 128)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before cropping (default --size)")
    p.add_argument("--variants", choices=sorted(vd.VARIANT_SETS), default="pretrain", help="crops/flips per video")
    p.add_argument("--max-seconds", type=float, default=None, help="tokenize only the first S seconds of each video")
    p.add_argument("--max-frames", type=int, default=None, help="at most this many frames per video")
    p.add_argument("--sampling", choices=vd.SAMPLING_RULES, default="floor",
                   help="frame sampling rule ('ffmpeg' = the released code's fps filter)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1; 0 = in process)")
    p.add_argument("--batch-size", type=int, default=None, help="frames per device step, all local devices (default 32 per device)")
    p.add_argument("--shard-size", type=int, default=256, help="videos per shard file (default 256)")
    p.add_argument("--shard-options", default=None,
                   help="ArrayRecordWriter options (default 'group_size:1': one record per chunk, for random "
                        "reads; append ',uncompressed' to trade disk for faster reads)")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="frames per token record (default 16): a clip reads at most two records when it "
                        "spans at most chunk-frames + 1 stored frames")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="tokenizer compute dtype")
    p.add_argument("--process-index", type=int, default=None, help="this host's index (default jax.process_index())")
    p.add_argument("--process-count", type=int, default=None, help="number of hosts (default jax.process_count())")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (multi-host)")
    p.add_argument("--progress-interval", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--verify", action="store_true",
                   help="read every record of this process's shards (a complete store too) and tokenize the videos "
                        "of damaged ones again")
    return p


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so that no `except Exception` in the job swallows it)."""


def _stop(signum, frame):
    raise Terminated()


def main(argv) -> int:
    args = _parser().parse_args(argv)
    if not args.distributed:  # --distributed: jax.distributed.initialize() below; else VIMPAC_*/SLURM/TPU
        maybe_initialize()
    from vimpac_jax.tokenize.job import TokenizeOptions, tokenize_videos

    opts = TokenizeOptions(
        tokenizer=args.tokenizer, videos=args.videos, out=args.out, fps=args.fps, size=args.size, resize=args.resize,
        variants=args.variants, video_root=args.video_root, max_seconds=args.max_seconds, max_frames=args.max_frames,
        sampling=args.sampling, workers=args.workers, batch_size=args.batch_size, shard_size=args.shard_size,
        dtype=args.dtype, process_index=args.process_index, process_count=args.process_count,
        progress_interval=args.progress_interval, tfds=args.tfds, tfds_data_dir=args.data_dir,
        source_fps=args.source_fps, class_names_file=args.class_names, verify=args.verify,
        **({} if args.shard_options is None else {"shard_options": args.shard_options}),
        **({} if args.chunk_frames is None else {"chunk_frames": args.chunk_frames}))
    if args.distributed:
        import jax

        jax.distributed.initialize()
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        result = tokenize_videos(opts)
    except Terminated:
        # Raised through the job, so the decode pool is shut down and the writers are closed on the
        # way out; what the journals hold is kept and a rerun resumes from it.
        log.warning("vimpac tokenize: SIGTERM: stopped; run the same command again to resume")
        return exit_codes.PREEMPTED
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"vimpac tokenize: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except OSError as e:
        from vimpac_jax.cli import WRITE_ERRORS, write_error_message

        if e.errno not in WRITE_ERRORS:
            raise
        # Shards are journaled only once closed and synced: a rerun resumes from what is journaled.
        resume = ("; what was journaled is kept: run the same command again to resume"
                  if WRITE_ERRORS[e.errno] == exit_codes.FAILED else "")
        print(f"vimpac tokenize: error: {write_error_message(e, f'--out {args.out}')}{resume}", file=sys.stderr)
        return WRITE_ERRORS[e.errno]
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not result.complete:
        log.info("vimpac tokenize: the store is not complete yet (other processes' shares remain)")
    print(result.counts.line())
    return 0
