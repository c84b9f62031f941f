"""Export a trained or converted model to formats other programs read (`vimpac export`).

  torch        the released layout (classifier.pt + args.pickle), written without PyTorch
  safetensors  flat named tensors + the model config as JSON
  stablehlo    the inference function serialised with `jax.export` (symbolic batch size)

`source.load_exportable(path)` reads what is exported: a model checkpoint directory
(`vimpac convert`, `vimpac_jax.checkpoints`) or a training workdir (its newest intact step,
`training/workdir.py`).
Each writer fills an empty directory; `vimpac_jax.io_utils.atomic_directory` publishes it only when complete.
"""

FORMATS = ("torch", "safetensors", "stablehlo")
