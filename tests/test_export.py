"""`vimpac export`: the three formats' round trips, the sources it reads, and its refusals.

torch: golden released checkpoint -> ours -> export -> `convert official` gives the same bits and
the golden file's keys, shapes and values; `torch.load(weights_only=True)` reads it where torch
happens to be installed (never a dependency). safetensors: names, metadata, bitwise round trip.
stablehlo: a fresh process that imports only jax/numpy serves the module at two batch sizes
and matches `vimpac features`.
"""

import argparse
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import flax
import jax
import numpy as np
import pytest

from conftest import run_cli
from vimpac_jax import checkpoints, exit_codes
from vimpac_jax.commands import export as export_command
from vimpac_jax.commands import features as features_command
from vimpac_jax.conversion import torch_pickle, torch_zip
from vimpac_jax.conversion.official import convert_official
from vimpac_jax.io_utils import atomic_directory
from vimpac_jax.export.safetensors_format import export_safetensors, load_safetensors
from vimpac_jax.export.source import ExportSourceError, load_exportable
from vimpac_jax.export.torch_format import ExportError, export_torch, released_incompatibilities
from vimpac_jax.models.config import model_config
from vimpac_jax.models.model import abstract_variables, build_model

REPO = Path(__file__).resolve().parents[1]
# Fields of args.pickle that describe the architecture (the released `vimpac/param.py`).
MODEL_ARGS = ("layers", "hid_dim", "model", "pos_emb", "pre_activation", "halve_att", "halve_mlp", "frame_size",
              "clip_len", "vocab_size", "nce_proj_layers", "nce_proj_hid_dim", "dropout", "last_dropout")


def assert_same_variables(a, b):
    fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for path in fa:
        assert fa[path].dtype == fb[path].dtype and np.array_equal(fa[path], fb[path]), "/".join(path)


def run_with_torch(script: str, *args) -> subprocess.CompletedProcess:
    """Run `script` with a Python that has torch (an optional interoperability check; torch is
    never a dependency): /work/torchvenv's if present, else ours; skip when neither has torch."""
    python = "/work/torchvenv/bin/python" if Path("/work/torchvenv/bin/python").exists() else sys.executable
    result = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0 and "No module named 'torch'" in result.stderr:
        pytest.skip("torch is not installed here (it is never a dependency)")
    return result


@pytest.fixture(scope="module")
def golden_a(golden_dir, tmp_path_factory):
    """The golden pre-training checkpoint converted to ours: (dir, config, variables)."""
    out = tmp_path_factory.mktemp("golden") / "vimpac_a"
    config, variables = convert_official(golden_dir / "vimpac_a", out)
    return out, config, variables


@pytest.mark.slow
def test_torch_export_round_trips_and_matches_the_released_file(golden_a, golden_dir, tmp_path, capsys):
    ckpt, config, variables = golden_a
    code, _, err = run_cli(capsys, "export", "--workdir", ckpt, "--format", "torch", "--out", tmp_path / "released")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "released").iterdir()) == ["args.pickle", "classifier.pt"]

    back_config, back = convert_official(tmp_path / "released", tmp_path / "back")
    assert back_config == config
    assert_same_variables(back, variables)

    ours = torch_pickle.load_state_dict(tmp_path / "released" / "classifier.pt")
    theirs = torch_pickle.load_state_dict(golden_dir / "vimpac_a" / "classifier.pt")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for name in theirs:
        if not name.endswith("num_batches_tracked"):  # a counter we do not keep
            assert np.array_equal(ours[name], theirs[name]), name

    with open(tmp_path / "released" / "args.pickle", "rb") as f:  # our own file: plain pickle is safe here
        namespace = pickle.load(f)
    assert isinstance(namespace, argparse.Namespace)
    args = torch_pickle.load_plain_pickle(tmp_path / "released" / "args.pickle")
    assert args == vars(namespace)
    golden_args = torch_pickle.load_plain_pickle(golden_dir / "vimpac_a" / "args.pickle")
    assert set(golden_args) <= set(args)
    assert {k: args[k] for k in MODEL_ARGS} == {k: golden_args[k] for k in MODEL_ARGS}


