"""Chapter 11, LoRA and the reference: after LoRA SFT, DPO's reference must be base + SFT adapter.

A tiny random GPT-2 stands for the base, a random non-zero adapter for the SFT adapter, and a few
random token pairs for the data: the right reference makes the first step of eq. (38) read float32's
ln 2 with every margin exactly 0; the adapter switched off gives the base, whose margins are the SFT
adapter's own log-ratios, computed here by hand on full logits.
"""

import copy
import math

import pytest
import torch

from chapters.ch4_dpo.loss import response_logprobs
from chapters.ch8_instruction_dpo.data import Pair
from chapters.ch8_instruction_dpo.dpo_step import ReferenceCache, first_epoch_batches
from chapters.ch11_dpo_pitfalls.lora_reference import (
    LN2_FLOAT32,
    adapter_policy,
    as_reference,
    first_step,
    merged_model,
    peak_memory,
    train_preference,
)
from chapters.common.rows import pair_rows
from gpt import GPT, GPTConfig
from gpt.lora import ADAPTER_NAMES, add_lora, lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")
PAD, BETA, RANK, ALPHA = 0, 0.5, 4, 8


def random_pairs(n, seed):
    """Prompts of 2–4 random tokens, responses of 1–5: rows need padding, pairs differ in length."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        size = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(1, 64, (size,), generator=g).tolist()

    return [Pair(i, tokens(2, 4), tokens(1, 5), tokens(1, 5)) for i in range(n)]


@pytest.fixture
def base():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny()).eval().requires_grad_(False)


@pytest.fixture
def sft_lora(base):
    """base + a trained-looking SFT adapter: A and B random (a new adapter's B A is exactly 0)."""
    model = add_lora(copy.deepcopy(base), RANK, ALPHA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    return model


def policy_for(setup, sft_lora):
    """DPO's policy for `setup`: a new adapter on the merged SFT, or the SFT adapter trained on."""
    if setup == "merged":
        return adapter_policy(merged_model(sft_lora), RANK, ALPHA)
    policy = copy.deepcopy(sft_lora)
    for name, p in policy.named_parameters():
        p.requires_grad = name.endswith(ADAPTER_NAMES)
    return policy


def first_reading(setup, sft_lora, pairs):
    policy = policy_for(setup, sft_lora)
    with as_reference(policy, setup) as reference:
        cache = ReferenceCache(reference, pairs, PAD, batches=[list(range(len(pairs)))])
    return first_step(policy, pairs, cache, BETA, PAD)


@pytest.mark.parametrize("setup", ["merged", "sft_adapter"])
def test_right_reference_first_dpo_step_is_exactly_ln2_with_zero_margins(setup, sft_lora):
    losses, margins = first_reading(setup, sft_lora, random_pairs(6, 0))
    assert losses.dtype == torch.float32 and LN2_FLOAT32 == 0.6931471824645996
    assert (losses == LN2_FLOAT32).all(), losses
    assert (margins == 0).all(), margins


def test_wrong_reference_is_the_base_and_first_loss_is_not_ln2(base, sft_lora):
    pairs = random_pairs(6, 0)
    losses, margins = first_reading("adapter_off", sft_lora, pairs)
    # by hand: β·((log π_SFT − log π_base)(y_w) − (log π_SFT − log π_base)(y_l)) on full logits,
    # with the base a model that never had an adapter
    ids, att, resp = pair_rows(pairs, PAD)  # (2B, T), chosen rows first
    with torch.no_grad():
        sft, ref = (response_logprobs(m(ids, att), ids, resp).double() for m in (sft_lora, base))
    ratio = sft - ref
    B = len(pairs)
    by_hand = BETA * (ratio[:B] - ratio[B:])
    assert torch.allclose(margins.double(), by_hand, atol=1e-5)
    assert (margins != 0).all()
    assert torch.allclose(losses.double(), -torch.nn.functional.logsigmoid(by_hand), atol=1e-5)
    assert not torch.isclose(losses.mean(), torch.tensor(math.log(2)), atol=1e-3)
    # leaving the block switched the adapter back on: the policy is base + SFT adapter again
    policy = policy_for("adapter_off", sft_lora)
    with as_reference(policy, "adapter_off"):
        pass
    with torch.no_grad():
        assert torch.equal(policy(ids, att), sft_lora(ids, att))


@pytest.mark.parametrize("setup", ["merged", "sft_adapter", "adapter_off"])
def test_only_adapter_parameters_change_during_lora_dpo(setup, sft_lora):
    pairs, batch_size = random_pairs(8, 2), 4
    policy = policy_for(setup, sft_lora)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with as_reference(policy, setup) as reference:
        cache = ReferenceCache(
            reference, pairs, PAD, keep_hidden=False, batches=first_epoch_batches(pairs, 4, 0)
        )
    rows = train_preference(
        policy,
        pairs,
        cache,
        BETA,
        epochs=1,
        lr=1e-2,
        batch_size=4,
        seed=0,
        device="cpu",
        pad_id=PAD,
    )
    assert len(rows) == len(pairs) // batch_size
    if setup != "adapter_off":  # the training step itself reads ln 2 and margin 0 first
        assert rows[0]["loss"] == LN2_FLOAT32 and rows[0]["rewards/margins"] == 0.0
    after = policy.state_dict()
    frozen = [k for k in before if not k.endswith(ADAPTER_NAMES)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(".lora_B"))


def test_merged_sft_model_equals_base_plus_adapter_logits(base, sft_lora):
    sft = merged_model(sft_lora)
    assert type(sft) is GPT and not lora_layers(sft)  # a plain GPT: no adapters left
    ids = torch.randint(0, 64, (3, 20))
    wide = copy.deepcopy(sft_lora).double()
    with torch.no_grad():  # the same sums in another order: float32 rounding, float64's far less
        assert (sft(ids) - sft_lora(ids)).abs().max().item() < 1e-5
        assert (merged_model(wide)(ids) - wide(ids)).abs().max().item() < 1e-12
    # its weights: W + (alpha/rank) B A, by hand; the adapter model itself is left unmerged
    layer = lora_layers(sft_lora)["transformer.h.0.attn.c_attn"]
    w = base.transformer.h[0].attn.c_attn.weight
    by_hand = w + (ALPHA / RANK) * layer.lora_B @ layer.lora_A  # (out, r) @ (r, in)
    assert torch.allclose(sft.transformer.h[0].attn.c_attn.weight, by_hand, atol=1e-6)
    assert not layer.merged and torch.equal(layer.weight, w)


def test_merged_model_refuses_a_model_without_adapters(base):
    with pytest.raises(ValueError, match="no LoRA adapters") as e:
        merged_model(base)
    assert "\n" not in str(e.value)


def test_peak_memory_sees_torch_tensors():
    """tracemalloc would not: torch allocates CPU tensors outside Python's allocator."""
    with peak_memory() as memory:
        x = torch.ones(16 * 2**20)  # 64 MiB
        del x
    assert memory["mib"] > 48
