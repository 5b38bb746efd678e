"""Hostile checkpoint files: each one a case of issue 17, then random and mutated files (property-based). Every
file either loads or raises CheckpointError, quickly and without allocating more than the tensors it declares."""

import contextlib
import json
import re
import struct
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from bounds import within
from hypothesis import given
from hypothesis import strategies as st
from torch_format import Build, save_torch_object, save_torch_state_dict

from m2bert_hf_mlx.checkpoint_reader import checkpoint_keys, load_state_dict
from m2bert_hf_mlx.errors import CheckpointError


def read(path, seconds=5):
    """What load_state_dict makes of a file: its arrays or its CheckpointError, within `seconds` and 512 MB."""
    with within(seconds=seconds, megabytes=512):
        try:
            return load_state_dict(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
            return e


def write_zip(path, pickle_bytes, records=(), compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        for name, data in records:
            archive.writestr(f"archive/data/{name}", data, compress_type=compress)


def tensor_pickle(
    storage_numel=12,
    offset=b"J\x00\x00\x00\x00",
    shape=b"(J\x03\x00\x00\x00J\x04\x00\x00\x00t",
    stride=b"(J\x04\x00\x00\x00J\x01\x00\x00\x00t",
    storage_type=b"FloatStorage",
    numel=None,
):
    """{"w": tensor} as torch.save pickles it, with any of the rebuild arguments replaced by raw pickle bytes."""
    numel = numel if numel is not None else b"J" + struct.pack("<i", storage_numel)
    storage = (
        b"(X\x07\x00\x00\x00storagectorch\n"
        + storage_type
        + b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        + numel
        + b"tQ"
    )
    rebuild = (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + storage
        + offset
        + shape
        + stride
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )
    return b"\x80\x02}X\x01\x00\x00\x00w" + rebuild + b"s."


def write_tensor(path, **arguments):
    write_zip(path, tensor_pickle(**arguments), [("0", np.arange(12, dtype=np.float32).tobytes())])


def test_the_crafted_tensor_pickle_is_a_valid_checkpoint(tmp_path):
    write_tensor(tmp_path / "ok.bin")
    np.testing.assert_array_equal(
        load_state_dict(tmp_path / "ok.bin")["w"], np.arange(12, dtype=np.float32).reshape(3, 4)
    )


# ---------------------------------------------------------------------------------------------------------------
# Pickles that hang, crash or modify what the reader built


def test_a_dict_key_whose_hash_is_exponential_is_refused_at_once(tmp_path):
    # t0 = (); t_{i+1} = (t_i, t_i) through the memo: 60 levels in under 300 bytes, 2^60 tuples to hash.
    body = b")q\x00"
    for i in range(60):
        body += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
    write_zip(tmp_path / "dag.bin", b"\x80\x02}" + body + b"K\x01s.")
    error = read(tmp_path / "dag.bin")
    assert isinstance(error, CheckpointError) and "uses a tuple as a dict key" in str(error)


def test_an_ordered_dict_built_from_pairs_checks_its_keys_too(tmp_path):
    dag = b")q\x000"  # the same DAG, left in the memo only
    for i in range(60):
        dag += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    pairs = b"](h<K\x01\x86e\x85"  # ([(dag, 1)],), the argument tuple of OrderedDict
    write_zip(tmp_path / "dag.bin", b"\x80\x02ccollections\nOrderedDict\n" + dag + pairs + b"R.")
    error = read(tmp_path / "dag.bin")
    assert isinstance(error, CheckpointError) and "uses a tuple as a dict key" in str(error)


def test_a_key_nested_a_million_levels_deep_is_refused(tmp_path):
    write_zip(tmp_path / "deep.bin", b"\x80\x02}N" + b"\x85" * 10**6 + b"K\x01s.")
    error = read(tmp_path / "deep.bin", seconds=30)  # a million pickle operations, in pure Python
    assert isinstance(error, CheckpointError) and "as a dict key" in str(error)


def test_a_deeply_nested_value_is_reported_without_recursion(tmp_path):
    write_zip(tmp_path / "deep.bin", b"\x80\x02}X\x01\x00\x00\x00wN" + b"\x85" * 10**5 + b"s.")
    error = read(tmp_path / "deep.bin")
    assert isinstance(error, CheckpointError) and "entries 'w' are not named tensors" in str(error)


def test_deeply_nested_marks_are_refused(tmp_path):
    write_zip(tmp_path / "marks.bin", b"\x80\x02" + b"(" * 10**5 + b".")
    assert "nests more than" in str(read(tmp_path / "marks.bin"))


def test_a_pickle_with_too_many_operations_is_refused(tmp_path):
    write_zip(tmp_path / "long.bin", b"\x80\x02]" + b"N0" * 1_000_001 + b".")
    assert "more than 2000000 operations" in str(read(tmp_path / "long.bin", seconds=30))


def test_build_after_a_rebuild_cannot_reshape_the_tensor(tmp_path):
    state = (None, {"shape": (1000,), "stride": (1,)})
    save_torch_object({"w": Build(np.zeros(4, np.float32), state)}, tmp_path / "build.bin")
    assert "tries to modify a _Tensor" in str(read(tmp_path / "build.bin"))


def test_protocol_5_buffers_are_refused_before_allocating(tmp_path):
    write_zip(tmp_path / "p5.bin", b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".")
    assert "out-of-band buffers" in str(read(tmp_path / "p5.bin"))


def test_declared_lengths_longer_than_the_file_do_not_allocate(tmp_path):
    write_zip(tmp_path / "long.bin", b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"ab")
    assert isinstance(read(tmp_path / "long.bin"), CheckpointError)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(shape=b"](J\x03\x00\x00\x00J\x04\x00\x00\x00e"), r"invalid shape \[3, 4\]"),
        (dict(shape=b"(G" + struct.pack(">d", 3.0) + b"J\x04\x00\x00\x00t"), r"invalid shape \(3.0, 4\)"),
        (dict(shape=b"(\x8a\x09" + (2**70).to_bytes(9, "little") + b"J\x04\x00\x00\x00t"), "invalid shape"),
        (dict(shape=b"(J\xfd\xff\xff\xffJ\x04\x00\x00\x00t"), r"invalid shape \(-3, 4\)"),
        (dict(shape=b"(\x88J\x04\x00\x00\x00t"), r"invalid shape \(True, 4\)"),
        (dict(offset=b"X\x01\x00\x00\x000"), "invalid storage offset '0'"),
        (dict(numel=b"G" + struct.pack(">d", 12.0)), "invalid storage size 12.0"),
        (dict(storage_type=b"ObjectStorage"), "tensors of type 'ObjectStorage'"),
        (dict(stride=b"(J\x04\x00\x00\x00t"), "of different lengths"),
        (dict(offset=b"J\x01\x00\x00\x00"), "reaches element 12 of a storage of 12"),
    ],
)
def test_wrong_rebuild_arguments_are_checkpoint_errors(tmp_path, arguments, message):
    write_tensor(tmp_path / "bad.bin", **arguments)
    error = read(tmp_path / "bad.bin")
    assert isinstance(error, CheckpointError)
    assert re.search(message, str(error)), str(error)