@pytest.mark.slow
def test_torch_export_of_a_finetuned_model_has_the_released_keys(golden_dir, tmp_path):
    # vimpac_b's classifier: pre-LN, T,H,W, temporal_separation; no MLM head, so no tied decoder.
    config, variables = convert_official(golden_dir / "vimpac_b" / "finetuned", tmp_path / "ft")
    with atomic_directory(tmp_path / "released") as out:
        export_torch(config, variables, out)
    ours = torch_pickle.load_state_dict(tmp_path / "released" / "classifier.pt")
    theirs = torch_pickle.load_state_dict(golden_dir / "vimpac_b" / "finetuned" / "classifier.pt")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name
    args = torch_pickle.load_plain_pickle(tmp_path / "released" / "args.pickle")
    golden_args = torch_pickle.load_plain_pickle(golden_dir / "vimpac_b" / "finetuned" / "args.pickle")
    # A classifier's config has no projection head; the released args carry pre-training's.
    same = [k for k in MODEL_ARGS if not k.startswith("nce_")]
    assert {k: args[k] for k in same} == {k: golden_args[k] for k in same}


def test_torch_zip_writer_dtypes_sharing_alignment(tmp_path):
    from ml_dtypes import bfloat16

    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"w": base, "tied": base, "wT": base.T, "count": np.zeros((), np.int64), "half": np.ones(3, np.float16),
             "bf16": np.ones(2, bfloat16), "flags": np.array([True, False]), "empty": np.zeros((0, 3), np.float32)}
    torch_zip.save_state_dict(state, tmp_path / "a.pt")
    back = torch_pickle.load_state_dict(tmp_path / "a.pt")
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    with zipfile.ZipFile(tmp_path / "a.pt") as archive, open(tmp_path / "a.pt", "rb") as raw:
        infos = archive.infolist()
        assert {i.filename for i in infos} >= {"a/data.pkl", "a/byteorder", "a/version", "a/data/0"}
        assert len([i for i in infos if "/data/" in i.filename]) == 7  # 'tied' shares the storage of 'w'
        for info in infos:  # every record starts on a 64-byte boundary, as torch's writer makes them
            raw.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    torch_zip.save_state_dict(state, tmp_path / "b.pt", archive_name="a")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()  # deterministic


def test_torch_load_reads_the_export(golden_a, tmp_path):
    ckpt, config, variables = golden_a
    with atomic_directory(tmp_path / "released") as out:
        export_torch(config, variables, out)
    script = textwrap.dedent("""
        import argparse, pickle, sys
        import numpy as np, torch
        d = sys.argv[1]
        sd = torch.load(d + "/classifier.pt", weights_only=True, map_location="cpu")
        # Tied entries come back sharing memory, as the released model's state_dict has them.
        assert sd["mlm_head.decoder.weight"].data_ptr() == sd["backbone.embedding.weight"].data_ptr()
        assert sd["mlm_head.decoder.bias"].data_ptr() == sd["mlm_head.bias"].data_ptr()
        np.savez(d + "/loaded.npz", **{k: v.numpy() for k, v in sd.items()})
        with open(d + "/args.pickle", "rb") as f:
            ns = pickle.load(f)
        assert isinstance(ns, argparse.Namespace), type(ns)
        print(ns.model, ns.frame_size, ns.vocab_size)
    """)
    result = run_with_torch(script, tmp_path / "released")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["efflayoutT,H|W", "32", "8192"]
    loaded = np.load(tmp_path / "released" / "loaded.npz")
    written = torch_pickle.load_state_dict(tmp_path / "released" / "classifier.pt")
    assert set(loaded.files) == set(written)
    for name in written:
        assert loaded[name].dtype == written[name].dtype and np.array_equal(loaded[name], written[name]), name


def random_variables(cfg, seed=0):
    """Variables of `build_model(cfg)` (shapes from its init), filled with random numbers.

    Compiling the real init costs seconds on a busy CPU; random values also keep a zero-initialised
    classifier from hiding errors. LayerNorm scales stay near 1 and variances positive.
    """
    rng = np.random.default_rng(seed)
    shapes = flax.traverse_util.flatten_dict(abstract_variables(build_model(cfg), cfg))
    near_one = lambda path: path[-1] in ("scale", "var")
    return flax.traverse_util.unflatten_dict({
        path: (float(near_one(path)) + rng.normal(0, 0.05, s.shape)).astype(s.dtype) for path, s in shapes.items()})


