"""`vimpac convert official` and `vimpac features` on the golden released checkpoints."""

import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

from conftest import run_cli, run_vimpac
from vimpac_jax.conversion import torch_pickle
from vimpac_jax.conversion.official import ConversionError, model_config_from_args, variables_from_state_dict


vimpac = run_vimpac
# The real `vimpac convert` / `vimpac features` programs run once each (the `converted` fixture, the
# golden features); the other tests call the commands in process (`run_cli`).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "vimpac_a"
    result = vimpac("convert", "official", golden_dir / "vimpac_a", out)
    assert result.returncode == 0, result.stderr
    return out


def test_convert_then_features_match_golden(converted, golden_dir, tmp_path):
    expected = np.load(golden_dir / "vimpac_a" / "expected.npz")
    np.save(tmp_path / "tokens.npy", expected["input_codes"])
    result = vimpac("features", "--checkpoint", converted, "--tokens", tmp_path / "tokens.npy",
                    "--out", tmp_path / "out.npz", "--heads")
    assert result.returncode == 0, result.stderr
    out = np.load(tmp_path / "out.npz")
    assert out["hiddens"].shape == (4, 3, 4, 4, 128) and out["mlm_logits"].shape == (4, 3, 4, 4, 8197)
    for ours, theirs in [(out["cls"], expected["eval_cls"]), (out["cls_proj"], expected["eval_cls_proj"]),
                         (out["mlm_logits"][expected["mlm_labels"] != -100], expected["eval_mlm_logits_at_labels"])]:
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5


def test_features_of_a_finetuned_checkpoint_include_logits(golden_dir, tmp_path, capsys):
    assert run_cli(capsys, "convert", "official", golden_dir / "vimpac_b" / "finetuned", tmp_path / "ft")[0] == 0
    expected = np.load(golden_dir / "vimpac_b" / "finetuned" / "expected.npz")
    np.save(tmp_path / "tokens.npy", expected["input_codes"])
    code, _, err = run_cli(capsys, "features", "--checkpoint", tmp_path / "ft", "--tokens", tmp_path / "tokens.npy",
                           "--out", tmp_path / "out.npz")
    assert code == 0, err
    logits = np.load(tmp_path / "out.npz")["logits"]
    assert np.linalg.norm(logits - expected["logits"]) / np.linalg.norm(expected["logits"]) < 1e-5


def test_features_rejects_bad_tokens(converted, tmp_path, capsys):
    np.save(tmp_path / "range.npy", np.full((1, 3, 4, 4), 9000, np.int32))
    np.save(tmp_path / "shape.npy", np.zeros((1, 5, 4, 4), np.int32))
    np.save(tmp_path / "float.npy", np.zeros((1, 3, 4, 4), np.float32))
    for name, words in [("range", "[0, 8197)"), ("shape", "[B, 3, 4, 4]"), ("float", "integers")]:
        code, _, err = run_cli(capsys, "features", "--checkpoint", converted, "--tokens", tmp_path / f"{name}.npy",
                               "--out", tmp_path / "o.npz")
        assert code != 0 and words in err and f"{name}.npy" in err
        assert not (tmp_path / "o.npz").exists()


def test_existing_destination_is_refused(converted, golden_dir, capsys):
    code, _, err = run_cli(capsys, "convert", "official", golden_dir / "vimpac_a", converted)
    assert code != 0 and "already exists" in err


def _golden_state(golden_dir, name="vimpac_a"):
    d = golden_dir / name
    state = torch_pickle.load_state_dict(d / "classifier.pt")
    return state, model_config_from_args(torch_pickle.load_plain_pickle(d / "args.pickle"), state)


def test_mismatches_are_errors_not_skips(golden_dir):
    state, cfg = _golden_state(golden_dir)
    missing = dict(state)
    del missing["backbone.transformer.resblocks.1.mlp.c_fc.weight"]
    with pytest.raises(ConversionError, match="missing key backbone.transformer.resblocks.1.mlp.c_fc.weight"):
        variables_from_state_dict(missing, cfg)
    extra = dict(state, **{"backbone.transformer.resblocks.2.ln.weight": np.ones(128, np.float32)})
    with pytest.raises(ConversionError, match="unused key backbone.transformer.resblocks.2.ln.weight"):
        variables_from_state_dict(extra, cfg)
    wrong = dict(state, **{"backbone.ln_pre.weight": np.ones(64, np.float32)})
    with pytest.raises(ConversionError, match="backbone.ln_pre.weight has shape"):
        variables_from_state_dict(wrong, cfg)
    untied = dict(state, **{"mlm_head.decoder.weight": state["mlm_head.decoder.weight"] + 1})
    with pytest.raises(ConversionError, match="tied"):
        variables_from_state_dict(untied, cfg)
    # args.pickle describing another architecture (3 layers) than the weights (2 layers).
    with pytest.raises(ConversionError, match="missing key backbone.transformer.resblocks.2"):
        variables_from_state_dict(state, dict(cfg, num_layers=3))


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(golden_dir, tmp_path, capsys):
    """Converted, NaN weights gave all-NaN features from `vimpac features` with exit code 0."""
    import shutil

    from vimpac_jax.conversion import torch_zip
    from vimpac_jax.conversion.official import main

    state, _ = _golden_state(golden_dir)
    name = "backbone.transformer.resblocks.1.mlp.c_fc.weight"
    bad = np.array(state[name])
    bad.flat[7] = np.nan
    src = tmp_path / "nan"
    src.mkdir()
    torch_zip.save_state_dict(dict(state, **{name: bad}), src / "classifier.pt")
    shutil.copyfile(golden_dir / "vimpac_a" / "args.pickle", src / "args.pickle")
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'classifier.pt'}: 1 tensor(s) hold NaN or infinite values: {name} (1 of {bad.size} values)" in err
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_classifier_pt_is_refused_and_never_runs(golden_dir, tmp_path):
    src = tmp_path / "evil_ckpt"
    src.mkdir()
    shutil.copy(golden_dir / "vimpac_a" / "args.pickle", src / "args.pickle")
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(src / "classifier.pt", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"backbone.cls_param": _Payload(marker)}, protocol=2))
        zf.writestr("archive/version", "3\n")
    result = vimpac("convert", "official", src, tmp_path / "out")
    assert result.returncode != 0
    assert "system" in result.stderr and "classifier.pt" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
