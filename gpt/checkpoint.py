"""GPT-2 weights into `gpt.GPT`: OpenAI's TensorFlow checkpoint (gpt/tf_bundle.py) and Hugging Face
safetensors.

`load_gpt2(name_or_path)` accepts a model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl: taken from
the download cache, downloaded when missing), a folder of OpenAI's files (hparams.json,
model.ckpt.index, model.ckpt.data-00000-of-00001), a .safetensors file, or a folder holding
model.safetensors. Every tensor is mapped by the one table NAME_TABLE below and its shape checked;
anything wrong is one line.
"""

import json
import re
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from gpt.config import PRESETS, GPTConfig
from gpt.model import GPT
from gpt.tf_bundle import CheckpointError, TFCheckpoint, read_tf_checkpoint  # noqa: F401 (re-exported)

# --------------------------------------------------------------------------------------------------
# The one table: our parameter (a key of gpt.GPT's state_dict) <- its tensor in OpenAI's files.
# {i} is the block index. The Hugging Face name (hub layout, openai-community/gpt2*) is ours without
# "transformer."; transformers' save_pretrained writes ours. conv: a projection's weight, held as
# (out, in) by nn.Linear, (in, out) by Hugging Face's Conv1D and (1, in, out) by OpenAI's conv1d.
# fmt: off
NAME_TABLE = [
    # ours                                  OpenAI (TensorFlow)          conv
    ("transformer.wte.weight",               "model/wte",                 False),
    ("transformer.wpe.weight",               "model/wpe",                 False),
    ("transformer.h.{i}.ln_1.weight",        "model/h{i}/ln_1/g",         False),
    ("transformer.h.{i}.ln_1.bias",          "model/h{i}/ln_1/b",         False),
    ("transformer.h.{i}.attn.c_attn.weight", "model/h{i}/attn/c_attn/w",  True),
    ("transformer.h.{i}.attn.c_attn.bias",   "model/h{i}/attn/c_attn/b",  False),
    ("transformer.h.{i}.attn.c_proj.weight", "model/h{i}/attn/c_proj/w",  True),
    ("transformer.h.{i}.attn.c_proj.bias",   "model/h{i}/attn/c_proj/b",  False),
    ("transformer.h.{i}.ln_2.weight",        "model/h{i}/ln_2/g",         False),
    ("transformer.h.{i}.ln_2.bias",          "model/h{i}/ln_2/b",         False),
    ("transformer.h.{i}.mlp.c_fc.weight",    "model/h{i}/mlp/c_fc/w",     True),
    ("transformer.h.{i}.mlp.c_fc.bias",      "model/h{i}/mlp/c_fc/b",     False),
    ("transformer.h.{i}.mlp.c_proj.weight",  "model/h{i}/mlp/c_proj/w",   True),
    ("transformer.h.{i}.mlp.c_proj.bias",    "model/h{i}/mlp/c_proj/b",   False),
    ("transformer.ln_f.weight",              "model/ln_f/g",              False),
    ("transformer.ln_f.bias",                "model/ln_f/b",              False),
]
# fmt: on
# the output head is the token embedding, one Parameter
TIED = {"lm_head.weight": "transformer.wte.weight"}
# Hugging Face tensors that are not weights: the causal-mask buffers older transformers saved (the
# hub's gpt2 model.safetensors holds them). A save_pretrained file may also hold lm_head.weight: it
# must equal wte.
HF_NOT_WEIGHTS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# how each "turn" maps an array, and the checkpoint shape it expects given our (out, in)-style shape
TURNS = {
    "same": (lambda a: a, lambda shape: shape),
    ".T": (lambda a: a.T, lambda shape: shape[::-1]),
    "[0].T": (lambda a: a[0].T, lambda shape: (1, *shape[::-1])),
}