def test_a_storage_that_is_not_a_storage_record(tmp_path):
    pickle_bytes = tensor_pickle().replace(b"tQ", b"t0J\x05\x00\x00\x00")
    write_zip(tmp_path / "int.bin", pickle_bytes, [("0", bytes(48))])
    assert "has no storage record" in str(read(tmp_path / "int.bin"))


def test_a_stride_0_view_cannot_grow_past_its_storage(tmp_path):
    shape, stride = b"(J\x00\x00\x00@t", b"(J\x00\x00\x00\x00t"  # (2^30,) with stride 0 over one element
    write_zip(tmp_path / "view.bin", tensor_pickle(storage_numel=1, shape=shape, stride=stride), [("0", bytes(4))])
    assert "shape (1073741824,) has more elements than its storage of 1" in str(read(tmp_path / "view.bin"))


def test_a_compressed_storage_record_is_refused_before_inflating(tmp_path):
    write_zip(tmp_path / "bomb.bin", tensor_pickle(), [("0", bytes(64 * 2**20))], compress=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.bin").stat().st_size < 200_000
    assert "record 'archive/data/0' is compressed" in str(read(tmp_path / "bomb.bin"))


def test_a_storage_record_longer_than_its_storage_is_refused(tmp_path):
    write_zip(tmp_path / "long.bin", tensor_pickle(), [("0", bytes(4 * 13))])
    assert "holds 13 elements but its tensors need 12" in str(read(tmp_path / "long.bin"))


def test_storage_keys_cannot_name_other_records(tmp_path):
    write_zip(tmp_path / "key.bin", tensor_pickle().replace(b"X\x01\x00\x00\x000", b"X\x05\x00\x00\x00../xx", 1))
    assert "invalid key '../xx'" in str(read(tmp_path / "key.bin"))


def test_names_from_the_file_are_quoted_in_errors(tmp_path):
    name = "w\nm2bert-mlx convert: OK\x1b[2J"
    save_torch_object({name: 3}, tmp_path / "name.bin")
    error = read(tmp_path / "name.bin")
    assert "\n" not in str(error) and "\x1b" not in str(error) and repr(name) in str(error)


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers


def write_safetensors(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [64.9], "data_offsets": [0, 256]}, r"invalid shape \(64.9,\)"),
        ({"dtype": "F32", "shape": [2**70, 2**70], "data_offsets": [0, 0]}, "invalid shape"),
        ({"dtype": "F32", "shape": ["64"], "data_offsets": [0, 256]}, "invalid shape"),
        ({"dtype": "F32", "shape": [64], "data_offsets": [0, 2.5]}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [64], "data_offsets": [0, 256, 3]}, "does not fit the file"),
        ({"dtype": "F32", "shape": [64], "data_offsets": [-4, 252]}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [64], "data_offsets": [0, 10**12]}, "does not fit the file"),
        ({"dtype": "O", "shape": [64], "data_offsets": [0, 256]}, "unsupported header entry"),
        ({"dtype": ["F32"], "shape": [64], "data_offsets": [0, 256]}, "unsupported header entry"),
        ([1, 2], "unsupported header entry"),
    ],
)
def test_invalid_safetensors_entries(tmp_path, entry, message):
    write_safetensors(tmp_path / "m.safetensors", {"w": entry}, bytes(256))
    error = read(tmp_path / "m.safetensors")
    assert isinstance(error, CheckpointError) and re.search(message, str(error)), str(error)


