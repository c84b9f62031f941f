"""`vimpac convert dalle --encoder encoder.pkl [--decoder decoder.pkl] DST`.

Reads the published DALL-E dVAE pickles with the restricted reader (nothing in them runs),
infers every size from the weights, maps each torch tensor to its Flax parameter (conv
weights [out, in, kh, kw] -> [kh, kw, in, out]), insists that every tensor is used and every
parameter filled, and writes a tokenizer directory (see `vimpac_jax.tokenizer.store`).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import jax
import numpy as np

from vimpac_jax import exit_codes
from vimpac_jax.conversion.torch_pickle import ModuleRecord, UnsafePickleError, load_module, named_tensors
from vimpac_jax.tokenizer import dalle as dalle_model
from vimpac_jax.tokenizer import store

ENCODER_CLASS = "dall_e.encoder.Encoder"
DECODER_CLASS = "dall_e.decoder.Decoder"


class ConversionError(ValueError):
    """The pickle does not have the DALL-E structure we expect; the message names the key."""


# 'blocks.group_2.block_1.res_path.conv_3.w' -> ('group_2_block_1', 'conv_3', 'kernel')
_BLOCK = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.(id_path|res_path\.conv_[1-4])\.([wb])$")
_LEAF = {"w": "kernel", "b": "bias"}


def flax_path(torch_name: str) -> tuple[str, ...]:
    """Torch state name of a DALL-E module -> path in our Flax params. KeyError if unknown."""
    if torch_name in ("blocks.input.w", "blocks.input.b"):
        return ("input", _LEAF[torch_name[-1]])
    if torch_name in ("blocks.output.conv.w", "blocks.output.conv.b"):
        return ("output", _LEAF[torch_name[-1]])
    m = _BLOCK.match(torch_name)
    if not m:
        raise KeyError(torch_name)
    group, block, layer, leaf = m.groups()
    return (f"group_{group}_block_{block}", layer.replace("res_path.", ""), _LEAF[leaf])


def torch_to_flax_value(name: str, value: np.ndarray) -> np.ndarray:
    """Conv weight [out, in, kh, kw] -> [kh, kw, in, out]; biases unchanged; float32."""
    value = np.asarray(value, dtype=np.float32)
    if name.endswith(".w"):
        if value.ndim != 4:
            raise ConversionError(f"{name}: expected a 4-d conv weight, got shape {value.shape}")
        value = value.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(value)


def _shape(tensors: dict, key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ConversionError(f"missing tensor {key!r}")
    return tuple(tensors[key].shape)


def _blocks_per_group(tensors: dict) -> int:
    """Count block_i in every group; they must agree, and there must be exactly 4 groups."""
    counts = {}
    for name in tensors:
        m = re.match(r"^blocks\.group_(\d+)\.block_(\d+)\.", name)
        if m:
            g, b = int(m.group(1)), int(m.group(2))
            counts[g] = max(counts.get(g, 0), b)
    if sorted(counts) != list(range(1, dalle_model.GROUP_COUNT + 1)):
        raise ConversionError(f"expected groups 1..{dalle_model.GROUP_COUNT}, found {sorted(counts)}")
    if len(set(counts.values())) != 1:
        raise ConversionError(f"groups have different block counts: {counts}")
    return counts[1]


def infer_encoder_config(tensors: dict) -> dict:
    """Sizes of a DALL-E encoder from its tensors (names as `named_tensors` gives them)."""
    n_hid, input_channels, kw, _ = _shape(tensors, "blocks.input.w")
    if kw != 7:
        raise ConversionError(f"'blocks.input.w': expected a 7x7 kernel, got {kw}")
    vocab_size, n_in, _, _ = _shape(tensors, "blocks.output.conv.w")
    if n_in != 8 * n_hid:
        raise ConversionError(f"'blocks.output.conv.w': input width {n_in} != 8 * n_hid ({8 * n_hid})")
    return {"n_hid": n_hid, "n_blk_per_group": _blocks_per_group(tensors),
            "vocab_size": vocab_size, "input_channels": input_channels}


def infer_decoder_config(tensors: dict) -> dict:
    """Sizes of a DALL-E decoder from its tensors."""
    n_init, vocab_size, _, _ = _shape(tensors, "blocks.input.w")
    n_out2, n_hid, _, _ = _shape(tensors, "blocks.output.conv.w")
    if n_out2 % 2:
        raise ConversionError(f"'blocks.output.conv.w': {n_out2} output channels is not even")
    return {"n_init": n_init, "n_hid": n_hid, "n_blk_per_group": _blocks_per_group(tensors),
            "vocab_size": vocab_size, "output_channels": n_out2 // 2}


def _check_recorded_sizes(record: ModuleRecord, config: dict, source: str) -> None:
    """The module's own attributes (n_hid, ...) must agree with the sizes read off the weights."""
    for key, value in config.items():
        recorded = record.state.get(key)
        if recorded is not None and int(recorded) != int(value):
            raise ConversionError(f"{source}: attribute {key}={recorded} but the weights say {value}")


