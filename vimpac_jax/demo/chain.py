"""`vimpac demo`: the built-in default, end to end, on real video files.

generated videos (`demo-data`) -> a VQ tokenizer trained on them -> token stores (`tokenize`)
-> VIMPAC pre-training (masked tokens + contrastive) -> the Fig. 5 reconstruction figure ->
fine-tuning from the pre-trained weights and from scratch with the same budget -> the
multi-view test of both -> a table -> `vimpac predict` on two validation video files.
Every stage is the real program a user runs on real data; the configs are configs/demo.py.
Stages whose output is already complete in the workdir are skipped, so a rerun resumes.

`run_ablation` is the paper's Table 7 at this scale: for each seed, pre-training with the mask
loss only, the contrastive loss only, and both, each fine-tuned and tested, beside fine-tuning
from scratch; the data, tokenizer and token stores are made once and shared.
"""

import json
import logging
import math
import time
from pathlib import Path

# Pre-training variants of the ablation: the loss weights of config.pretrain.
PRETRAIN_VARIANTS = {
    "mask_only": {"pretrain.mlm_weight": 1.0, "pretrain.nce_weight": 0.0},
    "contrastive_only": {"pretrain.mlm_weight": 0.0, "pretrain.nce_weight": 1.0},
    "both": {"pretrain.mlm_weight": 1.0, "pretrain.nce_weight": 1.0},
}
ABLATION_ROWS = ("scratch", "mask_only", "contrastive_only", "both")
TOKENIZER_VIDEOS = 300  # pool videos whose frames train the tokenizer (decoding all costs minutes)
FIGURE_VIDEOS = 4
PREDICT_VIDEOS = 2  # validation videos classified by `vimpac predict` at the end


log = logging.getLogger(__name__)


def _log(message: str) -> None:
    log.info(f"[demo] {message}")