def test_a_deeply_nested_safetensors_header(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "unreadable header (RecursionError)" in str(read(tmp_path / "m.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Property-based: random and mutated files


def valid_files(tmp_path):
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float16), "i": np.arange(3)}
    state["t"] = state["w"].T
    save_torch_state_dict(state, tmp_path / "valid.bin")
    mx.save_safetensors(str(tmp_path / "valid.safetensors"), {k: mx.array(v) for k, v in state.items()})
    names = ["valid.bin", "valid.safetensors"]
    try:
        import torch
    except ImportError:  # the legacy format is written by torch only; the other two still run
        pass
    else:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        tensors["t"] = tensors["w"].T  # a view, as the legacy format stores them
        torch.save(tensors, tmp_path / "valid.pt", _use_new_zipfile_serialization=False)
        names.append("valid.pt")
    return {name: (tmp_path / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return valid_files(tmp_path_factory.mktemp("valid"))


def check_outcome(outcome):
    if isinstance(outcome, dict):
        assert all(isinstance(v, np.ndarray) for v in outcome.values())
    else:
        assert isinstance(outcome, CheckpointError)


@given(data=st.data())
def test_mutated_files_load_or_raise_a_checkpoint_error(tmp_path_factory, valid, data):
    name = data.draw(st.sampled_from(sorted(valid)))
    content = bytearray(valid[name])
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, len(content) - 1))
        kind = data.draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        if kind == "flip":
            content[where] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte":
            content[where] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del content[where:]
            if not content:
                content = bytearray(b"\x80")
        else:
            content[where:where] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path_factory.mktemp("mutated") / name
    path.write_bytes(bytes(content))
    check_outcome(read(path))


# Opcodes of every protocol, each with a valid argument encoding; the streams they form are random.
_ARGUMENT = {
    "none": st.just(b""),
    "u1": st.integers(0, 255).map(lambda n: bytes([n])),
    "u2": st.integers(0, 2**16 - 1).map(lambda n: struct.pack("<H", n)),
    "i4": st.integers(-(2**31), 2**31 - 1).map(lambda n: struct.pack("<i", n)),
    "u4": st.integers(0, 64).map(lambda n: struct.pack("<I", n)),
    "f8": st.floats().map(lambda x: struct.pack(">d", x)),
    "text": st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),
    "global": st.sampled_from(
        [
            b"torch._utils\n_rebuild_tensor_v2\n",
            b"collections\nOrderedDict\n",
            b"torch\nFloatStorage\n",
            b"os\nsystem\n",
            b"builtins\nset\n",
            b"torch._utils\n_rebuild_parameter\n",
            b"numpy\ndtype\n",
            b"x\ny\n",
        ]
    ),
}


