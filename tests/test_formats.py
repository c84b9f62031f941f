"""On-disk formats carry a version, and their one reader reads the current one only: a token
store's metadata.json (`data/token_store.py`) and a model checkpoint's model_config.json
(`checkpoints.py`); a run's config.json and checkpoint meta are `tests/test_migrate.py`'s."""

import json

import numpy as np
import pytest

from vimpac_jax import checkpoints
from vimpac_jax.data import token_store
from vimpac_jax.data.testing import write_test_store
from vimpac_jax.models.config import model_config


def test_a_token_store_of_another_format_version_is_refused_naming_what_to_do(tmp_path):
    store = write_test_store(tmp_path / "store", [dict(video_id="v0", num_frames=4, label=0)], grid=(2, 2),
                             chunk_frames=2)
    meta_file = store / token_store.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["format_version"] == token_store.STORE_VERSION and token_store.read_metadata(store) == meta

    meta_file.write_text(json.dumps(dict(meta, format_version=token_store.STORE_VERSION + 1)))
    with pytest.raises(ValueError, match=f"of store format {token_store.STORE_VERSION + 1}, newer than this "
                                         f"vimpac-jax reads .* use the vimpac-jax that wrote it"):
        token_store.read_metadata(store)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    with pytest.raises(ValueError, match=r"records no store format \(format_version\); this vimpac-jax reads store "
                                         r"format 1 only: tokenize the videos again with `vimpac tokenize"):
        token_store.read_metadata(store)


def test_a_model_checkpoint_records_its_format_and_its_loader_hands_out_a_complete_block(tmp_path):
    cfg = model_config("tiny", clip_len=2, height=2, width=2).to_dict()
    directory = checkpoints.save_model(tmp_path / "ckpt", {"params": {"w": np.zeros(2, np.float32)}}, cfg)
    record = json.loads((directory / checkpoints.CONFIG_FILE).read_text())
    assert record == {"model": cfg, "format_version": checkpoints.FORMAT_VERSION}
    assert checkpoints.load_model_config(directory) == cfg
    (directory / checkpoints.CONFIG_FILE).write_text(json.dumps(dict(record, format_version="2")))
    with pytest.raises(ValueError, match="is of model checkpoint format '2'; this vimpac-jax reads format 1 only"):
        checkpoints.load_model_config(directory)


def test_a_model_checkpoint_without_a_format_is_refused_naming_migrate_which_adds_it(tmp_path, capsys):
    """model_config.json is only ever written by vimpac-jax (`convert official`, `export`): one
    without format_version is an older one's, refused with the command that adds the field."""
    from vimpac_jax import cli

    cfg = model_config("tiny", clip_len=2, height=2, width=2).to_dict()
    directory = checkpoints.save_model(tmp_path / "ckpt", {"params": {"w": np.zeros(2, np.float32)}}, cfg)
    config_file = directory / checkpoints.CONFIG_FILE
    config_file.write_text(json.dumps({"model": cfg}))
    with pytest.raises(ValueError, match=f"{config_file} records no format_version .* run `vimpac migrate "
                                         f"--workdir {directory}` first"):
        checkpoints.load_model_config(directory)
    assert cli.main(["export", "--workdir", str(directory), "--format", "safetensors",
                     "--out", str(tmp_path / "out")]) == 2
    assert f"run `vimpac migrate --workdir {directory}` first" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert cli.main(["migrate", "--workdir", str(directory)]) == 0
    assert "model checkpoint format 1 (was none)" in capsys.readouterr().out
    assert json.loads(config_file.read_text()) == {"model": cfg, "format_version": checkpoints.FORMAT_VERSION}
    assert checkpoints.load_model_config(directory) == cfg
    assert cli.main(["migrate", "--workdir", str(directory)]) == 0
    assert "nothing to do" in capsys.readouterr().out
