"""OpenAI's TensorFlow checkpoint (a "tensor bundle") read with numpy alone: SSTable, protobuf
records, CRC-32C.

`model.ckpt.index` is an SSTable (LevelDB's table format) whose keys are tensor names and whose
values are BundleEntryProto messages saying where each tensor's bytes lie in
`model.ckpt.data-00000-of-00001`, with each tensor's masked CRC-32C. All three layers are parsed
here by hand; `TFCheckpoint` is the interface that gpt/checkpoint.py maps onto the model.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line saying what and where."""


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


_IDENTITY = np.stack(
    [np.arange(256, dtype=np.uint32) << np.uint32(8 * k) for k in range(4)]
)  # (4, 256)
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
        padded = np.zeros(
            rows * lanes, np.uint32
        )  # leading zero words leave a zero register at zero
        padded[padded.size - words.size :] = words
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
    padded[padded.size - b.size :] = b
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
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos : pos + size]), pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by tensor bundles")
        fields.setdefault(number, []).append(value)
    return fields


# TensorFlow DataType enum -> numpy (the numeric types; OpenAI's checkpoints are all DT_FLOAT = 1)
TF_DTYPES = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}


def _bundle_entry(value: bytes) -> dict:
    """BundleEntryProto: dtype=1, shape=2 (TensorShapeProto: dim=2 {size=1}), shard_id=3, offset=4,
    size=5,
    crc32c=6 (fixed32, masked), slices=7."""
    f = _proto_fields(value)
    dims = [_proto_fields(d).get(1, [0])[0] for d in _proto_fields(f.get(2, [b""])[0]).get(2, [])]
    return dict(
        dtype=f.get(1, [0])[0],
        shape=tuple(dims),
        shard_id=f.get(3, [0])[0],
        offset=f.get(4, [0])[0],
        size=f.get(5, [0])[0],
        crc32c=f.get(6, [None])[0],
        sliced=7 in f,
    )


# --------------------------------------------------------------------------------------------------
# SSTable (LevelDB table): data blocks of sorted (key, value) entries, an index block pointing at
# them,
# and a 48-byte footer. Each block ends in a 5-byte trailer: compression type, masked crc32c.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48


def _block(raw: bytes, handle: bytes, where: str) -> bytes:
    """The contents of the block a BlockHandle (varint offset, varint size) points at, trailer
    checked.
    """
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + 5 > len(raw):
        raise CheckpointError(f"{where} ends inside a block (truncated); download it again")
    contents, kind = raw[offset : offset + size], raw[offset + size]
    stored = int.from_bytes(raw[offset + size + 1 : offset + size + 5], "little")
    if masked_crc32c(raw[offset : offset + size + 1]) != stored:
        raise CheckpointError(
            f"{where}: block at byte {offset} fails its crc32c (corrupt); download it again"
        )
    if kind != 0:
        raise CheckpointError(
            f"{where}: block at byte {offset} is compressed (type {kind}); only uncompressed "
            f"tables are read"
        )
    return contents


def _block_entries(block: bytes):
    """Yield (key, value): each entry is varint shared, varint non_shared, varint value_length, key
    suffix, value; its key is the previous key's first `shared` bytes + the suffix. The block ends
    in restart offsets (uint32 each, then their count): entries there store their whole key (shared
    == 0)."""
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (n_restarts + 1)
    restarts = {
        int.from_bytes(block[end + 4 * k : end + 4 * k + 4], "little") for k in range(n_restarts)
    }
    key, pos = b"", 0
    while pos < end:
        start = pos
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if start in restarts and shared:
            raise ValueError(f"restart point at byte {start} shares {shared} key bytes")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


class TFCheckpoint:
    """OpenAI's TensorFlow checkpoint (a tensor bundle) read with numpy: `names`, `shape(name)`,
    `read(name)`."""

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        index = Path(f"{self.prefix}.index")
        where = f"checkpoint {index}"
        if not index.is_file():
            raise CheckpointError(f"{where}: file missing; download it again or check the folder")
        raw = index.read_bytes()
        if len(raw) < _FOOTER or int.from_bytes(raw[-8:], "little") != _TABLE_MAGIC:
            raise CheckpointError(
                f"{where}: not a TensorFlow table (no magic number at its end; truncated?); "
                f"download it again"
            )
        footer = raw[-_FOOTER:]
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle (offset, size)
        index_block = _block(raw, footer[pos:], where)
        entries = {}
        for _, data_handle in _block_entries(
            index_block
        ):  # index block: last key of a data block -> its handle
            for key, value in _block_entries(_block(raw, data_handle, where)):
                entries[key.decode()] = value
        header = _proto_fields(
            entries.pop("", b"")
        )  # BundleHeaderProto: num_shards=1, endianness=2 (0 = little)
        self.num_shards = header.get(1, [1])[0]
        if header.get(2, [0])[0] != 0:
            raise CheckpointError(f"{where}: big-endian tensor bundle; only little-endian is read")
        self.entries = {name: _bundle_entry(v) for name, v in entries.items()}
        for name, e in self.entries.items():
            if e["sliced"] or e["dtype"] not in TF_DTYPES:
                raise CheckpointError(
                    f"{where}: tensor {name} is partitioned or of TF dtype {e['dtype']}; not "
                    f"supported"
                )
            if e["size"] != np.dtype(TF_DTYPES[e["dtype"]]).itemsize * int(np.prod(e["shape"])):
                raise CheckpointError(
                    f"{where}: tensor {name} claims {e['size']} bytes for shape {e['shape']}"
                )

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
            raise CheckpointError(
                f"checkpoint {path}: file missing; download it again or check the folder"
            )
        buf = bytearray(e["size"])  # writable, so torch can take the array without a copy
        with open(path, "rb") as f:
            f.seek(e["offset"])
            got = f.readinto(buf)
        if got != e["size"]:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} needs bytes "
                f"{e['offset']}..{e['offset'] + e['size']} "
                f"but the file has {path.stat().st_size} (truncated); download it again"
            )
        if verify_crc and e["crc32c"] is not None and masked_crc32c(buf) != e["crc32c"]:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} fails its crc32c (corrupt); download it again"
            )
        return np.frombuffer(buf, TF_DTYPES[e["dtype"]]).reshape(e["shape"])


def read_tf_checkpoint(prefix, verify_crc=True) -> dict:
    """Every tensor of a TensorFlow checkpoint `prefix` (e.g. folder/model.ckpt) as {name:
    np.ndarray}.
    """
    ckpt = TFCheckpoint(prefix)
    return {name: ckpt.read(name, verify_crc) for name in ckpt.names}
