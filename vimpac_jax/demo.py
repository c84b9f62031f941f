"""`vimpac demo`: the built-in default, end to end, on real video files.

generated videos (`demo-data`) -> a VQ tokenizer trained on them -> token stores (`tokenize`)
-> VIMPAC pre-training (masked tokens + contrastive) -> fine-tuning from the pre-trained
weights and from scratch with the same budget -> the multi-view test of both -> a table.
Every stage is the real program a user runs on real data; the configs are configs/demo.py.
Stages whose output is already complete in the workdir are skipped, so a rerun resumes.
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def demo_config(stage: str, preset: str, overrides: dict):
    from vimpac_jax.config_utils import load_config

    args = ["--config", str(REPO / "configs" / f"demo.py:stage={stage},preset={preset}")]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(args)


def _absolute_list(list_file: Path, root: Path, out: Path) -> Path:
    """The dataset's lists hold paths relative to its folder; the pipeline stages get absolute ones."""
    lines = []
    for line in list_file.read_text().splitlines():
        if line.strip():
            path, *label = line.split()
            lines.append(" ".join([str(root / path), *label]))
    out.write_text("\n".join(lines) + "\n")
    return out


def run_demo(workdir, *, preset: str = "default", seed: int = 0) -> dict:
    from vimpac_jax.data.demo_data import PRESETS as DATA_PRESETS, write_demo_dataset
    from vimpac_jax.data.tokenize import TokenizeOptions, tokenize_videos
    from vimpac_jax.training.train import train

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings = {}
    data = workdir / "data"
    if not (data / "dataset.json").is_file():
        _log(f"1/6 generating the dataset ({preset}) in {data}")
        write_demo_dataset(data, preset=preset, seed=seed, force=data.exists())
    timings["data"] = time.monotonic() - t0
    meta = json.loads((data / "dataset.json").read_text())
    class_names = (data / "classes.txt").read_text().split()
    lists = {split: _absolute_list(data / f"{split}.txt", data, workdir / f"{split}_abs.txt")
             for split in ("pool", "train", "val")}

    tok_dir = workdir / "tokenizer_run"
    if not (tok_dir / "tokenizer" / "tokenizer.json").is_file():
        _log("2/6 training the VQ tokenizer on frames of the unlabelled pool")
        train(demo_config("tokenizer", preset, {"seed": seed, "train.data.videos": lists["pool"]}), tok_dir)
    timings["tokenizer"] = time.monotonic() - t0
    tokenizer = tok_dir / "tokenizer"

    size, fps = meta["size"], demo_config("pretrain", preset, {}).data.clip_fps
    stores = {}
    # Pre-training: the center crop; fine-tuning: no flips, because a mirror swaps left/right and
    # clockwise/counter-clockwise, and the labels with them (dataset.json: flip_changes_label).
    for split, variants in (("pool", "pretrain"), ("train", "finetune_noflip"), ("val", "finetune_noflip")):
        stores[split] = workdir / "tokens" / split
        if not (stores[split] / "metadata.json").is_file():
            _log(f"3/6 tokenizing the {split} videos ({variants})")
            tokenize_videos(TokenizeOptions(tokenizer=str(tokenizer), videos=str(lists[split]), out=str(stores[split]),
                                            fps=fps, size=size, variants=variants, workers=1), log=sys.stderr)
    timings["tokenize"] = time.monotonic() - t0

    common = {"seed": seed}
    pre_dir = workdir / "pretrain"
    _log("4/6 pre-training VIMPAC (masked token prediction + contrastive)")
    train(demo_config("pretrain", preset, dict(common, **{"data.train_store": stores["pool"]})), pre_dir)
    timings["pretrain"] = time.monotonic() - t0

    results = {}
    for name, init in (("pretrained", pre_dir), ("scratch", "")):
        _log(f"5/6 fine-tuning {'from the pre-trained weights' if init else 'from scratch'} and testing")
        overrides = dict(common, **{"data.train_store": stores["train"], "data.eval_store": stores["val"],
                                    "init_from": init})
        config = demo_config("finetune", preset, overrides)
        with config.unlocked():
            config.class_names = class_names
        train(config, workdir / f"finetune_{name}")
        results[name] = json.loads((workdir / f"finetune_{name}" / "eval_results.json").read_text())
    timings["finetune"] = time.monotonic() - t0
    return {"results": results, "workdir": str(workdir), "seconds": time.monotonic() - t0, "timings": timings,
            "paths": {"dataset": str(data), "tokenizer": str(tokenizer), "token_stores": str(workdir / "tokens"),
                      "pretrain": str(pre_dir), "finetune_pretrained": str(workdir / "finetune_pretrained"),
                      "finetune_scratch": str(workdir / "finetune_scratch")}}


def format_table(summary: dict) -> str:
    r = summary["results"]
    lines = ["", "| fine-tuned from | top-1 (val) | top-5 | mean class acc. | videos | views |",
             "|---|---|---|---|---|---|"]
    for name, label in (("pretrained", "VIMPAC pre-training"), ("scratch", "scratch (same budget)")):
        x = r[name]
        lines.append(f"| {label} | {x['top1']:.1f} | {x['top5']:.1f} | {x['mean_class_accuracy']:.1f} | "
                     f"{x['num_videos']} | {x['num_clips']} clips x {len(x['crops'])} crops |")
    lines += ["", f"finished in {summary['seconds']:.0f} s; everything is under {summary['workdir']}:"]
    lines += [f"  {k}: {v}" for k, v in summary["paths"].items()]
    return "\n".join(lines)
