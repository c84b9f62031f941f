"""Tests of the restricted torch-file reader (no torch needed: files are written by hand).

`write_torch_zip` and the tiny pickle-opcode writer below are also used by test_dalle.py.
"""

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vimpac_jax.conversion import torch_pickle as tp

GOLDEN = Path("/work/shared/golden")


# ------------------------------------------------------------------------------------------
# A minimal protocol-2 pickle writer: enough to emit what torch.save writes, without torch.


class Global:
    """A reference to `module.name` (GLOBAL opcode); the name need not exist here."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """`func(*args)` through REDUCE."""

    def __init__(self, func, args=()):
        self.func, self.args = func, tuple(args)


class Obj:
    """`cls.__new__(cls)` (NEWOBJ) followed by BUILD with `state`, as modules pickle."""

    def __init__(self, cls, state):
        self.cls, self.state = cls, state


class PersId:
    """A persistent id (BINPERSID), as torch writes for storages."""

    def __init__(self, pid):
        self.pid = tuple(pid)


def dumps(obj) -> bytes:
    """Serialise a tree of builtins and the helper nodes above into protocol-2 opcodes."""
    out = bytearray(b"\x80\x02")

    def w(x):
        if x is None:
            out.extend(b"N")
        elif x is True:
            out.extend(b"\x88")
        elif x is False:
            out.extend(b"\x89")
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            data = x.encode()
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(x, Global):
            out.extend(f"c{x.module}\n{x.name}\n".encode())
        elif isinstance(x, Call):
            w(x.func)
            w(x.args)
            out.extend(b"R")
        elif isinstance(x, Obj):
            w(x.cls)
            out.extend(b")\x81")
            w(x.state)
            out.extend(b"b")
        elif isinstance(x, PersId):
            w(x.pid)
            out.extend(b"Q")
        elif isinstance(x, tuple):
            out.extend(b"(")
            for item in x:
                w(item)
            out.extend(b"t")
        elif isinstance(x, list):
            out.extend(b"](")
            for item in x:
                w(item)
            out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}")
            if x:
                out.extend(b"(")
                for k, v in x.items():
                    w(k)
                    w(v)
                out.extend(b"u")
        else:
            raise TypeError(type(x))

    w(obj)
    out.extend(b".")
    return bytes(out)


def tensor(key, storage="FloatStorage", numel=1, offset=0, size=(1,), stride=(1,),
           module="torch", parameter=False):
    """The `_rebuild_tensor_v2(...)` call torch writes for one tensor."""
    pid = PersId(("storage", Global(module, storage), str(key), "cpu", numel))
    node = Call(Global("torch._utils", "_rebuild_tensor_v2"),
                (pid, offset, tuple(size), tuple(stride), False, Call(Global("collections", "OrderedDict"))))
    if parameter:
        node = Call(Global("torch._utils", "_rebuild_parameter"),
                    (node, False, Call(Global("collections", "OrderedDict"))))
    return node


def state_dict_pickle(entries: dict) -> bytes:
    """A pickled OrderedDict {name: tensor-node}, SETITEMS after REDUCE as torch does."""
    body = bytearray(dumps(Call(Global("collections", "OrderedDict"), ()))[:-1])
    inner = dumps(entries)  # b'\x80\x02}(...u.' -> reuse the items between '}' and '.'
    assert inner[2:3] == b"}"
    body.extend(inner[3:-1])  # '(' k v ... 'u'
    body.extend(b".")
    return bytes(body)


def write_torch_zip(path, pickle_bytes: bytes, blobs: dict, top: str = "archive",
                    byteorder: str = "little"):
    """Write a torch zip-format file: <top>/data.pkl, byteorder, data/<key> blobs."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/data.pkl", pickle_bytes)
        z.writestr(f"{top}/byteorder", byteorder)
        z.writestr(f"{top}/version", "3\n")
        for key, blob in blobs.items():
            z.writestr(f"{top}/data/{key}", blob)
    return path


# ------------------------------------------------------------------------------------------
# Golden files


def test_golden_state_dict_loads():
    sd = tp.load_state_dict(GOLDEN / "vimpac_a" / "classifier.pt")
    assert len(sd) >= 82
    assert sd["backbone.embedding.weight"].shape == (8197, 128)
    assert sd["backbone.embedding.weight"].dtype == np.float32
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    # BatchNorm's counter is an int64 0-d tensor.
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert counters and all(sd[k].shape == () and sd[k].dtype == np.int64 for k in counters)
    # The MLM decoder is tied to the embedding: same values, independent copies.
    tied = [k for k in sd if k.startswith("mlm_head") and k.endswith("decoder.weight")]
    for k in tied:
        np.testing.assert_array_equal(sd[k], sd["backbone.embedding.weight"])


def test_golden_args_pickle():
    args = tp.load_plain_pickle(GOLDEN / "vimpac_a" / "args.pickle")
    assert isinstance(args, dict)
    assert args["model"] == "efflayoutT,H|W"


