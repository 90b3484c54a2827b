"""GPT-2 weights into `gpt.GPT`: OpenAI's TensorFlow checkpoint (read with numpy alone) and Hugging Face safetensors.

`load_gpt2(name_or_path)` accepts a model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl: taken from the
download cache, downloaded when missing), a folder of OpenAI's files (hparams.json, model.ckpt.index,
model.ckpt.data-00000-of-00001), a .safetensors file, or a folder holding model.safetensors. Every
tensor is mapped by the one table NAME_TABLE below and its shape checked; anything wrong is one line.

OpenAI's checkpoint is a TensorFlow "tensor bundle": `model.ckpt.index` is an SSTable (LevelDB's table
format) whose keys are tensor names and whose values are BundleEntryProto messages saying where each
tensor's bytes lie in `model.ckpt.data-00000-of-00001`. Both layers are parsed here by hand.
"""
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from gpt.config import PRESETS, GPTConfig
from gpt.model import GPT


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line saying what and where."""


# --------------------------------------------------------------------------------------------------
# The one table: our parameter (a key of gpt.GPT's state_dict) <- its tensor in each format.
# {i} is the block index. Hugging Face names are the hub layout (openai-community/gpt2*);
# transformers' save_pretrained writes the same names behind a "transformer." prefix.
# The last two columns say how the checkpoint's array turns into ours: nn.Linear holds (out, in),
# Hugging Face's Conv1D holds (in, out), and OpenAI's conv1d holds (1, in, out).
NAME_TABLE = [
    # ours                                   OpenAI (TensorFlow)           Hugging Face                 OpenAI   HF
    ("transformer.wte.weight",               "model/wte",                  "wte.weight",                "same",  "same"),
    ("transformer.wpe.weight",               "model/wpe",                  "wpe.weight",                "same",  "same"),
    ("transformer.h.{i}.ln_1.weight",        "model/h{i}/ln_1/g",          "h.{i}.ln_1.weight",         "same",  "same"),
    ("transformer.h.{i}.ln_1.bias",          "model/h{i}/ln_1/b",          "h.{i}.ln_1.bias",           "same",  "same"),
    ("transformer.h.{i}.attn.c_attn.weight", "model/h{i}/attn/c_attn/w",   "h.{i}.attn.c_attn.weight",  "[0].T", ".T"),
    ("transformer.h.{i}.attn.c_attn.bias",   "model/h{i}/attn/c_attn/b",   "h.{i}.attn.c_attn.bias",    "same",  "same"),
    ("transformer.h.{i}.attn.c_proj.weight", "model/h{i}/attn/c_proj/w",   "h.{i}.attn.c_proj.weight",  "[0].T", ".T"),
    ("transformer.h.{i}.attn.c_proj.bias",   "model/h{i}/attn/c_proj/b",   "h.{i}.attn.c_proj.bias",    "same",  "same"),
    ("transformer.h.{i}.ln_2.weight",        "model/h{i}/ln_2/g",          "h.{i}.ln_2.weight",         "same",  "same"),
    ("transformer.h.{i}.ln_2.bias",          "model/h{i}/ln_2/b",          "h.{i}.ln_2.bias",           "same",  "same"),
    ("transformer.h.{i}.mlp.c_fc.weight",    "model/h{i}/mlp/c_fc/w",      "h.{i}.mlp.c_fc.weight",     "[0].T", ".T"),
    ("transformer.h.{i}.mlp.c_fc.bias",      "model/h{i}/mlp/c_fc/b",      "h.{i}.mlp.c_fc.bias",       "same",  "same"),
    ("transformer.h.{i}.mlp.c_proj.weight",  "model/h{i}/mlp/c_proj/w",    "h.{i}.mlp.c_proj.weight",   "[0].T", ".T"),
    ("transformer.h.{i}.mlp.c_proj.bias",    "model/h{i}/mlp/c_proj/b",    "h.{i}.mlp.c_proj.bias",     "same",  "same"),
    ("transformer.ln_f.weight",              "model/ln_f/g",               "ln_f.weight",               "same",  "same"),
    ("transformer.ln_f.bias",                "model/ln_f/b",               "ln_f.bias",                 "same",  "same"),
]
TIED = {"lm_head.weight": "transformer.wte.weight"}  # the output head is the token embedding, one Parameter
# Hugging Face tensors that are not weights: the causal-mask buffers older transformers saved (the hub's
# gpt2 model.safetensors holds them). A save_pretrained file may also hold lm_head.weight: it must equal wte.
HF_NOT_WEIGHTS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# how each "turn" maps an array, and the checkpoint shape it expects given our (out, in)-style shape
TURNS = {
    "same": (lambda a: a, lambda shape: shape),
    ".T": (lambda a: a.T, lambda shape: shape[::-1]),
    "[0].T": (lambda a: a[0].T, lambda shape: (1, *shape[::-1])),
}
FORMAT_COLUMN = {"openai": 1, "hf": 2}


def name_map(fmt: str, n_layer: int) -> dict:
    """{checkpoint name: (our name, turn)} for format "openai" or "hf" (hub layout) and n_layer blocks."""
    col = FORMAT_COLUMN[fmt]
    out = {}
    for row in NAME_TABLE:
        for i in range(n_layer) if "{i}" in row[0] else [None]:
            out[row[col].format(i=i)] = (row[0].format(i=i), row[col + 2])
    return out


# --------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), vectorised with numpy. The register update per byte is linear over GF(2), so
# feeding n zero bytes is a 32x32 bit matrix Z_n, stored as 4 byte-tables (or 2 tables of 16 bits),
# and a long message is cut into many lanes that advance together (Horner's rule over rows).
_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _byte_table():
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_IDENTITY = np.stack([np.arange(256, dtype=np.uint32) << np.uint32(8 * k) for k in range(4)])  # (4, 256)
_ONE_ZERO_BYTE = _byte_table()[_IDENTITY & 0xFF] ^ (_IDENTITY >> 8)  # Z_1 as byte-tables


def _apply(m, x):
    """The linear map `m` (4 byte-tables) applied to uint32 `x`."""
    x = np.asarray(x, dtype=np.uint32)
    return m[0][x & 0xFF] ^ m[1][(x >> 8) & 0xFF] ^ m[2][(x >> 16) & 0xFF] ^ m[3][x >> 24]


@lru_cache(maxsize=None)
def _zeros(n):
    """Z_n: the register after n zero bytes, as byte-tables (square and multiply)."""
    result, power = _IDENTITY, _ONE_ZERO_BYTE
    while n:
        if n & 1:
            result = _apply(power, result)
        power, n = _apply(power, power), n >> 1
    return result


@lru_cache(maxsize=None)
def _zeros16(n):
    """Z_n as two tables indexed by the low and high 16 bits (two lookups per 32-bit word)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    return _apply(_zeros(n), v), _apply(_zeros(n), v << np.uint32(16))


