"""The DALL-E dVAE in Flax: golden parity, conversion of pickled modules, refusal of bad files.

Synthetic pickles are written by hand (no torch) with the opcode writer of test_torch_pickle.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the pickle writer lives beside this file
from test_torch_pickle import Call, Global, Obj, dumps, tensor, write_torch_zip
from vimpac_jax import exit_codes
from vimpac_jax.conversion import dalle as conv
from vimpac_jax.tokenizer import dalle as D
from vimpac_jax.tokenizer import store

GOLDEN = Path("/work/shared/golden/dalle_tiny")


def rel_err(ours, golden) -> float:
    ours, golden = np.asarray(ours, np.float64), np.asarray(golden, np.float64)
    return float(np.linalg.norm(ours - golden) / np.linalg.norm(golden))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------
# Golden parity (converted through the CLI function)


@pytest.fixture(scope="module")
def golden_tokenizer(tmp_path_factory):
    dst = tmp_path_factory.mktemp("tok") / "dalle_tiny"
    rc = conv.main(["--encoder", str(GOLDEN / "encoder.pkl"), "--decoder", str(GOLDEN / "decoder.pkl"),
                    str(dst)])
    assert rc == 0
    return dst


def test_golden_conversion_config(golden_tokenizer):
    config, params = D.load_dalle_tokenizer(golden_tokenizer)
    assert config["encoder"] == {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512, "input_channels": 3}
    assert config["decoder"] == {"n_init": 32, "n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512,
                                 "output_channels": 3}
    meta = store.read_meta(golden_tokenizer)
    assert meta["kind"] == "dalle" and len(meta["weights_sha256"]) == 64
    assert params["encoder"]["input"]["kernel"].shape == (7, 7, 3, 64)
    assert params["encoder"]["input"]["kernel"].dtype == np.float32
    # No temporary directories are left beside DST.
    assert [p.name for p in golden_tokenizer.parent.iterdir()] == [golden_tokenizer.name]


def test_golden_parity(golden_tokenizer):
    config, params = D.load_dalle_tokenizer(golden_tokenizer)
    expected = np.load(GOLDEN / "expected.npz")
    images = expected["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    tokens, logits = D.dalle_encode(params, config, images)
    assert logits.shape == (2, 4, 4, 512) and logits.dtype == jnp.float32
    assert rel_err(nchw(logits), expected["z_logits"]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(tokens), expected["tokens"])

    stats = D.dalle_decode_stats(params, config, expected["tokens"])  # = decoder(one_hot(tokens))
    assert rel_err(nchw(stats), expected["x_stats"]) <= 1e-5

    images_out = D.dalle_decode(params, config, expected["tokens"])
    assert images_out.shape == (2, 32, 32, 3)
    assert rel_err(nchw(images_out), expected["reconstruction"]) <= 1e-5


def test_bfloat16_compute_stays_close(golden_tokenizer):
    config, params = D.load_dalle_tokenizer(golden_tokenizer)
    expected = np.load(GOLDEN / "expected.npz")
    _, logits = D.dalle_encode(params, config, expected["images"].transpose(0, 2, 3, 1), dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32
    assert rel_err(nchw(logits), expected["z_logits"]) < 5e-2


def test_token_ids_equal_one_hot_convolution():
    layer = D.Conv2d(n_in=16, n_out=5, kw=1)
    ids = jnp.array([[[0, 3], [15, 7]]])
    # Jitted: one compile each, not one per op.
    variables = jax.jit(lambda ids: jax.tree.map(lambda v: v + 0.5, layer.init(jax.random.key(1), ids)))(ids)
    # (+ 0.5: a non-zero bias too)
    by_ids, by_one_hot = jax.jit(lambda v, ids: (layer.apply(v, ids), layer.apply(v, jax.nn.one_hot(ids, 16))))(
        variables, ids)
    np.testing.assert_allclose(by_ids, by_one_hot, rtol=0, atol=1e-6)


def test_pixel_maps():
    x = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(D.map_pixels(x), 0.8 * x + 0.1, atol=1e-7)
    np.testing.assert_allclose(D.unmap_pixels(D.map_pixels(x)), x, atol=1e-6)
    assert float(D.unmap_pixels(jnp.array(0.0))) == 0.0 and float(D.unmap_pixels(jnp.array(1.0))) == 1.0


# ------------------------------------------------------------------------------------------
# Synthetic pickles of another size, in the published structure


class _Builder:
    """Emits the pickle tree of a `torch.save(dall_e module)` with random weights."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.blobs: dict[str, bytes] = {}
        self.weights: dict[str, np.ndarray] = {}  # dotted name -> torch-layout array

    def _param(self, name, shape):
        array = self.rng.standard_normal(shape).astype(np.float32) * 0.1
        key = str(len(self.blobs))
        self.blobs[key] = array.tobytes()
        self.weights[name] = array
        stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        return tensor(key, "FloatStorage", array.size, size=shape, stride=stride, parameter=True)

    @staticmethod
    def module(cls_path, attrs=None, params=None, modules=None):
        mod, name = cls_path.rsplit(".", 1)
        hooks = {f"_{h}": Call(Global("collections", "OrderedDict"))
                 for h in ("backward_pre_hooks", "backward_hooks", "forward_hooks", "forward_pre_hooks",
                           "state_dict_hooks", "load_state_dict_pre_hooks")}
        state = {**(attrs or {}), "training": True, "_parameters": params or {}, "_buffers": {},
                 "_non_persistent_buffers_set": Call(Global("__builtin__", "set"), ([],)),
                 **hooks, "_modules": modules or {}}
        return Obj(Global(mod, name), state)

    def conv(self, prefix, n_in, n_out, kw):
        device = Call(Global("torch", "device"), ("cpu",))
        return self.module("dall_e.utils.Conv2d",
                           {"n_in": n_in, "n_out": n_out, "kw": kw, "use_float16": True, "device": device,
                            "requires_grad": False},
                           {"w": self._param(prefix + ".w", (n_out, n_in, kw, kw)),
                            "b": self._param(prefix + ".b", (n_out,))})

    def block(self, prefix, cls, n_in, n_out, kernels):
        n_hid = n_out // 4
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        res = {}
        for k, kw in enumerate(kernels):
            res[f"relu_{k + 1}"] = self.module("torch.nn.modules.activation.ReLU", {"inplace": False})
            res[f"conv_{k + 1}"] = self.conv(f"{prefix}.res_path.conv_{k + 1}", widths[k], widths[k + 1], kw)
        identity = (self.conv(prefix + ".id_path", n_in, n_out, 1) if n_in != n_out
                    else self.module("torch.nn.modules.linear.Identity"))
        return self.module(cls, {"n_in": n_in, "n_out": n_out},
                           modules={"id_path": identity,
                                    "res_path": self.module("torch.nn.modules.container.Sequential", modules=res)})

    def encoder(self, n_hid, n_blk, vocab):
        groups, width = {"input": self.conv("blocks.input", 3, n_hid, 7)}, n_hid
        for g, mult in enumerate((1, 2, 4, 8), start=1):
            members = {}
            for i in range(n_blk):
                members[f"block_{i + 1}"] = self.block(f"blocks.group_{g}.block_{i + 1}", "dall_e.encoder.EncoderBlock",
                                                       width, mult * n_hid, (3, 3, 3, 1))
                width = mult * n_hid
            if g < 4:
                members["pool"] = self.module("torch.nn.modules.pooling.MaxPool2d", {"kernel_size": 2})
            groups[f"group_{g}"] = self.module("torch.nn.modules.container.Sequential", modules=members)
        groups["output"] = self.module("torch.nn.modules.container.Sequential", modules={
            "relu": self.module("torch.nn.modules.activation.ReLU"),
            "conv": self.conv("blocks.output.conv", width, vocab, 1)})
        blocks = self.module("torch.nn.modules.container.Sequential", modules=groups)
        return self.module("dall_e.encoder.Encoder",
                           {"n_hid": n_hid, "n_blk_per_group": n_blk, "input_channels": 3, "vocab_size": vocab},
                           modules={"blocks": blocks})

    def decoder(self, n_init, n_hid, n_blk, vocab):
        groups, width = {"input": self.conv("blocks.input", vocab, n_init, 1)}, n_init
        for g, mult in enumerate((8, 4, 2, 1), start=1):
            members = {}
            for i in range(n_blk):
                members[f"block_{i + 1}"] = self.block(f"blocks.group_{g}.block_{i + 1}", "dall_e.decoder.DecoderBlock",
                                                       width, mult * n_hid, (1, 3, 3, 3))
                width = mult * n_hid
            if g < 4:
                members["upsample"] = self.module("torch.nn.modules.upsampling.Upsample",
                                                  {"scale_factor": 2.0, "mode": "nearest"})
            groups[f"group_{g}"] = self.module("torch.nn.modules.container.Sequential", modules=members)
        groups["output"] = self.module("torch.nn.modules.container.Sequential", modules={
            "relu": self.module("torch.nn.modules.activation.ReLU"),
            "conv": self.conv("blocks.output.conv", width, 6, 1)})
        blocks = self.module("torch.nn.modules.container.Sequential", modules=groups)
        return self.module("dall_e.decoder.Decoder",
                           {"n_init": n_init, "n_hid": n_hid, "n_blk_per_group": n_blk, "output_channels": 3,
                            "vocab_size": vocab}, modules={"blocks": blocks})