def name_map(fmt: str, n_layer: int) -> dict:
    """{checkpoint name: (our name, turn)} for format "openai" or "hf" (hub layout) and n_layer
    blocks: OpenAI's conv weights turn by "[0].T", Hugging Face's by ".T", every other tensor is the
    same."""
    out = {}
    for ours, openai, conv in NAME_TABLE:
        name = openai if fmt == "openai" else ours.removeprefix("transformer.")
        turn = ("[0].T" if fmt == "openai" else ".T") if conv else "same"
        for i in range(n_layer) if "{i}" in ours else [None]:
            out[name.format(i=i)] = (ours.format(i=i), turn)
    return out


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
            raise CheckpointError(
                f"checkpoint {self.path}: not a readable safetensors file ({reason}); "
                "download it again"
            ) from None
        self.prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        self.entries = {k[len(self.prefix) :] if k.startswith(self.prefix) else k: k for k in keys}

    @property
    def names(self):
        return list(self.entries)

    def shape(self, name):
        return tuple(self._file.get_slice(self.entries[name]).get_shape())

    def read(self, name):
        try:
            return self._file.get_tensor(self.entries[name])
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {self.path}: cannot read tensor {self.entries[name]} ({err}); "
                "the file is truncated or corrupt; download it again"
            ) from None


# --------------------------------------------------------------------------------------------------
def _describe(config: GPTConfig) -> str:
    for name in PRESETS:
        if config == GPTConfig.from_name(name):
            return name
    return (
        f"GPTConfig(vocab_size={config.vocab_size}, n_positions={config.n_positions}, "
        f"n_embd={config.n_embd}, n_layer={config.n_layer}, n_head={config.n_head})"
    )