def _register(words):
    """CRC register, from 0, after the little-endian uint32 `words`: XOR_k Z_4^(N-k)(w_k)."""
    while words.size > 1:
        lanes = 1 << min(16, max(0, (words.size // 64).bit_length() - 1))
        rows = -(-words.size // lanes)
        padded = np.zeros(rows * lanes, np.uint32)  # leading zero words leave a zero register at zero
        padded[padded.size - words.size:] = words
        lo, hi = _zeros16(4 * lanes)
        acc, a, b = (np.zeros(lanes, np.uint32) for _ in range(3))
        for row in padded.reshape(rows, lanes):  # acc = Z_(4 lanes)(acc) ^ row
            np.bitwise_and(acc, 0xFFFF, out=a)
            np.right_shift(acc, 16, out=b)
            np.take(lo, a, out=a)
            np.take(hi, b, out=b)
            np.bitwise_xor(a, b, out=acc)
            np.bitwise_xor(acc, row, out=acc)
        words = acc  # (lanes,): the same sum, over a message of `lanes` words
    return int(_apply(_zeros(4), words[0])) if words.size else 0


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object (about 1-2 s per 500 MB on one core)."""
    b = np.frombuffer(data, np.uint8)
    padded = np.zeros(-(-b.size // 4) * 4, np.uint8)  # pad in front to whole words
    padded[padded.size - b.size:] = b
    return int(_apply(_zeros(b.size), 0xFFFFFFFF)) ^ _register(padded.view("<u4")) ^ 0xFFFFFFFF


def masked_crc32c(data) -> int:
    """The masked CRC LevelDB and TensorFlow store: rotate right by 15 bits, add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# Protocol buffers, by hand: a message is (tag, value) pairs, tag = field_number << 3 | wire_type.
def _varint(buf, pos):
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf) -> dict:
    """{field number: [values]}: varints as int, fixed32/64 as int, length-delimited as bytes."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by tensor bundles")
        fields.setdefault(number, []).append(value)
    return fields


# TensorFlow DataType enum -> numpy (the numeric types; OpenAI's checkpoints are all DT_FLOAT = 1)
TF_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 17: "<u2", 19: "<f2",
             22: "<u4", 23: "<u8"}


def _bundle_entry(value: bytes) -> dict:
    """BundleEntryProto: dtype=1, shape=2 (TensorShapeProto: dim=2 {size=1}), shard_id=3, offset=4, size=5,
    crc32c=6 (fixed32, masked), slices=7."""
    f = _proto_fields(value)
    dims = [_proto_fields(d).get(1, [0])[0] for d in _proto_fields(f.get(2, [b""])[0]).get(2, [])]
    return dict(dtype=f.get(1, [0])[0], shape=tuple(dims), shard_id=f.get(3, [0])[0], offset=f.get(4, [0])[0],
                size=f.get(5, [0])[0], crc32c=f.get(6, [None])[0], sliced=7 in f)


# --------------------------------------------------------------------------------------------------
# SSTable (LevelDB table): data blocks of sorted (key, value) entries, an index block pointing at them,
# and a 48-byte footer. Each block ends in a 5-byte trailer: compression type, masked crc32c.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48


def _block(raw: bytes, handle: bytes, where: str) -> bytes:
    """The contents of the block a BlockHandle (varint offset, varint size) points at, trailer checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + 5 > len(raw):
        raise CheckpointError(f"{where} ends inside a block (truncated); download it again")
    contents, kind = raw[offset:offset + size], raw[offset + size]
    stored = int.from_bytes(raw[offset + size + 1:offset + size + 5], "little")
    if masked_crc32c(raw[offset:offset + size + 1]) != stored:
        raise CheckpointError(f"{where}: block at byte {offset} fails its crc32c (corrupt); download it again")
    if kind != 0:
        raise CheckpointError(f"{where}: block at byte {offset} is compressed (type {kind}); only uncompressed tables are read")
    return contents


def _block_entries(block: bytes):
    """Yield (key, value): each entry is varint shared, varint non_shared, varint value_length, key suffix,
    value; its key is the previous key's first `shared` bytes + the suffix. The block ends in restart
    offsets (uint32 each, then their count): entries there store their whole key (shared == 0)."""
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (n_restarts + 1)
    restarts = {int.from_bytes(block[end + 4 * k:end + 4 * k + 4], "little") for k in range(n_restarts)}
    key, pos = b"", 0
    while pos < end:
        start = pos
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if start in restarts and shared:
            raise ValueError(f"restart point at byte {start} shares {shared} key bytes")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


class TFCheckpoint:
    """OpenAI's TensorFlow checkpoint (a tensor bundle) read with numpy: `names`, `shape(name)`, `read(name)`."""

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        index = Path(f"{self.prefix}.index")
        where = f"checkpoint {index}"
        if not index.is_file():
            raise CheckpointError(f"{where}: file missing; download it again or check the folder")
        raw = index.read_bytes()
        if len(raw) < _FOOTER or int.from_bytes(raw[-8:], "little") != _TABLE_MAGIC:
            raise CheckpointError(f"{where}: not a TensorFlow table (no magic number at its end; truncated?); download it again")
        footer = raw[-_FOOTER:]
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle (offset, size)
        index_block = _block(raw, footer[pos:], where)
        entries = {}
        for _, data_handle in _block_entries(index_block):  # index block: last key of a data block -> its handle
            for key, value in _block_entries(_block(raw, data_handle, where)):
                entries[key.decode()] = value
        header = _proto_fields(entries.pop("", b""))  # BundleHeaderProto: num_shards=1, endianness=2 (0 = little)
        self.num_shards = header.get(1, [1])[0]
        if header.get(2, [0])[0] != 0:
            raise CheckpointError(f"{where}: big-endian tensor bundle; only little-endian is read")
        self.entries = {name: _bundle_entry(v) for name, v in entries.items()}
        for name, e in self.entries.items():
            if e["sliced"] or e["dtype"] not in TF_DTYPES:
                raise CheckpointError(f"{where}: tensor {name} is partitioned or of TF dtype {e['dtype']}; not supported")
            if e["size"] != np.dtype(TF_DTYPES[e["dtype"]]).itemsize * int(np.prod(e["shape"])):
                raise CheckpointError(f"{where}: tensor {name} claims {e['size']} bytes for shape {e['shape']}")

    @property
    def names(self):
        return list(self.entries)

    def shape(self, name):
        return self.entries[name]["shape"]

    def data_path(self, shard_id):
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def read(self, name, verify_crc=True) -> np.ndarray:
        """The tensor's bytes sliced from the data shard, checked against the stored crc32c."""
        e = self.entries[name]
        path = self.data_path(e["shard_id"])
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: file missing; download it again or check the folder")
        buf = bytearray(e["size"])  # writable, so torch can take the array without a copy
        with open(path, "rb") as f:
            f.seek(e["offset"])
            got = f.readinto(buf)
        if got != e["size"]:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} needs bytes {e['offset']}..{e['offset'] + e['size']} "
                f"but the file has {path.stat().st_size} (truncated); download it again")
        if verify_crc and e["crc32c"] is not None and masked_crc32c(buf) != e["crc32c"]:
            raise CheckpointError(f"checkpoint {path}: tensor {name} fails its crc32c (corrupt); download it again")
        return np.frombuffer(buf, TF_DTYPES[e["dtype"]]).reshape(e["shape"])


def read_tf_checkpoint(prefix, verify_crc=True) -> dict:
    """Every tensor of a TensorFlow checkpoint `prefix` (e.g. folder/model.ckpt) as {name: np.ndarray}."""
    ckpt = TFCheckpoint(prefix)
    return {name: ckpt.read(name, verify_crc) for name in ckpt.names}


# --------------------------------------------------------------------------------------------------
# Safetensors, behind the same small interface as TFCheckpoint.
class SafetensorsCheckpoint:
    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            keys = list(self._file.keys())
        except Exception as err:  # safetensors raises its own error type for a bad or cut header
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"checkpoint {self.path}: not a readable safetensors file ({reason}); "
                                  "download it again") from None
        self.prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        self.entries = {k[len(self.prefix):] if k.startswith(self.prefix) else k: k for k in keys}

    @property
    def names(self):
        return list(self.entries)

    def shape(self, name):
        return tuple(self._file.get_slice(self.entries[name]).get_shape())

    def read(self, name):
        try:
            return self._file.get_tensor(self.entries[name])
        except Exception as err:
            raise CheckpointError(f"checkpoint {self.path}: cannot read tensor {self.entries[name]} ({err}); "
                                  "the file is truncated or corrupt; download it again") from None