def test_golden_module_pickle():
    enc = tp.load_module(GOLDEN / "dalle_tiny" / "encoder.pkl")
    assert enc.class_name == "dall_e.encoder.Encoder"
    assert enc.state["n_hid"] == 64 and enc.state["vocab_size"] == 512
    assert isinstance(enc.state["_modules"]["blocks"], tp.ModuleRecord)
    named = tp.named_tensors(enc)
    assert named["blocks.input.w"].shape == (64, 3, 7, 7)
    assert named["blocks.group_1.block_1.res_path.conv_1.w"].shape == (16, 64, 3, 3)
    assert named["blocks.output.conv.w"].shape == (512, 512, 1, 1)


# ------------------------------------------------------------------------------------------
# Hand-made files: dtypes, views, CUDA storage names


def test_dtypes_views_and_offsets(tmp_path):
    base = np.arange(24, dtype=np.float16)  # storage "0": a 4x6 half matrix
    ints = np.array([7, -3, 11], dtype=np.int64)
    flags = np.array([True, False, True], dtype=np.bool_)
    entries = {
        # rows 1.., every other column: offset 6, strides (6, 2)
        "half_view": tensor(0, "HalfStorage", 24, offset=6, size=(3, 3), stride=(6, 2)),
        # the transpose: strides (1, 6)
        "half_t": tensor(0, "HalfStorage", 24, offset=0, size=(6, 4), stride=(1, 6)),
        "scalar": tensor(1, "LongStorage", 3, offset=2, size=(), stride=()),
        "longs": tensor(1, "LongStorage", 3, size=(3,), stride=(1,)),
        "flags": tensor(2, "BoolStorage", 3, size=(3,), stride=(1,)),
        "cuda_float": tensor(3, "FloatStorage", 2, size=(2,), stride=(1,), module="torch.cuda"),
        "bf16": tensor(4, "BFloat16Storage", 2, size=(2,), stride=(1,)),
        "empty": tensor(3, "FloatStorage", 2, size=(0, 5), stride=(5, 1)),
    }
    blobs = {"0": base.tobytes(), "1": ints.tobytes(), "2": flags.tobytes(),
             "3": np.array([1.5, -2.0], np.float32).tobytes(),
             # bfloat16 1.0 and -2.0 are the upper halves of the float32 bit patterns
             "4": np.array([0x3F80, 0xC000], np.uint16).tobytes()}
    path = write_torch_zip(tmp_path / "views.pt", state_dict_pickle(entries), blobs, top="views")
    sd = tp.load_state_dict(path)
    m = base.reshape(4, 6)
    np.testing.assert_array_equal(sd["half_view"], m[1:, ::2])
    assert sd["half_view"].dtype == np.float16 and sd["half_view"].flags.c_contiguous
    np.testing.assert_array_equal(sd["half_t"], m.T)
    assert sd["scalar"].shape == () and sd["scalar"] == 11 and sd["scalar"].dtype == np.int64
    np.testing.assert_array_equal(sd["longs"], ints)
    assert sd["flags"].dtype == np.bool_ and sd["flags"].tolist() == [True, False, True]
    assert sd["cuda_float"].dtype == np.float32 and sd["cuda_float"].tolist() == [1.5, -2.0]
    assert sd["bf16"].dtype.name == "bfloat16" and sd["bf16"].astype(np.float32).tolist() == [1.0, -2.0]
    assert sd["empty"].shape == (0, 5)
    # Copies, not views of the archive buffer.
    assert sd["half_view"].flags.writeable and sd["half_view"].base is None