def demo_config(stage: str, preset: str, overrides: dict):
    from vimpac_jax.config_utils import installed_config, load_config

    args = ["--config", f"{installed_config('demo.py')}:stage={stage},preset={preset}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(args)


def _absolute_list(list_file: Path, root: Path, out: Path, limit: int | None = None) -> Path:
    """The dataset's lists hold paths relative to its folder; the pipeline stages get absolute ones."""
    lines = []
    for line in list_file.read_text().splitlines():
        if line.strip():
            path, *label = line.split()
            lines.append(" ".join([str(root / path), *label]))
    out.write_text("\n".join(lines[:limit]) + "\n")
    return out


def prepare_data(workdir: Path, preset: str, seed: int, timings: dict, t0: float) -> dict:
    """Stages 1-3, each skipped when complete: dataset, tokenizer, token stores."""
    from vimpac_jax.demo.data import write_demo_dataset
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.tokenize.job import TokenizeOptions, tokenize_videos
    from vimpac_jax.training.train import train

    data = workdir / "data"
    if not (data / "dataset.json").is_file():
        _log(f"1/6 generating the dataset ({preset}) in {data}")
        write_demo_dataset(data, preset=preset, seed=seed, force=data.exists())
    timings["data"] = time.monotonic() - t0
    meta = json.loads((data / "dataset.json").read_text())
    lists = {split: _absolute_list(data / f"{split}.txt", data, workdir / f"{split}_abs.txt")
             for split in ("pool", "train", "val")}
    lists["tokenizer"] = _absolute_list(data / "pool.txt", data, workdir / "tokenizer_abs.txt", TOKENIZER_VIDEOS)

    tok_dir = workdir / "tokenizer_run"
    if not (tok_dir / "tokenizer" / "tokenizer.json").is_file():
        _log(f"2/6 training the VQ tokenizer on frames of {TOKENIZER_VIDEOS} videos of the unlabelled pool")
        train(demo_config("tokenizer", preset, {"seed": seed, "data.videos": lists["tokenizer"]}), tok_dir, make_task)
    timings["tokenizer"] = time.monotonic() - t0

    size, fps = meta["size"], demo_config("pretrain", preset, {}).data.clip_fps
    stores = {}
    # Pre-training: the center crop; fine-tuning: no flips, because a mirror swaps left/right and
    # clockwise/counter-clockwise, and the labels with them (dataset.json: flip_changes_label).
    for split, variants in (("pool", "pretrain"), ("train", "finetune_noflip"), ("val", "finetune_noflip")):
        stores[split] = workdir / "tokens" / split
        if not (stores[split] / "metadata.json").is_file():
            _log(f"3/6 tokenizing the {split} videos ({variants})")
            tokenize_videos(TokenizeOptions(tokenizer=str(tok_dir / "tokenizer"), videos=str(lists[split]),
                                            out=str(stores[split]), fps=fps, size=size, variants=variants,
                                            workers=1))
    timings["tokenize"] = time.monotonic() - t0
    return {"data": data, "lists": lists, "tokenizer": tok_dir / "tokenizer", "stores": stores,
            "class_names": (data / "classes.txt").read_text().split()}


def pretrain(prepared: dict, run_dir: Path, preset: str, seed: int, overrides: dict | None = None) -> Path:
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training.train import train

    config = demo_config("pretrain", preset, {"seed": seed, "data.train_store": prepared["stores"]["pool"],
                                              **(overrides or {})})
    train(config, run_dir, make_task)
    return run_dir


def finetune_and_test(prepared: dict, run_dir: Path, preset: str, seed: int, init_from: Path | str) -> dict:
    """Fine-tunes (from `init_from`, or from scratch when empty) and returns the multi-view test."""
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training.train import train

    results_file = run_dir / "eval_results.json"
    if not results_file.is_file():
        config = demo_config("finetune", preset, {
            "seed": seed, "data.train_store": prepared["stores"]["train"],
            "data.eval_store": prepared["stores"]["val"], "init_from": init_from})
        with config.unlocked():
            config.class_names = prepared["class_names"]
        train(config, run_dir, make_task)
    return json.loads(results_file.read_text())


def draw_figure(pretrain_dir: Path, prepared: dict, out: Path) -> Path | None:
    """The Fig. 5 reconstruction of a few validation clips (`vimpac visualize`); None (and a
    line saying why) without the viz extra."""
    from vimpac_jax.plots import VizExtraMissing
    from vimpac_jax.visualize import draw_figure

    paths = [line.split()[0] for line in prepared["lists"]["val"].read_text().splitlines() if line.strip()]
    try:
        draw_figure(pretrain_dir, prepared["tokenizer"], paths, out, num_videos=FIGURE_VIDEOS)
    except VizExtraMissing as e:
        _log(f"{out.name} not drawn: {e}")
        return None
    return out


def predict_examples(prepared: dict, run_dir: Path, count: int = PREDICT_VIDEOS, top: int = 3) -> list[dict]:
    """The first `count` validation videos through `vimpac_jax.load_classifier(run_dir)`:
    [{'path', 'true', 'top': [[class, probability], ...]}]."""
    from vimpac_jax import load_classifier

    items = [line.split() for line in prepared["lists"]["val"].read_text().splitlines() if line.strip()][:count]
    classifier = load_classifier(run_dir)
    results = classifier.predict_files([path for path, _ in items], top=top)
    return [{"path": r.path, "true": prepared["class_names"][int(label)], "top": [list(t) for t in r.top],
             **({"error": r.error} if r.error else {})} for r, (_, label) in zip(results, items)]


def run_demo(workdir, *, preset: str = "default", seed: int = 0) -> dict:
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings = {}
    prepared = prepare_data(workdir, preset, seed, timings, t0)

    pre_dir = workdir / "pretrain"
    _log("4/6 pre-training VIMPAC (masked token prediction + contrastive)")
    pretrain(prepared, pre_dir, preset, seed)
    timings["pretrain"] = time.monotonic() - t0
    _log("5/6 drawing the reconstruction of masked tokens (Fig. 5)")
    figure = draw_figure(pre_dir, prepared, workdir / "reconstruction.png")
    timings["figure"] = time.monotonic() - t0

    results = {}
    for name, init in (("pretrained", pre_dir), ("scratch", "")):
        _log(f"6/6 fine-tuning {'from the pre-trained weights' if init else 'from scratch'} and testing")
        results[name] = finetune_and_test(prepared, workdir / f"finetune_{name}", preset, seed, init)
    timings["finetune"] = time.monotonic() - t0
    _log(f"then: `vimpac predict` with the pre-trained-then-fine-tuned model on {PREDICT_VIDEOS} validation videos")
    predictions = predict_examples(prepared, workdir / "finetune_pretrained")
    timings["predict"] = time.monotonic() - t0
    return {"results": results, "predictions": predictions, "workdir": str(workdir),
            "seconds": time.monotonic() - t0, "timings": timings,
            "paths": {"dataset": str(prepared["data"]), "tokenizer": str(prepared["tokenizer"]),
                      "token_stores": str(workdir / "tokens"), "pretrain": str(pre_dir),
                      "reconstruction_figure": str(figure),
                      "finetune_pretrained": str(workdir / "finetune_pretrained"),
                      "finetune_scratch": str(workdir / "finetune_scratch")}}


def format_table(summary: dict) -> str:
    r = summary["results"]
    lines = ["", "| fine-tuned from | top-1 (val) | top-5 | mean class acc. | videos | views |",
             "|---|---|---|---|---|---|"]
    for name, label in (("pretrained", "VIMPAC pre-training"), ("scratch", "scratch (same budget)")):
        x = r[name]
        lines.append(f"| {label} | {x['top1']:.1f} | {x['top5']:.1f} | {x['mean_class_accuracy']:.1f} | "
                     f"{x['num_videos']} | {x['num_clips']} clips x {len(x['crops'])} crops |")
    if summary.get("predictions"):
        lines += ["", f"`vimpac predict --workdir {summary['paths']['finetune_pretrained']} VIDEO`, top-3:"]
        for p in summary["predictions"]:
            guess = p.get("error") or ", ".join(f"{name} {prob:.2f}" for name, prob in p["top"])
            lines.append(f"  {Path(p['path']).name} (true: {p['true']}): {guess}")
    lines += ["", f"finished in {summary['seconds']:.0f} s; everything is under {summary['workdir']}:"]
    lines += [f"  {k}: {v}" for k, v in summary["paths"].items()]
    return "\n".join(lines)


def run_ablation(workdir, *, preset: str = "full", seeds=(0, 1, 2), data_seed: int = 0) -> dict:
    """Table 7 at this scale: {row: [top-1 per seed]} for `ABLATION_ROWS`, plus timings.

    The dataset, tokenizer and token stores come from `data_seed` and are shared; each seed
    changes the initialisation, masks, data order and dropout of every pre-training and
    fine-tuning run. Completed runs are reused, so an interrupted ablation resumes.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings = {}
    prepared = prepare_data(workdir, preset, data_seed, timings, t0)
    top1 = {row: [] for row in ABLATION_ROWS}
    runs = {}
    for seed in seeds:
        seed_dir = workdir / "ablation" / f"seed{seed}"
        for row in ABLATION_ROWS:
            start = time.monotonic()
            init = ""
            if row != "scratch":
                _log(f"seed {seed}: pre-training, {row}")
                init = pretrain(prepared, seed_dir / f"pretrain_{row}", preset, seed, PRETRAIN_VARIANTS[row])
            _log(f"seed {seed}: fine-tuning and testing, {row}")
            result = finetune_and_test(prepared, seed_dir / f"finetune_{row}", preset, seed, init)
            top1[row].append(result["top1"])
            runs[f"seed{seed}/{row}"] = {"top1": result["top1"], "seconds": time.monotonic() - start}
            _log(f"seed {seed}: {row} top-1 {result['top1']:.1f}")
    return {"preset": preset, "seeds": list(seeds), "top1": top1, "runs": runs, "workdir": str(workdir),
            "seconds": time.monotonic() - t0, "timings": timings}


def _mean_std(values) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def format_ablation(summary: dict) -> str:
    """Markdown: mean +- sample std, min-max and every seed's top-1, beside the paper's Table 7."""
    paper = {"scratch": 41.3, "mask_only": 68.3, "contrastive_only": 57.1, "both": 69.4}
    labels = {"scratch": "no pre-training", "mask_only": "mask only", "contrastive_only": "contrastive only",
              "both": "mask + contrastive"}
    lines = [f"| pre-training | top-1 mean ± std | min-max | per seed ({', '.join(map(str, summary['seeds']))}) "
             "| paper, UCF101 |", "|---|---|---|---|---|"]
    for row in ABLATION_ROWS:
        values = summary["top1"][row]
        mean, std = _mean_std(values)
        lines.append(f"| {labels[row]} | {mean:.1f} ± {std:.1f} | {min(values):.1f}-{max(values):.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in values)} | {paper[row]} |")
    return "\n".join(lines)