# --------------------------------------------------------------------------------------------------
def _describe(config: GPTConfig) -> str:
    for name in PRESETS:
        if config == GPTConfig.from_name(name):
            return name
    return (f"GPTConfig(vocab_size={config.vocab_size}, n_positions={config.n_positions}, n_embd={config.n_embd}, "
            f"n_layer={config.n_layer}, n_head={config.n_head})")


def _names_line(names, limit=6):
    names = sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _fill(ckpt, fmt: str, config: GPTConfig, where: str, extra_ok=()) -> GPT:
    """Build a GPT for `config` and fill every parameter from `ckpt` through NAME_TABLE, checking names and shapes.
    Names in `extra_ok` may be present and are not loaded."""
    mapping = name_map(fmt, config.n_layer)
    present = set(ckpt.names) - set(extra_ok)
    missing, unexpected = set(mapping) - present, present - set(mapping)
    if missing or unexpected:
        parts = ([f"missing tensors {_names_line(missing)}"] if missing else []) + \
                ([f"unexpected tensors {_names_line(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"checkpoint {where}: {'; '.join(parts)} (for {_describe(config)})")
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = GPT(config)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for name, (ours, turn) in mapping.items():
        apply, source_shape = TURNS[turn]
        need = source_shape(wanted[ours])
        if tuple(ckpt.shape(name)) != need:
            raise CheckpointError(f"checkpoint {where}: tensor {name} has shape {tuple(ckpt.shape(name))} "
                                  f"but {_describe(config)} needs {need}")
        array = ckpt.read(name)
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        state[ours] = torch.nn.Parameter(apply(tensor).to(torch.float32).contiguous())
    for head, embedding in TIED.items():  # the same Parameter object, so the tie survives assign=True
        state[head] = state[embedding]
    model.load_state_dict(state, strict=True, assign=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(t.is_meta for t in model.buffers()), "gpt.GPT has a buffer the checkpoint cannot fill"
    return model.eval()


def _config_from_hparams(folder: Path) -> GPTConfig:
    path = folder / "hparams.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: hparams.json missing (OpenAI's folder has it); download it again")
    h = _read_json(path, ["n_vocab", "n_ctx", "n_embd", "n_layer", "n_head"])
    return GPTConfig(vocab_size=h["n_vocab"], n_positions=h["n_ctx"], n_embd=h["n_embd"], n_layer=h["n_layer"],
                     n_head=h["n_head"])


def _read_json(path: Path, keys) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: not valid JSON ({err})") from None
    if missing := [k for k in keys if k not in d]:
        raise CheckpointError(f"checkpoint {path}: lacks {', '.join(missing)}")
    return d


def _config_for_safetensors(ckpt: SafetensorsCheckpoint) -> GPTConfig:
    """From config.json beside the file when there is one, else from the tensor shapes."""
    path = ckpt.path.parent / "config.json"
    if path.is_file():
        c = _read_json(path, ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"])
        return GPTConfig(vocab_size=c["vocab_size"], n_positions=c["n_positions"], n_embd=c["n_embd"],
                         n_layer=c["n_layer"], n_head=c["n_head"], layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5))
    if "wte.weight" not in ckpt.entries or "wpe.weight" not in ckpt.entries:
        raise CheckpointError(f"checkpoint {ckpt.path}: no wte.weight/wpe.weight and no config.json; not a GPT-2")
    vocab, n_embd = ckpt.shape("wte.weight")
    n_positions = ckpt.shape("wpe.weight")[0]
    n_layer = 1 + max((int(m.group(1)) for n in ckpt.names if (m := re.match(r"h\.(\d+)\.", n))), default=-1)
    heads = [p["n_head"] for p in PRESETS.values() if p["n_embd"] == n_embd]
    if not heads:
        raise CheckpointError(f"checkpoint {ckpt.path}: n_embd={n_embd} is no GPT-2 size, so the number of heads is "
                              "unknown; put a config.json (with n_head) beside it")
    return GPTConfig(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=heads[0])


def load_openai(folder) -> GPT:
    """A folder of OpenAI's original files: hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001."""
    folder = Path(folder)
    config = _config_from_hparams(folder)
    return _fill(TFCheckpoint(folder / "model.ckpt"), "openai", config, str(folder))


def load_safetensors(path) -> GPT:
    """A Hugging Face model.safetensors, hub layout or save_pretrained layout ("transformer." prefix)."""
    ckpt = SafetensorsCheckpoint(path)
    config = _config_for_safetensors(ckpt)
    extra = {n for n in ckpt.names if HF_NOT_WEIGHTS.fullmatch(n)}
    if "lm_head.weight" in ckpt.names:
        extra.add("lm_head.weight")
        if ckpt.shape("lm_head.weight") != ckpt.shape("wte.weight") or not torch.equal(
                ckpt.read("lm_head.weight"), ckpt.read("wte.weight")):
            raise CheckpointError(f"checkpoint {path}: lm_head.weight differs from wte.weight, "
                                  "but GPT-2 ties them (one Parameter); this is not a GPT-2 checkpoint")
    return _fill(ckpt, "hf", config, str(path), extra_ok=extra)


def load_checkpoint(path) -> GPT:
    """A GPT (eval mode) from a checkpoint path: OpenAI folder, .safetensors file, or folder with model.safetensors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    if path.is_dir():
        if (path / "model.ckpt.index").exists() or (path / "hparams.json").exists():
            return load_openai(path)
        if (path / "model.safetensors").exists():
            return load_safetensors(path / "model.safetensors")
        raise CheckpointError(f"checkpoint {path}: the folder holds neither OpenAI's files (hparams.json, "
                              "model.ckpt.index, model.ckpt.data-00000-of-00001) nor a model.safetensors")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.name in ("model.ckpt.index", "hparams.json"):
        return load_openai(path.parent)
    raise CheckpointError(f"checkpoint {path}: not a .safetensors file nor a folder of OpenAI's files")


def load_gpt2(name_or_path, cache_dir=None, source=None) -> GPT:
    """GPT-2 in eval mode from a model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; the download cache,
    downloading when missing) or a checkpoint path (see `load_checkpoint`)."""
    from gpt.download import ensure_downloaded  # here, not at the top: `python -m gpt.download` imports gpt first

    text = str(name_or_path)
    if text in PRESETS:  # a name wins over a folder of that name; write ./gpt2 for the folder
        return load_checkpoint(ensure_downloaded(text, source=source, cache_dir=cache_dir))
    if Path(text).expanduser().exists() or "/" in text or "\\" in text or Path(text).suffix:
        return load_checkpoint(text)
    raise CheckpointError(f"unknown model name {text!r}; valid names: {', '.join(PRESETS)} "
                          "(or a path to a checkpoint folder or .safetensors file)")