def map_params(tensors: dict, abstract: dict, source: str) -> dict:
    """Fill the Flax param tree `abstract` (ShapeDtypeStructs) from torch tensors.

    Every tensor must land on a parameter of the same shape and every parameter must be
    filled; otherwise ConversionError names the offending key.
    """
    expected = {tuple(k.key for k in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    filled: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in tensors.items():
        try:
            path = flax_path(name)
        except KeyError:
            raise ConversionError(f"{source}: unexpected tensor {name!r}") from None
        if path not in expected:
            raise ConversionError(f"{source}: tensor {name!r} has no parameter {'/'.join(path)}")
        array = torch_to_flax_value(name, value)
        if array.shape != tuple(expected[path].shape):
            raise ConversionError(f"{source}: {name!r} has shape {tuple(value.shape)}, "
                                  f"parameter {'/'.join(path)} needs {tuple(expected[path].shape)}")
        filled[path] = array
    missing = sorted("/".join(p) for p in expected if p not in filled)
    if missing:
        raise ConversionError(f"{source}: parameters not filled by any tensor: {missing[:8]}")
    tree: dict = {}
    for path, array in filled.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return tree


def _read_module(path: str, class_name: str) -> dict:
    record = load_module(path)
    if record.class_name != class_name:
        raise ConversionError(f"{path}: holds a {record.class_name}, expected {class_name}")
    return record, named_tensors(record)


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(encoder_path, decoder_path=None) -> tuple[dict, dict]:
    """Pickle files -> (config, params) in the layout of `vimpac_jax.tokenizer.dalle`."""
    enc_record, enc_tensors = _read_module(encoder_path, ENCODER_CLASS)
    enc_config = infer_encoder_config(enc_tensors)
    _check_recorded_sizes(enc_record, enc_config, str(encoder_path))
    config = {"encoder": enc_config, "decoder": None, "vocab_size": enc_config["vocab_size"],
              "downsample": 2 ** (dalle_model.GROUP_COUNT - 1)}
    dec_tensors = None
    if decoder_path is not None:
        dec_record, dec_tensors = _read_module(decoder_path, DECODER_CLASS)
        dec_config = infer_decoder_config(dec_tensors)
        _check_recorded_sizes(dec_record, dec_config, str(decoder_path))
        if dec_config["vocab_size"] != enc_config["vocab_size"]:
            raise ConversionError(f"encoder vocabulary {enc_config['vocab_size']} != "
                                  f"decoder vocabulary {dec_config['vocab_size']}")
        config["decoder"] = dec_config
    abstract = dalle_model.abstract_params(config)
    params = {"encoder": map_params(enc_tensors, abstract["encoder"], str(encoder_path))}
    if dec_tensors is not None:
        params["decoder"] = map_params(dec_tensors, abstract["decoder"], str(decoder_path))
    return config, params


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vimpac convert dalle",
        description="Import the published DALL-E dVAE (encoder.pkl, decoder.pkl) as a tokenizer "
                    "directory. The pickles are read without executing anything in them.")
    p.add_argument("--encoder", required=True, help="encoder.pkl (a pickled dall_e Encoder)")
    p.add_argument("--decoder", default=None, help="decoder.pkl (optional; needed to reconstruct)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("dst", metavar="DST", help="output tokenizer directory")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        config, params = convert(args.encoder, args.decoder)
        sources = {"encoder": {"file": Path(args.encoder).name, "sha256": _file_sha256(args.encoder)}}
        if args.decoder:
            sources["decoder"] = {"file": Path(args.decoder).name, "sha256": _file_sha256(args.decoder)}
        dst = store.save_tokenizer(args.dst, {"kind": "dalle", "config": config, "sources": sources},
                                   params, overwrite=args.force)
    except UnsafePickleError as e:
        print(f"vimpac convert dalle: refused unsafe pickle: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except (ValueError, OSError) as e:  # ConversionError, bad files, DST exists
        print(f"vimpac convert dalle: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    enc = config["encoder"]
    print(f"wrote {dst}: encoder n_hid={enc['n_hid']} blocks/group={enc['n_blk_per_group']} "
          f"vocab={enc['vocab_size']}" + ("" if config["decoder"] is None
                                          else f", decoder n_init={config['decoder']['n_init']}"))
    return 0
