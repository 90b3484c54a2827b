"""gpt/checkpoint.py, gpt/tf_bundle.py: OpenAI's TensorFlow checkpoint read with numpy; safetensors
in both layouts.

The reference for the weights is what real TensorFlow read (tests/fixtures/tf_gpt2_tiny/tf_read.npz,
written by tests/fixtures/make_tf_checkpoint.py) and what transformers saves; the reference for the
logits is transformers.GPT2LMHeadModel holding the same weights, float32, max |Δ| ≤ 1e-4.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gpt import GPTConfig
from gpt.checkpoint import CheckpointError, load_gpt2
from gpt.tf_bundle import crc32c, read_tf_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tf_gpt2_tiny"
TOL = 1e-4  # max |Δ| of float32 logits against transformers
TINY = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def max_logit_gap(model, hf_model, vocab, seed=0):
    """max |Δ| between our logits and transformers' on a seeded (2, 12) batch of token ids."""
    ids = torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (model(ids) - hf_model(ids).logits).abs().max().item()


def hf_from_openai_arrays(arrays, hparams):
    """transformers' GPT-2 holding OpenAI-named arrays, renamed here by their own rule, not
    gpt.checkpoint's table: model/h3/attn/c_attn/w -> h.3.attn.c_attn.weight, g/w -> weight, b ->
    bias, (1, in, out) -> (in, out)."""
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=hparams["n_vocab"],
            n_positions=hparams["n_ctx"],
            n_embd=hparams["n_embd"],
            n_layer=hparams["n_layer"],
            n_head=hparams["n_head"],
        )
    ).eval()
    state = {}
    for name, a in arrays.items():
        key = re.sub(r"^model/h(\d+)/", r"h.\1/", name).removeprefix("model/").replace("/", ".")
        key = re.sub(r"\.(g|w)$", ".weight", re.sub(r"\.b$", ".bias", key))
        key = key if key.endswith(".weight") or key.endswith(".bias") else key + ".weight"
        state["transformer." + key] = torch.from_numpy(a[0] if a.ndim == 3 else a.copy())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def hub_layout(hf_model, with_mask_buffers=False):
    """The keys of openai-community/gpt2's model.safetensors: no "transformer.", no lm_head."""
    state = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in hf_model.state_dict().items()
        if k != "lm_head.weight"
    }
    if with_mask_buffers:  # the hub's gpt2 file also holds each block's causal-mask buffer
        n = hf_model.config.n_positions
        state.update(
            {
                f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, n, n))
                for i in range(hf_model.config.n_layer)
            }
        )
    return state


def write_hub_file(folder, state, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        config.to_json_file(str(folder / "config.json"))
    return folder / "model.safetensors"


def one_line_error(fn, *args):
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# crc32c
def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C by its definition, one bit at a time (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_its_check_value_and_the_bitwise_definition():
    assert crc32c(b"123456789") == 0xE3069283  # the published check value of CRC-32C
    rng = np.random.default_rng(0)
    for n in [
        0,
        1,
        3,
        4,
        5,
        255,
        1024,
        4099,
        70_001,
    ]:  # short, unaligned, and long enough for lanes
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_bitwise(data), n


# ----------------------------------------------------------------------------------------------
# TensorFlow
def test_numpy_reader_is_byte_identical_to_tensorflow():
    ours = read_tf_checkpoint(FIXTURE / "model.ckpt")
    with np.load(FIXTURE / "tf_read.npz") as tf_read:
        assert sorted(ours) == sorted(tf_read.files)
        for name in tf_read.files:
            theirs = tf_read[name]
            assert (ours[name].dtype, ours[name].shape) == (theirs.dtype, theirs.shape), name
            assert ours[name].tobytes() == theirs.tobytes(), name
    assert ours["model/h0/attn/c_attn/w"].shape == (
        1,
        32,
        96,
    )  # OpenAI's conv1d layout, (1, in, out)


def test_tensorflow_checkpoint_logits_equal_transformers():
    model = load_gpt2(FIXTURE)
    hparams = json.loads((FIXTURE / "hparams.json").read_text())
    with np.load(FIXTURE / "tf_read.npz") as tf_read:
        hf = hf_from_openai_arrays({n: tf_read[n] for n in tf_read.files}, hparams)
    assert not model.training
    gap = max_logit_gap(model, hf, hparams["n_vocab"])
    print(f"OpenAI TF checkpoint (real TensorFlow), tiny: max |Δ| logits = {gap:.2e}")
    assert gap <= TOL


@pytest.fixture
def tf_copy(tmp_path):
    folder = tmp_path / "tf"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_tensorflow_truncated_data_file_is_one_line(tf_copy):
    data = tf_copy / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:50_000])
    assert "truncated" in one_line_error(load_gpt2, tf_copy)


def test_tensorflow_truncated_index_is_one_line(tf_copy):
    index = tf_copy / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-10])
    assert "truncated" in one_line_error(load_gpt2, tf_copy)


def test_tensorflow_flipped_byte_fails_crc32c(tf_copy):
    data = tf_copy / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[1234] ^= 0x10
    data.write_bytes(bytes(raw))
    assert "crc32c" in one_line_error(load_gpt2, tf_copy)