def _opcode(code, argument):
    if argument == "text":
        return _ARGUMENT["text"].map(lambda s: code + struct.pack("<I", len(s)) + s)
    if argument == "short":
        return _ARGUMENT["text"].map(lambda s: code + bytes([len(s) % 256]) + s[:255])
    return _ARGUMENT[argument].map(lambda a: code + a)


_OPCODES = st.one_of(
    [
        _opcode(op, "none")
        for op in (
            b"(",
            b")",
            b"]",
            b"}",
            b"N",
            b"\x88",
            b"\x89",
            b"t",
            b"\x85",
            b"\x86",
            b"\x87",
            b"l",
            b"e",
            b"a",
            b"d",
            b"s",
            b"u",
            b"R",
            b"\x81",
            b"b",
            b"0",
            b"1",
            b"2",
            b"Q",
            b"\x8f",
            b"\x90",
            b"\x91",
            b"\x92",
            b"\x93",
            b"\x94",
        )
    ]
    + [
        _opcode(b"K", "u1"),
        _opcode(b"M", "u2"),
        _opcode(b"J", "i4"),
        _opcode(b"G", "f8"),
        _opcode(b"X", "text"),
        _opcode(b"\x8c", "short"),
        _opcode(b"C", "short"),
        _opcode(b"B", "text"),
        _opcode(b"h", "u1"),
        _opcode(b"q", "u1"),
        _opcode(b"j", "u4"),
        _opcode(b"r", "u4"),
        _opcode(b"c", "global"),
        _opcode(b"\x8a", "short"),
    ]
)


@given(ops=st.lists(_OPCODES, max_size=60), protocol=st.sampled_from([b"\x80\x02", b"\x80\x04", b""]))
def test_random_pickles_load_or_raise_a_checkpoint_error(tmp_path_factory, ops, protocol):
    path = tmp_path_factory.mktemp("pickle") / "random.bin"
    write_zip(path, protocol + b"".join(ops) + b".", [("0", np.arange(12, dtype=np.float32).tobytes())])
    check_outcome(read(path))
    with within(), contextlib.suppress(CheckpointError):
        checkpoint_keys(path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "X"]) | _JSON,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | _JSON,
        "data_offsets": st.lists(st.integers(-2, 2**20), min_size=2, max_size=2) | _JSON,
    }
)


@given(header=st.dictionaries(st.text(max_size=6), _ENTRY | _JSON, max_size=4), data=st.binary(max_size=256))
def test_random_safetensors_headers_load_or_raise_a_checkpoint_error(tmp_path_factory, header, data):
    path = tmp_path_factory.mktemp("st") / "random.safetensors"
    write_safetensors(path, header, data)
    check_outcome(read(path))


def test_a_record_size_beyond_the_file_is_refused_before_zipfile_allocates_it(tmp_path):
    # Found by the mutation test: a flipped bit of a size in the zip's central directory made zipfile allocate 2 GB.
    save_torch_state_dict({"w": np.arange(12, dtype=np.float32)}, tmp_path / "ok.bin")
    data = bytearray((tmp_path / "ok.bin").read_bytes())
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(b"archive/data.pkl") + 1)
    data[entry + 20 : entry + 28] = struct.pack("<II", 2**31, 2**31)  # compressed and uncompressed size
    (tmp_path / "big.bin").write_bytes(bytes(data))
    assert "declares a size that does not fit the file" in str(read(tmp_path / "big.bin"))