def _names_line(names, limit=6):
    names = sorted(
        names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]
    )
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _fill(ckpt, fmt: str, config: GPTConfig, where: str, extra_ok=()) -> GPT:
    """Build a GPT for `config` and fill every parameter from `ckpt` through NAME_TABLE, checking
    names and shapes. Names in `extra_ok` may be present and are not loaded."""
    mapping = name_map(fmt, config.n_layer)
    present = set(ckpt.names) - set(extra_ok)
    missing, unexpected = set(mapping) - present, present - set(mapping)
    if missing or unexpected:
        parts = ([f"missing tensors {_names_line(missing)}"] if missing else []) + (
            [f"unexpected tensors {_names_line(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(f"checkpoint {where}: {'; '.join(parts)} (for {_describe(config)})")
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = GPT(config)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for name, (ours, turn) in mapping.items():
        apply, source_shape = TURNS[turn]
        need = source_shape(wanted[ours])
        if tuple(ckpt.shape(name)) != need:
            raise CheckpointError(
                f"checkpoint {where}: tensor {name} has shape {tuple(ckpt.shape(name))} "
                f"but {_describe(config)} needs {need}"
            )
        array = ckpt.read(name)
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        state[ours] = torch.nn.Parameter(apply(tensor).to(torch.float32).contiguous())
    for (
        head,
        embedding,
    ) in TIED.items():  # the same Parameter object, so the tie survives assign=True
        state[head] = state[embedding]
    model.load_state_dict(state, strict=True, assign=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(t.is_meta for t in model.buffers()), (
        "gpt.GPT has a buffer the checkpoint cannot fill"
    )
    return model.eval()


def _config_from_hparams(folder: Path) -> GPTConfig:
    path = folder / "hparams.json"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {folder}: hparams.json missing (OpenAI's folder has it); download it again"
        )
    return _config_from_json(path, OPENAI_HPARAMS)


# GPTConfig's field <- its key in OpenAI's hparams.json (Hugging Face's config.json uses our names)
OPENAI_HPARAMS = {
    "vocab_size": "n_vocab",
    "n_positions": "n_ctx",
    "n_embd": "n_embd",
    "n_layer": "n_layer",
    "n_head": "n_head",
}


def _config_from_json(path: Path, keys: dict) -> GPTConfig:
    """GPTConfig from a JSON file holding each field under keys[field] (and layer_norm_epsilon, when
    it is there)."""
    d = _read_json(path, list(keys.values()))
    eps = d.get("layer_norm_epsilon", 1e-5)
    return GPTConfig(**{field: d[key] for field, key in keys.items()}, layer_norm_epsilon=eps)


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
        return _config_from_json(path, {field: field for field in OPENAI_HPARAMS})
    if "wte.weight" not in ckpt.entries or "wpe.weight" not in ckpt.entries:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: no wte.weight/wpe.weight and no config.json; not a GPT-2"
        )
    vocab, n_embd = ckpt.shape("wte.weight")
    n_positions = ckpt.shape("wpe.weight")[0]
    n_layer = 1 + max(
        (int(m.group(1)) for n in ckpt.names if (m := re.match(r"h\.(\d+)\.", n))), default=-1
    )
    heads = [p["n_head"] for p in PRESETS.values() if p["n_embd"] == n_embd]
    if not heads:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: n_embd={n_embd} is no GPT-2 size, so the number of heads is "
            "unknown; put a config.json (with n_head) beside it"
        )
    return GPTConfig(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=heads[0]
    )


def load_openai(folder) -> GPT:
    """A folder of OpenAI's original files: hparams.json, model.ckpt.index,
    model.ckpt.data-00000-of-00001."""
    folder = Path(folder)
    config = _config_from_hparams(folder)
    return _fill(TFCheckpoint(folder / "model.ckpt"), "openai", config, str(folder))


def load_safetensors(path) -> GPT:
    """A Hugging Face model.safetensors, hub layout or save_pretrained layout ("transformer."
    prefix).
    """
    ckpt = SafetensorsCheckpoint(path)
    config = _config_for_safetensors(ckpt)
    extra = {n for n in ckpt.names if HF_NOT_WEIGHTS.fullmatch(n)}
    if "lm_head.weight" in ckpt.names:
        extra.add("lm_head.weight")
        if ckpt.shape("lm_head.weight") != ckpt.shape("wte.weight") or not torch.equal(
            ckpt.read("lm_head.weight"), ckpt.read("wte.weight")
        ):
            raise CheckpointError(
                f"checkpoint {path}: lm_head.weight differs from wte.weight, "
                "but GPT-2 ties them (one Parameter); this is not a GPT-2 checkpoint"
            )
    return _fill(ckpt, "hf", config, str(path), extra_ok=extra)


def load_checkpoint(path) -> GPT:
    """A GPT (eval mode) from a checkpoint path: OpenAI folder, .safetensors file, or folder with
    model.safetensors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    if path.is_dir():
        if (path / "model.ckpt.index").exists() or (path / "hparams.json").exists():
            return load_openai(path)
        if (path / "model.safetensors").exists():
            return load_safetensors(path / "model.safetensors")
        raise CheckpointError(
            f"checkpoint {path}: the folder holds neither OpenAI's files (hparams.json, "
            "model.ckpt.index, model.ckpt.data-00000-of-00001) nor a model.safetensors"
        )
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.name in ("model.ckpt.index", "hparams.json"):
        return load_openai(path.parent)
    raise CheckpointError(
        f"checkpoint {path}: not a .safetensors file nor a folder of OpenAI's files"
    )


def load_gpt2(name_or_path, cache_dir=None, source=None) -> GPT:
    """GPT-2 in eval mode from a model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; the download
    cache, downloading when missing) or a checkpoint path (see `load_checkpoint`)."""
    # imported here, not at the top: gpt/__init__.py must leave gpt.download unloaded for `python -m
    # gpt.download`
    from gpt.download import SOURCES, ensure_downloaded

    if not isinstance(name_or_path, (str, PathLike)) or not str(name_or_path):
        raise ValueError(
            f"load_gpt2 takes a model name ({', '.join(PRESETS)}) or a checkpoint path, got "
            f"{name_or_path!r}"
        )
    if source not in (None, *SOURCES):
        raise ValueError(
            f"unknown source {source!r}; valid sources: {', '.join(SOURCES)} (None: whichever is "
            f"cached)"
        )
    text = str(name_or_path)
    if text in PRESETS:  # a name wins over a folder of that name; write ./gpt2 for the folder
        return load_checkpoint(ensure_downloaded(text, source=source, cache_dir=cache_dir))
    if Path(text).expanduser().exists() or "/" in text or "\\" in text or Path(text).suffix:
        return load_checkpoint(text)
    raise CheckpointError(
        f"unknown model name {text!r}; valid names: {', '.join(PRESETS)} "
        "(or a path to a checkpoint folder or .safetensors file)"
    )
