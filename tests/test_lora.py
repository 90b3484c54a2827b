"""gpt.lora: LoRA adapters (Hu et al. 2021) on the hand-written GPT-2, merged, saved and loaded."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt import GPT, GPTConfig, generate
from gpt.lora import (
    TARGETS,
    add_lora,
    load_lora,
    lora_config,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from gpt.model import Linear

CONFIG = GPTConfig.tiny()  # vocab 64, context 64, n_embd 32, 2 layers, 4 heads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster and repeatably on one thread; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base():
    return GPT(CONFIG).eval()


@pytest.fixture
def ids():
    return torch.randint(0, CONFIG.vocab_size, (2, 12))  # (B, T)


@torch.no_grad()
def perturb(model, std=0.1):
    """Give every adapter a non-zero B A (a freshly added one is exactly zero)."""
    for layer in lora_layers(model).values():
        layer.lora_A.normal_(0, 1)
        layer.lora_B.normal_(0, std)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


def lora_model(base, **kwargs):
    kwargs = dict(rank=4, alpha=8, targets=TARGETS) | kwargs
    return add_lora(copy.deepcopy(base), **kwargs)


@torch.no_grad()
def test_zero_init_adapter_leaves_logits_exactly_unchanged(base, ids):
    model = lora_model(base)
    layers = lora_layers(model).values()
    assert all(not layer.lora_B.any() and layer.lora_A.any() for layer in layers)
    assert torch.equal(model(ids), base(ids))


@torch.no_grad()
def test_merged_model_equals_adapter_model_and_unmerge_restores_the_weights(base, ids):
    model = perturb(lora_model(base))
    adapter_logits = model(ids)
    assert max_diff(adapter_logits, base(ids)) > 1e-2  # the adapter does change the model
    merge_lora(model)
    assert max_diff(model(ids), adapter_logits) <= 1e-6
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    assert not torch.equal(
        weights["transformer.h.0.mlp.c_fc.weight"],
        base.state_dict()["transformer.h.0.mlp.c_fc.weight"],
    )
    deltas = {f"{name}.weight": layer.delta_weight() for name, layer in lora_layers(model).items()}
    unmerge_lora(model)
    eps = torch.finfo(torch.float32).eps
    for name, w in base.state_dict().items():  # (W + ΔW) - ΔW: off by at most eps (|W| + |ΔW|)
        bound = eps * (w.abs() + deltas[name].abs()) if name in deltas else 0
        assert ((model.state_dict()[name] - w).abs() <= bound).all(), name
    assert max_diff(model(ids), adapter_logits) <= 1e-6


def test_only_adapter_parameters_receive_gradients(base, ids):
    model = perturb(lora_model(base)).train()
    model(ids).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("targets", [TARGETS, ("attn.c_attn", "attn.c_proj"), ("c_proj",)])
def test_trainable_parameters_are_rank_times_in_plus_out_summed_over_wrapped_layers(base, targets):
    C, r = CONFIG.n_embd, 4
    in_out = {
        "attn.c_attn": (C, 3 * C),
        "attn.c_proj": (C, C),
        "mlp.c_fc": (C, 4 * C),
        "mlp.c_proj": (4 * C, C),
    }
    wrapped = ["attn.c_proj", "mlp.c_proj"] if targets == ("c_proj",) else targets
    closed_form = CONFIG.n_layer * sum(r * sum(in_out[t]) for t in wrapped)
    model = lora_model(base, rank=r, targets=targets)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == closed_form
    assert len(lora_layers(model)) == CONFIG.n_layer * len(wrapped)


@torch.no_grad()
def test_adapter_round_trip_through_safetensors_gives_identical_logits(base, ids, tmp_path):
    targets = ("c_attn", "mlp.c_fc")
    model = perturb(lora_model(base, rank=3, alpha=5.0, targets=targets, dropout=0.1))
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == set(lora_state_dict(model))
    assert all(k.endswith(("lora_A", "lora_B")) for k in keys)
    assert (meta["rank"], float(meta["alpha"]), float(meta["dropout"])) == ("3", 5.0, 0.1)
    assert json.loads(meta["targets"]) == ["attn.c_attn", "mlp.c_fc"]
    fresh = GPT(CONFIG).eval()
    fresh.load_state_dict(base.state_dict())  # the same base weights, no adapters
    load_lora(fresh, path)
    assert lora_config(fresh) == lora_config(model)
    assert torch.equal(fresh(ids), model(ids))
    again = lora_model(base, rank=3, alpha=5.0, targets=targets)
    load_lora(again, path)  # into adapters that are already there
    assert torch.equal(again(ids), model(ids))


def test_dropout_changes_outputs_in_train_mode_only(base, ids):
    model = perturb(lora_model(base, dropout=0.5), std=1.0)
    assert not any(m.training for m in model.modules())  # adapters take the model's mode
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids), model(ids))
        model.eval()
        assert torch.equal(model(ids), model(ids))
        merged = merge_lora(copy.deepcopy(model))(ids)
        assert max_diff(model(ids), merged) <= 1e-5


@torch.no_grad()
def test_lora_disabled_runs_the_base_model_and_switches_back(base, ids):
    model = perturb(lora_model(base))
    with lora_disabled(model):
        assert torch.equal(model(ids), base(ids))
    assert not torch.equal(model(ids), base(ids))


@torch.no_grad()
def test_state_dict_keeps_the_checkpoint_names_so_a_merged_model_loads_into_plain_gpt(base, ids):
    model = merge_lora(perturb(lora_model(base)))
    plain = GPT(CONFIG).eval()
    adapters = lora_state_dict(model)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapters})
    assert torch.equal(plain(ids), model(ids))


@torch.no_grad()
def test_greedy_generation_with_kv_cache_equals_the_merged_model(base):
    model = perturb(lora_model(base), std=0.5)
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 5))
    tokens = generate(model, prompt, 20, temperature=0)
    assert torch.equal(tokens, generate(model, prompt, 20, temperature=0, use_cache=False))
    merged = merge_lora(copy.deepcopy(model))
    assert torch.equal(tokens, generate(merged, prompt, 20, temperature=0))
    with lora_disabled(model):
        assert not torch.equal(tokens, generate(model, prompt, 20, temperature=0))


@pytest.mark.skipif(not Linear.ONEDNN, reason="this torch build has no oneDNN inner product")
def test_frozen_base_product_keeps_onednn_path_and_merged_weights_reach_it(base, ids, monkeypatch):
    """With W frozen, gpt.model.Linear's no-gradient path (oneDNN) serves the base product, with or
    without a gradient for the adapters, and sees the weights merge_lora changed in place."""
    monkeypatch.setattr(Linear, "ONEDNN_MIN_WEIGHT", 0)  # tiny layers take the oneDNN path too
    onednn, calls = torch.ops.mkldnn._linear_pointwise, []

    def counted(*args):
        calls.append(args[1].shape)  # the weight, (out, in)
        return onednn(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    model = perturb(lora_model(base))
    per_pass = 4 * CONFIG.n_layer + 1  # every block's four products and the output head
    with torch.no_grad():
        logits = model(ids)
        assert len(calls) == per_pass
        merged = merge_lora(copy.deepcopy(model))(ids)
        assert len(calls) == 2 * per_pass
    assert max_diff(merged, logits) <= 1e-6
    calls.clear()
    model(ids).sum().backward()  # block 0's c_attn: its input (embeddings, ln_1) needs no gradient
    assert len(calls) == 1 and calls[0] == (3 * CONFIG.n_embd, CONFIG.n_embd)
    assert lora_layers(model)["transformer.h.0.attn.c_attn"].lora_A.grad is not None


BAD = [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=-2), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(alpha=0), "alpha must be a finite number > 0"),
    (dict(alpha=-1.0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
    (dict(targets=("q_proj",)), "unknown LoRA target 'q_proj'; choose from attn.c_attn"),
    (dict(targets=("lm_head",)), "unknown LoRA target 'lm_head'"),
    (dict(targets=()), "targets must be a non-empty list"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_hyperparameters_raise_one_line_value_errors(base, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        lora_model(base, **kwargs)
    assert "\n" not in str(info.value)
    assert not lora_layers(base)


def test_misuse_raises_one_line_value_errors(base, tmp_path):
    model = lora_model(base, rank=2)
    r2 = tmp_path / "r2.safetensors"
    save_lora(model, r2)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    big = GPT(GPTConfig.tiny(n_layer=3))
    wide = GPT(GPTConfig.tiny(n_embd=48))
    cases = [
        (lambda: add_lora(model, 2, 4), "already has LoRA adapters"),
        (lambda: merge_lora(GPT(CONFIG)), "has no LoRA adapters; call add_lora"),
        (lambda: save_lora(GPT(CONFIG), tmp_path / "none.safetensors"), "has no LoRA adapters"),
        (
            lambda: load_lora(lora_model(base, rank=3), r2),
            "holds adapters with rank=2 but the model's have rank=3",
        ),
        (
            lambda: load_lora(lora_model(base, rank=2, targets=("c_fc",)), r2),
            "holds adapters with targets=",
        ),
        (lambda: load_lora(big, r2), "lacks transformer.h.2.attn.c_attn"),
        (lambda: load_lora(wide, r2), r"has shape \(2, 32\) but the model"),
        (lambda: load_lora(GPT(CONFIG), tmp_path / "plain.safetensors"), "not a LoRA adapter file"),
        (lambda: load_lora(GPT(CONFIG), tmp_path / "junk.safetensors"), "not a safetensors file"),
        (
            lambda: load_lora(merge_lora(lora_model(base, rank=2)), r2),
            "merged into its weights; unmerge_lora",
        ),
        (lambda: lora_disabled(merge_lora(lora_model(base))).__enter__(), "unmerge_lora"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value), message
    assert not lora_layers(big) and not lora_layers(wide)  # a refused load leaves the model alone
    assert not (tmp_path / "none.safetensors").exists()