def test_torch_export_refuses_models_the_released_code_cannot_build(golden_a, tmp_path, capsys):
    _, config, _ = golden_a
    assert released_incompatibilities(config) == []
    for change, words in [(dict(layout="TxHxW"), "joint attention"), (dict(layout="T,HxW"), "joint attention"),
                          (dict(pre_ln=True, halve_att=True), "halve_att"), (dict(layout="W,T"), "--model choices"),
                          (dict(width=2), "not square"), (dict(num_heads=4), "hidden_dim // 64")]:
        problems = released_incompatibilities(dict(config, **change))
        assert len(problems) == 1 and words in problems[0], (change, problems)

    joint = dict(config, layout="T,HxW", num_layers=1, hidden_dim=64, proj_hidden_dim=16, vocab_size=64)
    variables = random_variables(joint)
    with pytest.raises(ExportError, match="cannot build"):
        export_torch(joint, variables, tmp_path)
    assert list(tmp_path.iterdir()) == []
    checkpoints.save_model(tmp_path / "joint", variables, joint)
    argv = ["--workdir", str(tmp_path / "joint"), "--format", "torch", "--out", str(tmp_path / "released")]
    assert export_command.main(argv) == exit_codes.BAD_INPUT
    assert "joint attention" in capsys.readouterr().err and not (tmp_path / "released").exists()
    # --force writes it anyway, and our own importer still reads it back exactly.
    assert export_command.main(argv + ["--force"]) == 0
    assert "joint attention" in capsys.readouterr().err  # repeated as a warning
    back_config, back = convert_official(tmp_path / "released", tmp_path / "back")
    assert back_config["layout"] == "T,HxW"
    assert_same_variables(back, variables)


def test_safetensors_round_trip(golden_a, tmp_path):
    _, config, variables = golden_a
    with atomic_directory(tmp_path / "st") as out:
        export_safetensors(config, variables, out)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "st" / "model.safetensors"), framework="numpy") as f:
        names, metadata = set(f.keys()), f.metadata()
    assert "params/backbone/layer_0/mlp/fc/kernel" in names and "batch_stats/proj_head/bn_0/mean" in names
    assert json.loads(metadata["model_config"]) == config
    assert json.loads((tmp_path / "st" / "model_config.json").read_text())["model"] == config
    back_config, back = load_safetensors(tmp_path / "st")
    assert back_config == config
    assert_same_variables(back, variables)


@flax.struct.dataclass
class TrainState:
    """The shape of the training loop's state (vimpac_jax.training): a pytree dataclass."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: object


def _write_training_workdir(workdir: Path, config: dict, variables: dict) -> None:
    """A workdir as training leaves it: config.json and orbax steps of a TrainState with optax moments."""
    import optax

    from vimpac_jax.config_schema import defaults
    from vimpac_jax.training import checkpointing

    workdir.mkdir()
    run_config = json.loads(defaults("pretrain").to_json_best_effort())
    (workdir / "config.json").write_text(json.dumps({**run_config, "model": config,
                                                     "format_version": checkpointing.FORMAT_VERSION}))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    zeros = jax.tree.map(np.zeros_like, variables["params"])
    manager = checkpointing.make_manager(workdir, save_every=1, keep=3)
    for step, params in [(10, zeros), (20, variables["params"])]:  # the export must take the latest
        state = TrainState(step=np.int32(step), params=params, batch_stats=variables["batch_stats"],
                           opt_state=tx.init(params))
        checkpointing.save(manager, step, state, None, {"step": step})
    checkpointing.wait_until_finished(manager)
    manager.close()


def test_training_workdir_is_a_source(golden_a, tmp_path, capsys):
    _, config, variables = golden_a
    _write_training_workdir(tmp_path / "run", config, variables)
    got_config, got = load_exportable(tmp_path / "run")
    assert got_config == config
    assert_same_variables(got, variables)

    assert export_command.main(["--workdir", str(tmp_path / "run"), "--format", "safetensors",
                                "--out", str(tmp_path / "st")]) == 0
    assert "(workdir, task=pretrain)" in capsys.readouterr().out
    assert_same_variables(load_safetensors(tmp_path / "st")[1], variables)

    # A config that does not describe the saved weights is named, variable by variable.
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(stored, model=dict(config, num_layers=3))))
    with pytest.raises(ExportSourceError, match="missing params/backbone/layer_2"):
        load_exportable(tmp_path / "run")


def test_export_command_errors(golden_a, tmp_path, capsys):
    ckpt, _, _ = golden_a
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    cases = [(["--workdir", tmp_path / "nope"], "no such directory"),
             (["--workdir", tmp_path / "empty"], "neither a model checkpoint"),
             (["--workdir", ckpt, "--out", tmp_path / "taken"], "already exists"),
             (["--workdir", ckpt, "--platforms", "cpu,gpu"], "--platforms")]
    for argv, words in cases:
        fmt = "stablehlo" if "--platforms" in argv else "safetensors"
        argv = [*argv, "--format", fmt] + ([] if "--out" in argv else ["--out", tmp_path / "out"])
        assert export_command.main([str(a) for a in argv]) == exit_codes.BAD_INPUT
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_export_refuses_an_out_that_is_holds_or_lies_inside_the_source(golden_a, tmp_path, capsys):
    """--overwrite removes OUT: with OUT the run's workdir (or above or inside it, or a symlink
    to it) that would delete the run; refused before anything is read or removed."""
    ckpt, _, _ = golden_a
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"format_version": 2}')
    (run / "checkpoints").mkdir()
    (tmp_path / "link").symlink_to(run)
    cases = [(run, run, "is the source"), (run, tmp_path / "link", "is the source"),
             (run, tmp_path / "runs", "holds the source"), (run, run / "checkpoints" / "export", "lies inside"),
             (tmp_path / "link", run / "export", "lies inside"), (ckpt, ckpt, "is the source")]
    for source, out, words in cases:
        rc = export_command.main(["--workdir", str(source), "--format", "safetensors", "--out", str(out),
                                  "--overwrite"])
        assert rc == exit_codes.BAD_INPUT
        err = capsys.readouterr().err
        assert words in err and f"--out {out}" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]  # the run is intact
    assert (ckpt / "model_config.json").is_file()


FRESH_SERVER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    directory, tokens_file, out_file = sys.argv[1:]
    with open(directory + "/model.stablehlo", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    tokens = np.load(tokens_file)
    first, rest = exported.call(tokens[:1]), exported.call(tokens[1:])  # two batch sizes, one module
    np.savez(out_file, **{k: np.concatenate([first[k], rest[k]]) for k in first})
    assert "vimpac_jax" not in sys.modules, "the server imported our model code"
""")