def _write(path, build) -> tuple[Path, dict]:
    builder = _Builder(seed=len(str(path)))
    tree = build(builder)
    write_torch_zip(path, dumps(tree), builder.blobs, top=path.stem)
    return path, builder.weights


def test_synthetic_size_converts(tmp_path):
    enc_path, enc_w = _write(tmp_path / "encoder.pkl", lambda b: b.encoder(32, 2, 64))
    dec_path, dec_w = _write(tmp_path / "decoder.pkl", lambda b: b.decoder(16, 32, 2, 64))
    dst = tmp_path / "out"
    assert conv.main(["--encoder", str(enc_path), "--decoder", str(dec_path), str(dst)]) == 0
    config, params = D.load_dalle_tokenizer(dst)
    assert config["encoder"] == {"n_hid": 32, "n_blk_per_group": 2, "vocab_size": 64, "input_channels": 3}
    assert config["decoder"] == {"n_init": 16, "n_hid": 32, "n_blk_per_group": 2, "vocab_size": 64,
                                 "output_channels": 3}
    # Every torch weight lands, transposed, where flax_path says.
    for weights, tree in ((enc_w, params["encoder"]), (dec_w, params["decoder"])):
        assert len(jax.tree.leaves(tree)) == len(weights)
        for name, value in weights.items():
            leaf = tree
            for key in conv.flax_path(name):
                leaf = leaf[key]
            np.testing.assert_array_equal(leaf, value.transpose(2, 3, 1, 0) if value.ndim == 4 else value)
    images = np.random.default_rng(0).uniform(size=(1, 16, 16, 3)).astype(np.float32)
    tokens, logits = D.dalle_encode(params, config, images)
    assert tokens.shape == (1, 2, 2) and logits.shape == (1, 2, 2, 64)
    assert D.dalle_decode(params, config, tokens).shape == (1, 16, 16, 3)


