"""`vimpac predict --workdir W [--tokenizer DIR] VIDEO... [--top 5] [--clips K] [--crops 3|1] [--json OUT]`.

Classifies video files with a fine-tuned model: each video is decoded, tokenized and cut into
K clips x C crops exactly as `vimpac tokenize` + `vimpac evaluate` do, and the softmax scores are
averaged over the views. W is a fine-tuning workdir (everything comes from the run: fps, frame
size, crops, class names, the tokenizer), a `vimpac convert official` checkpoint or a `vimpac
export --format stablehlo` directory (these need --tokenizer; the released protocol is used:
10 clips x 3 crops at --fps 2). A tokenizer that does not fit the model is refused.

Prints the top classes of each video as it is done; --json writes them with the video paths, the
views used and the model's identity, rewritten as results come ("complete": false until the last),
so a run stopped midway (killed, Ctrl-C) keeps every finished file's result. A file that cannot be decoded is listed with the reason and skipped;
the exit code is 1 when any was, 2 for a usage error. VIDEO may also be a list file (one path
per line, as for `vimpac tokenize --videos`: mmaction2 lists, .csv) or a directory of videos.
"""

import argparse
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpac predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (or list files / directories of them)")
    p.add_argument("--workdir", required=True, help="fine-tuning workdir, converted checkpoint or StableHLO export")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (needed when W records none)")
    p.add_argument("--top", type=int, default=5, help="classes printed per video (default 5)")
    p.add_argument("--clips", type=int, default=None, help="K clips per crop (default: the run's, else 10)")
    p.add_argument("--crops", default=None, help="3 (the three no-flip crops) or 1 (center; default: the run's)")
    p.add_argument("--fps", type=float, default=None, help="decoding fps of a model that records none (default 2)")
    p.add_argument("--class-names", default=None, help="file with one class name per line (default: the run's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the predictions to this JSON file")
    p.add_argument("--batch-size", type=int, default=None, help="videos per model call over the local devices")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: cores - 1 for more than 4 videos, else 0 = in process)")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    return p


def _expand(videos, log) -> list[str]:
    """Arguments -> video paths: a file that is a video stays itself; list files and directories
    are read with `vimpac tokenize`'s reader; a missing path stays, to be reported as missing."""
    from vimpac_jax.tokenize.lists import read_items

    paths = []
    for v in videos:
        is_list = os.path.isfile(v) and v.lower().endswith((".txt", ".csv", ".list"))
        if os.path.isdir(v) or is_list:
            items, _ = read_items(v)
            if not items:
                log(f"{v}: lists no videos")
            paths += [it.path for it in items]
        else:
            paths.append(v)
    return paths


def main(argv) -> int:
    args = _parser().parse_args(argv)
    from vimpac_jax import predict as lib

    try:
        if args.top < 1:
            raise lib.PredictError(f"--top must be >= 1, got {args.top}")
        if args.workers is not None and args.workers < 0:
            raise lib.PredictError(f"--workers must be >= 0, got {args.workers}")
        class_names = None
        if args.class_names:
            from vimpac_jax.data.annotations import read_label_map  # the format of `vimpac tokenize --class-names`

            class_names = read_label_map(args.class_names)
        paths = _expand(args.videos, lib.log)
        if not paths:
            raise lib.PredictError("no videos given")
        clf = lib.load_classifier(args.workdir, tokenizer=args.tokenizer, num_clips=args.clips, crops=args.crops,
                                  fps=args.fps, class_names=class_names, batch_size=args.batch_size)
    except (lib.PredictError, FileNotFoundError) as e:
        print(f"vimpac predict: error: {e}", file=sys.stderr)
        return 2
    from vimpac_jax.progress import Progress

    workers = args.workers
    if workers is None:
        workers = max(1, (os.cpu_count() or 2) - 1) if len(paths) > 4 else 0
    progress = Progress(len(paths), label="predict: ", unit="videos", counted=("frames",), failed=True,
                        every_seconds=args.progress_interval) if len(paths) > 1 else None
    views = clf.protocol.describe()
    print(f"{views['views']} views per video: {views['clips']} clips x {len(views['crops'])} crops "
          f"({', '.join(views['crops'])}), model {clf.identity['path']}", flush=True)
    done: dict = {}  # input index -> Prediction, as they are made
    json_out = _JsonOut(Path(args.json).absolute(), clf, len(paths)) if args.json else None

    def put_out(index, result) -> None:
        """Each result as it is made: printed (or the skip warned), and --json rewritten, so a run
        stopped midway (a kill, Ctrl-C) leaves every finished file's result behind."""
        done[index] = result
        if result.error is None:
            print(lib.format_prediction(result), flush=True)
        else:
            logging.getLogger(__name__).warning(f"vimpac predict: skipped {result.path}: {result.error}")
        if json_out is not None:
            json_out.write(done)

    try:
        clf.predict_files(paths, top=min(args.top, clf.num_classes), workers=workers, progress=progress,
                          on_result=put_out)
    finally:
        if progress is not None:
            progress.close()
        if json_out is not None:
            json_out.write(done, force=True)
    failed = sum(r.error is not None for r in done.values())
    print(f"{len(done) - failed} predicted, {failed} failed" + (f"; wrote {args.json}" if args.json else ""))
    return 1 if failed else 0


class _JsonOut:
    """--json, rewritten (atomically) after each result: the results so far in input order, and
    "complete" (every file done). A rewrite's cost grows with the results: once one takes over
    QUICK_WRITE_SECONDS (tens of thousands of files), rewrites are spaced to keep them under a
    tenth of the run, the last one always made."""

    QUICK_WRITE_SECONDS = 0.05

    def __init__(self, path: Path, clf, total: int):
        self.path, self.clf, self.total = path, clf, total
        self.next_at, self.cost = 0.0, 0.0

    def write(self, done: dict, force: bool = False) -> None:
        import time

        from vimpac_jax import predict as lib
        from vimpac_jax.io_utils import write_json_atomic

        now = time.monotonic()
        if not force and self.cost > self.QUICK_WRITE_SECONDS and now < self.next_at:
            return
        record = dict(lib.predictions_json(self.clf, [done[i] for i in sorted(done)]),
                      complete=len(done) == self.total, videos=self.total)
        write_json_atomic(self.path, record)
        self.cost = time.monotonic() - now
        self.next_at = now + 10 * self.cost