@pytest.mark.slow
def test_stablehlo_export_is_served_without_our_code(tmp_path):
    cfg = model_config(task="finetune", num_layers=1, hidden_dim=64, num_heads=2, clip_len=2, height=4, width=4,
                       layout="T,H|W", pos_emb="hw_separation", num_classes=5, dropout=0.1,
                       attention_dropout=0.1).to_dict()
    checkpoints.save_model(tmp_path / "ft", random_variables(cfg, seed=1), cfg)

    # In-process command runs: only the server needs a fresh process.
    assert export_command.main(["--workdir", str(tmp_path / "ft"), "--format", "stablehlo", "--out",
                                str(tmp_path / "hlo"), "--platforms", "cpu,cuda"]) == 0
    signature = json.loads((tmp_path / "hlo" / "signature.json").read_text())
    assert signature["inputs"][0]["shape"] == ["b", 2, 4, 4] and signature["inputs"][0]["dtype"] == "int32"
    assert signature["outputs"] == {"cls": {"shape": ["b", 64], "dtype": "float32"},
                                    "logits": {"shape": ["b", 5], "dtype": "float32"}}
    assert signature["model_config"] == cfg and signature["platforms"] == ["cpu", "cuda"]

    tokens = np.random.default_rng(2).integers(0, 8192, (4, 2, 4, 4)).astype(np.int32)
    tokens[1, 1] = 8193  # a padded frame: PAD keys are masked inside the module too
    np.save(tmp_path / "tokens.npy", tokens)
    served = subprocess.run([sys.executable, "-c", FRESH_SERVER, str(tmp_path / "hlo"), str(tmp_path / "tokens.npy"),
                             str(tmp_path / "served.npz")], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert served.returncode == 0, served.stderr
    assert features_command.main(["--checkpoint", str(tmp_path / "ft"), "--tokens", str(tmp_path / "tokens.npy"),
                                  "--out", str(tmp_path / "features.npz")]) == 0
    served, features = np.load(tmp_path / "served.npz"), np.load(tmp_path / "features.npz")
    assert sorted(served.files) == ["cls", "logits"]
    assert np.abs(features["logits"]).max() > 0.1  # not the trivial all-zero classifier
    for name in ("cls", "logits"):
        np.testing.assert_allclose(served[name], features[name], rtol=1e-5, atol=1e-5)
