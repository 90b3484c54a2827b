"""The hand-written GPT-2: sizes, padding, the KV cache (the match with transformers is in
test_checkpoint.py)."""

import pytest
import torch

from gpt import GPT, GPTConfig, KVCache
from gpt.model import Linear


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny()).eval()


@pytest.mark.parametrize("name, expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)])
def test_parameter_count_matches_transformers(name, expected):
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(GPTConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_output_head_is_the_token_embedding():
    model = GPT(GPTConfig.tiny())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError,
        match="unknown model name 'gpt3'; valid names: gpt2, gpt2-medium, gpt2-large, gpt2-xl",
    ):
        GPTConfig.from_name("gpt3")


def test_prompt_longer_than_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match="longer than the context of 64"):
        tiny(torch.zeros(1, 65, dtype=torch.long))


def test_dropout_is_off_by_default_so_train_mode_is_deterministic(tiny):
    x = torch.randint(0, 64, (2, 10))
    tiny.train()
    a, b = tiny(x), tiny(x)
    tiny.eval()
    assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing_for_the_real_tokens(tiny, side):
    """Positions skip padding and padding is never attended to: padded rows equal the same rows
    alone.
    """
    a, b = torch.randint(0, 64, (7,)), torch.randint(0, 64, (4,))
    pad = torch.zeros(3, dtype=torch.long)
    b_padded = torch.cat([pad, b]) if side == "left" else torch.cat([b, pad])
    real_b = (
        torch.cat([torch.zeros(3), torch.ones(4)])
        if side == "left"
        else torch.cat([torch.ones(4), torch.zeros(3)])
    )
    logits = tiny(
        torch.stack([a, b_padded]), torch.stack([torch.ones(7), real_b]).long()
    )  # (2, 7, V)
    alone_b = tiny(b[None])[0]  # (4, V)
    torch.testing.assert_close(logits[0], tiny(a[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1][real_b.bool()], alone_b, atol=1e-5, rtol=0)


def test_kv_cache_gives_the_logits_of_the_full_forward_pass(tiny):
    """Feeding 6 tokens, then 1, then 3 through the cache equals one pass over all 10."""
    x = torch.randint(0, 64, (2, 10))
    cache = KVCache(tiny.config, batch_size=2, max_len=10)
    chunks = [
        tiny(x[:, :6], cache=cache),
        tiny(x[:, 6:7], cache=cache),
        tiny(x[:, 7:], cache=cache),
    ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), tiny(x), atol=1e-5, rtol=0)


def test_kv_cache_with_left_padding_matches_the_full_forward_pass(tiny):
    x = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    cache = KVCache(tiny.config, batch_size=2, max_len=9)
    first = tiny(x[:, :5], mask[:, :5], cache)
    rest = tiny(x[:, 5:], mask, cache)
    full = tiny(x, mask)
    torch.testing.assert_close(
        torch.cat([first, rest], 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_skipping_padding_gives_the_padded_pass_for_real_tokens_and_zeros_for_padding(tiny, side):
    """`skip_padding`: the layers outside attention see only real tokens; the cache it fills serves
    later steps."""
    lengths = [9, 3, 6, 1]
    x = torch.randint(0, 64, (4, 12))
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])  # right-padded to 9
    if side == "left":
        mask = mask.flip(1)
    mask = torch.cat(
        [mask, torch.ones(4, 3, dtype=torch.long)], 1
    )  # then 3 more tokens through the cache
    padded_cache, skipped_cache = (KVCache(tiny.config, 4, 12) for _ in range(2))
    padded = tiny.hidden_states(x[:, :9], mask[:, :9], padded_cache)
    skipped = tiny.hidden_states(x[:, :9], mask[:, :9], skipped_cache, skip_padding=True)
    real = mask[:, :9].bool()
    torch.testing.assert_close(skipped[real], padded[real], atol=1e-5, rtol=0)
    assert torch.equal(skipped[~real], torch.zeros_like(skipped[~real]))
    assert skipped_cache.length == padded_cache.length == 9
    later = [tiny.hidden_states(x[:, 9:], mask, c) for c in (padded_cache, skipped_cache)]
    torch.testing.assert_close(later[1], later[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(later[0], tiny.hidden_states(x, mask)[:, 9:], atol=1e-5, rtol=0)


def test_kv_cache_refuses_to_overflow(tiny):
    cache = KVCache(tiny.config, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens; 5 requested"):
        tiny(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def ops_run(fn):
    """(fn's result, the names of the operators it ran), from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {event.name for event in prof.events()}


@pytest.mark.skipif(not Linear.ONEDNN, reason="this torch build has no oneDNN inner product")
@pytest.mark.parametrize(
    "rows, bias", [(1, True), (16, False), (300, True)]
)  # decoding, batched decoding, a forward
def test_product_without_gradient_runs_on_onednn_and_equals_nn_linear(rows, bias):
    """gpt.model.Linear's inference path: oneDNN's inner product, same values as nn.Linear to
    float32 rounding (outputs of size ~0.6, each a 768-term float32 sum taken in another order:
    differences ~1e-6; 1e-5 bounds them)."""
    layer = Linear(
        768, 768, bias=bias
    )  # 589,824 weights: GPT-2's smallest product, over ONEDNN_MIN_WEIGHT
    x = torch.randn(rows, 1, 768)
    with torch.no_grad():
        y, ops = ops_run(lambda: layer(x))
        torch.testing.assert_close(
            y, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0
        )
    assert "mkldnn::_linear_pointwise" in ops and "aten::addmm" not in ops


@pytest.mark.parametrize("size, grad", [(768, True), (32, False)])
def test_product_needing_a_gradient_or_small_takes_nn_linear_and_its_gradient(size, grad):
    """oneDNN's inner product has no backward, and a small product costs less than its set-up."""
    layer = Linear(size, size)
    x = torch.randn(4, size, requires_grad=True)
    with torch.set_grad_enabled(grad):
        y, ops = ops_run(lambda: layer(x))
    assert "mkldnn::_linear_pointwise" not in ops
    torch.testing.assert_close(
        y, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=0, rtol=0
    )
    if grad:
        torch.testing.assert_close(
            torch.autograd.grad(y.sum(), layer.weight)[0],
            x.sum(0).detach().expand(size, -1),
            atol=1e-5,
            rtol=0,
        )