def test_tensorflow_missing_data_file_is_one_line(tf_copy):
    (tf_copy / "model.ckpt.data-00000-of-00001").unlink()
    assert "model.ckpt.data-00000-of-00001: file missing" in one_line_error(load_gpt2, tf_copy)


def test_tensorflow_wrong_shape_names_tensor_and_both_shapes(tf_copy):
    hparams = json.loads((tf_copy / "hparams.json").read_text())
    (tf_copy / "hparams.json").write_text(json.dumps({**hparams, "n_ctx": 16}))
    message = one_line_error(load_gpt2, tf_copy)
    assert "tensor model/wpe has shape (32, 32) but " in message and "n_positions=16" in message
    assert message.endswith("needs (16, 32)")


# ----------------------------------------------------------------------------------------------
# safetensors
@pytest.fixture(scope="module")
def tiny_hf():
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(**TINY)).eval()


def test_save_pretrained_folder_logits_equal_transformers(tiny_hf, tmp_path):
    tiny_hf.save_pretrained(tmp_path)
    gap = max_logit_gap(load_gpt2(tmp_path), tiny_hf, TINY["vocab_size"])
    print(f"save_pretrained folder, tiny: max |Δ| logits = {gap:.2e}")
    assert gap <= TOL


def test_hub_layout_file_logits_equal_transformers(tiny_hf, tmp_path):
    path = write_hub_file(
        tmp_path / "hub", hub_layout(tiny_hf, with_mask_buffers=True), tiny_hf.config
    )
    gap = max_logit_gap(load_gpt2(path), tiny_hf, TINY["vocab_size"])
    print(f"hub-layout model.safetensors, tiny: max |Δ| logits = {gap:.2e}")
    assert gap <= TOL


def test_tied_lm_head_in_the_file_is_accepted_and_an_untied_one_refused(tiny_hf, tmp_path):
    state = {
        k: v.clone().contiguous() for k, v in tiny_hf.state_dict().items()
    }  # has lm_head.weight == wte
    write_hub_file(tmp_path / "tied", state, tiny_hf.config)
    assert max_logit_gap(load_gpt2(tmp_path / "tied"), tiny_hf, TINY["vocab_size"]) <= TOL
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    write_hub_file(tmp_path / "untied", state, tiny_hf.config)
    assert "lm_head.weight differs from wte.weight" in one_line_error(
        load_gpt2, tmp_path / "untied"
    )


def test_safetensors_wrong_shape_names_tensor_and_both_shapes(tiny_hf, tmp_path):
    state = hub_layout(tiny_hf)
    state["h.1.mlp.c_fc.weight"] = torch.zeros(32, 64)
    message = one_line_error(load_gpt2, write_hub_file(tmp_path, state, tiny_hf.config))
    assert "tensor h.1.mlp.c_fc.weight has shape (32, 64) but " in message and message.endswith(
        "needs (32, 128)"
    )


def test_safetensors_missing_and_unexpected_tensors_named(tiny_hf, tmp_path):
    state = hub_layout(tiny_hf)
    del state["h.1.ln_2.bias"]
    state["h.1.attn.rotary.weight"] = torch.zeros(3)
    message = one_line_error(load_gpt2, write_hub_file(tmp_path, state, tiny_hf.config))
    assert (
        "missing tensors h.1.ln_2.bias" in message
        and "unexpected tensors h.1.attn.rotary.weight" in message
    )


def test_truncated_safetensors_is_one_line(tiny_hf, tmp_path):
    path = write_hub_file(tmp_path, hub_layout(tiny_hf), tiny_hf.config)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "download it again" in one_line_error(load_gpt2, path)


def test_missing_file_and_unknown_name_are_one_line(tmp_path):
    assert "no such file or folder" in one_line_error(load_gpt2, tmp_path / "absent.safetensors")
    assert "holds neither OpenAI's files" in one_line_error(load_gpt2, tmp_path)
    message = one_line_error(load_gpt2, "gpt3")
    assert message.startswith(
        "unknown model name 'gpt3'; valid names: gpt2, gpt2-medium, gpt2-large, gpt2-xl"
    )


# ----------------------------------------------------------------------------------------------
# full gpt2 shape
@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """transformers' GPT-2 at the 124M shape (random weights), written once in both layouts, and its
    logits."""
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    folder = tmp_path_factory.mktemp("gpt2_full")
    hf.save_pretrained(folder / "save_pretrained")
    hub = write_hub_file(
        folder / "hub", hub_layout(hf, with_mask_buffers=True)
    )  # no config.json: shapes say gpt2
    ids = torch.randint(50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(ids).logits
    return {"save_pretrained": folder / "save_pretrained", "hub": hub}, ids, logits


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_full_gpt2_shape_logits_equal_transformers(gpt2_files, layout):
    paths, ids, hf_logits = gpt2_files
    model = load_gpt2(paths[layout])
    assert model.config == GPTConfig.from_name("gpt2")
    assert (
        sum(p.numel() for p in model.parameters()) == 124_439_808
    )  # as transformers counts, head tied
    with torch.no_grad():
        gap = (model(ids) - hf_logits).abs().max().item()
    print(f"{layout} safetensors, full gpt2 shape: max |Δ| logits = {gap:.2e}")
    assert gap <= TOL
