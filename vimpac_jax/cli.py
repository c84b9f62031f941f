"""The single `vimpac` entry point: `vimpac <command> [args]`.

Each command lives in its own module with a `main(argv) -> int`; it is imported only when
run, so that one command's dependencies (PyAV, TFDS, ...) never slow down or break another.
"""

import importlib
import sys

COMMANDS = {
    "demo": ("vimpac_jax.commands.demo", "the built-in default end to end: videos -> tokens -> pre-train -> fine-tune -> test"),
    "params": ("vimpac_jax.commands.params", "print parameter counts of a model config"),
    "convert": ("vimpac_jax.commands.convert", "import released VIMPAC checkpoints or DALL-E weights"),
    "features": ("vimpac_jax.commands.features", "run a checkpoint on token clips and save its outputs"),
    "mask-ratio": ("vimpac_jax.commands.mask_ratio", "induced masking ratio of block masking"),
    "train": ("vimpac_jax.commands.train", "train a tokenizer, pre-train or fine-tune (config picks the task)"),
    "evaluate": ("vimpac_jax.commands.evaluate", "multi-view test of a fine-tuned workdir"),
    "predict": ("vimpac_jax.commands.predict", "classify video files with a fine-tuned model (top classes per video)"),
    "codes": ("vimpac_jax.commands.codes", "encode images to codes / decode codes to images with a tokenizer directory"),
    "tokenize": ("vimpac_jax.commands.tokenize", "turn a video collection into a token store"),
    "convert-store": ("vimpac_jax.commands.convert_store", "rewrite an old-layout token store in the chunked layout"),
    "export-tfds": ("vimpac_jax.commands.export_tfds", "write token stores as a TFDS dataset (ArrayRecord)"),
    "export": ("vimpac_jax.commands.export", "export a model: released PyTorch layout, safetensors, StableHLO"),
    "sweep": ("vimpac_jax.commands.sweep", "expand a config sweep into runs, launch them, summarise their metrics"),
    "visualize": ("vimpac_jax.commands.visualize", "draw the paper's Fig. 5: masked tokens and the model's reconstruction"),
    "demo-data": ("vimpac_jax.commands.demo_data", "generate the built-in motion video dataset (mp4 + lists)"),
}


def _usage() -> str:
    lines = ["usage: vimpac <command> [options]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("Run `vimpac <command> --help` for the options of one command.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vimpac: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