def test_tensor_outside_its_storage_is_refused(tmp_path):
    entries = {"w": tensor(0, "FloatStorage", 4, offset=2, size=(3,), stride=(1,))}
    path = write_torch_zip(tmp_path / "oob.pt", state_dict_pickle(entries),
                           {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match="reaches element"):
        tp.load_state_dict(path)


def test_views_of_more_elements_than_their_storage_are_refused_before_allocating(tmp_path):
    """A zero stride over a 1-element storage would materialise 2^30 floats (4 GiB) from a file
    of a few hundred bytes; refused naming the file and the tensor, before any allocation."""
    import tracemalloc

    cases = {
        "zero_stride": (tensor(0, "FloatStorage", 1, size=(2 ** 30,), stride=(0,)), "more than its storage"),
        "overlapping": (tensor(0, "FloatStorage", 3, size=(2, 2), stride=(1, 1)), "more than its storage"),
        "negative_stride": (tensor(0, "FloatStorage", 4, offset=3, size=(4,), stride=(-1,)), "negative"),
        "negative_size": (tensor(0, "FloatStorage", 4, size=(-2,), stride=(1,)), "negative"),
        "rank": (tensor(0, "FloatStorage", 4, size=(2, 2), stride=(1,)), "differ in rank"),
        "huge_size": (tensor(0, "FloatStorage", 4, size=(2 ** 31 - 1, 2 ** 31 - 1), stride=(1, 1)), "reaches element"),
    }
    for name, (node, message) in cases.items():
        path = write_torch_zip(tmp_path / f"{name}.pt", state_dict_pickle({"classifier.weight": node}),
                               {"0": np.zeros(4, np.float32).tobytes()})
        assert path.stat().st_size < 2048
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=message) as raised:
                tp.load_state_dict(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(path) in str(raised.value) and "tensor classifier.weight" in str(raised.value), raised.value
        assert peak < 1 << 20, (name, peak)  # nothing near size x itemsize was asked for
    # A tensor that reuses part of its storage with a zero stride but no more elements is a real view.
    path = write_torch_zip(tmp_path / "fine.pt", state_dict_pickle(
        {"w": tensor(0, "FloatStorage", 4, offset=1, size=(2, 2), stride=(0, 1))}),
        {"0": np.arange(4, dtype=np.float32).tobytes()})
    np.testing.assert_array_equal(tp.load_state_dict(path)["w"], [[1, 2], [1, 2]])


def test_short_storage_blob_is_refused(tmp_path):
    entries = {"w": tensor(0, "FloatStorage", 100, size=(100,), stride=(1,))}
    path = write_torch_zip(tmp_path / "short.pt", state_dict_pickle(entries),
                           {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match="bytes"):
        tp.load_state_dict(path)


def test_not_a_zip_is_a_clear_error(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="zip"):
        tp.load_state_dict(path)


# ------------------------------------------------------------------------------------------
# Malicious files: refused before anything runs


class _Evil:
    """Pickles (with the real pickler) as a call of os.system: STACK_GLOBAL 'posix system'."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _evil_payloads(marker: Path):
    cmd = f"touch {marker}"
    yield "GLOBAL os.system", dumps(Call(Global("os", "system"), (cmd,)))
    yield "GLOBAL posix.system", dumps(Call(Global("posix", "system"), (cmd,)))
    yield "builtins.eval", dumps(Call(Global("builtins", "eval"), (f"__import__('os').system({cmd!r})",)))
    yield "subprocess", dumps(Call(Global("subprocess", "check_call"), (["touch", str(marker)],)))
    for proto in (2, 4):
        yield f"reduce proto {proto}", pickle.dumps(_Evil(cmd), protocol=proto)
    # Hidden inside an otherwise valid state dict, after a real tensor.
    yield "nested", state_dict_pickle({
        "w": tensor(0, "FloatStorage", 1),
        "x": Call(Global("os", "system"), (cmd,)),
    })


def test_malicious_state_dict_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for label, payload in _evil_payloads(marker):
        path = write_torch_zip(tmp_path / "classifier.pt", payload,
                               {"0": np.zeros(1, np.float32).tobytes()}, top="classifier")
        for loader in (tp.load_state_dict, tp.load_module):
            with pytest.raises(tp.UnsafePickleError) as err:
                loader(path)
            assert "classifier.pt" in str(err.value), label
            assert "refused global" in str(err.value), label
        assert not marker.exists(), label


def test_malicious_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for label, payload in _evil_payloads(marker):
        path = tmp_path / "args.pickle"
        path.write_bytes(payload)
        with pytest.raises(tp.UnsafePickleError, match="args.pickle"):
            tp.load_plain_pickle(path)
        assert not marker.exists(), label


def test_refused_names_are_reported(tmp_path):
    path = write_torch_zip(tmp_path / "x.pt", dumps(Call(Global("os", "system"), ("true",))), {})
    with pytest.raises(tp.UnsafePickleError, match=r"'os\.system'"):
        tp.load_state_dict(path)


def test_module_classes_only_in_load_module(tmp_path):
    module = Obj(Global("torch.nn.modules.activation", "ReLU"),
                 {"training": True, "_parameters": {}, "_buffers": {}, "_modules": {}})
    path = write_torch_zip(tmp_path / "relu.pkl", dumps(module), {})
    with pytest.raises(tp.UnsafePickleError, match="ReLU"):
        tp.load_state_dict(path)
    record = tp.load_module(path)
    assert record.class_name == "torch.nn.modules.activation.ReLU"
    assert record.state["training"] is True and tp.named_tensors(record) == {}
    # ...and a module class other than the allowed ones is refused there too.
    other = Obj(Global("torch.nn.modules.linear", "Linear"), {})
    write_torch_zip(tmp_path / "lin.pkl", dumps(other), {})
    with pytest.raises(tp.UnsafePickleError, match="Linear"):
        tp.load_module(tmp_path / "lin.pkl")


def test_plain_pickle_refuses_torch_globals(tmp_path):
    path = tmp_path / "p.pickle"
    path.write_bytes(dumps(Call(Global("collections", "OrderedDict"), ())))
    with pytest.raises(tp.UnsafePickleError):
        tp.load_plain_pickle(path)
    path.write_bytes(pickle.dumps({"a": [1, 2.5, "x", None, (True,)], "s": {1, 2}}, protocol=4))
    assert tp.load_plain_pickle(path) == {"a": [1, 2.5, "x", None, (True,)], "s": {1, 2}}