def test_encoder_only_conversion(tmp_path):
    enc_path, _ = _write(tmp_path / "encoder.pkl", lambda b: b.encoder(32, 1, 64))
    assert conv.main(["--encoder", str(enc_path), str(tmp_path / "out")]) == 0
    config, params = D.load_dalle_tokenizer(tmp_path / "out")
    assert config["decoder"] is None and set(params) == {"encoder"}
    with pytest.raises(ValueError, match="without a decoder"):
        D.dalle_decode(params, config, np.zeros((1, 2, 2), np.int32))


# ------------------------------------------------------------------------------------------
# Refusals and errors


def test_malicious_encoder_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = write_torch_zip(tmp_path / "encoder.pkl",
                           dumps(Call(Global("os", "system"), (f"touch {marker}",))), {}, top="encoder")
    dst = tmp_path / "out"
    assert conv.main(["--encoder", str(path), str(dst)]) == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert "refused" in err and "'os.system'" in err and "encoder.pkl" in err
    assert not marker.exists() and not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pkl"]


def test_wrong_file_for_role(tmp_path, capsys):
    assert conv.main(["--encoder", str(GOLDEN / "decoder.pkl"), str(tmp_path / "out")]) == exit_codes.BAD_INPUT
    assert "dall_e.decoder.Decoder" in capsys.readouterr().err


def test_extra_and_missing_tensors_are_named(tmp_path, capsys):
    def extra(b):
        tree = b.encoder(32, 1, 64)
        conv_1 = tree.state["_modules"]["blocks"].state["_modules"]["input"]
        conv_1.state["_parameters"]["scale"] = b._param("blocks.input.scale", (3,))
        return tree

    path, _ = _write(tmp_path / "extra.pkl", extra)
    assert conv.main(["--encoder", str(path), str(tmp_path / "out")]) == exit_codes.BAD_INPUT
    assert "'blocks.input.scale'" in capsys.readouterr().err

    def missing(b):
        tree = b.encoder(32, 1, 64)
        block = tree.state["_modules"]["blocks"].state["_modules"]["group_2"].state["_modules"]["block_1"]
        block.state["_modules"]["id_path"].state["_parameters"].pop("b")
        return tree

    path, _ = _write(tmp_path / "missing.pkl", missing)
    assert conv.main(["--encoder", str(path), str(tmp_path / "out")]) == exit_codes.BAD_INPUT
    assert "group_2_block_1/id_path/bias" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_destination_needs_force(tmp_path, capsys):
    enc_path, _ = _write(tmp_path / "encoder.pkl", lambda b: b.encoder(32, 1, 64))
    dst = tmp_path / "out"
    dst.mkdir()
    assert conv.main(["--encoder", str(enc_path), str(dst)]) == exit_codes.BAD_INPUT
    assert "exists" in capsys.readouterr().err
    assert conv.main(["--encoder", str(enc_path), "--force", str(dst)]) == 0
    assert D.load_dalle_tokenizer(dst)[0]["encoder"]["n_hid"] == 32


def test_tampered_params_fail_the_hash(tmp_path):
    enc_path, _ = _write(tmp_path / "encoder.pkl", lambda b: b.encoder(32, 1, 64))
    assert conv.main(["--encoder", str(enc_path), str(tmp_path / "out")]) == 0
    meta_path = tmp_path / "out" / store.META_FILE
    meta_path.write_text(meta_path.read_text().replace('"weights_sha256": "', '"weights_sha256": "0'))
    with pytest.raises(ValueError, match="weights_sha256"):
        D.load_dalle_tokenizer(tmp_path / "out")
