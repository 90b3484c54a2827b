"""The hand-written GPT-2: sizes, padding, the KV cache (the match with transformers is in test_checkpoint.py)."""
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
    with pytest.raises(ValueError, match="unknown model name 'gpt3'; valid names: gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
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
    """Positions skip padding and padding is never attended to: padded rows equal the same rows alone."""
    a, b = torch.randint(0, 64, (7,)), torch.randint(0, 64, (4,))
    pad = torch.zeros(3, dtype=torch.long)
    b_padded = torch.cat([pad, b]) if side == "left" else torch.cat([b, pad])
    real_b = torch.cat([torch.zeros(3), torch.ones(4)]) if side == "left" else torch.cat([torch.ones(4), torch.zeros(3)])
    logits = tiny(torch.stack([a, b_padded]), torch.stack([torch.ones(7), real_b]).long())  # (2, 7, V)
    alone_b = tiny(b[None])[0]  # (4, V)
    torch.testing.assert_close(logits[0], tiny(a[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1][real_b.bool()], alone_b, atol=1e-5, rtol=0)


def test_kv_cache_gives_the_logits_of_the_full_forward_pass(tiny):
    """Feeding 6 tokens, then 1, then 3 through the cache equals one pass over all 10."""
    x = torch.randint(0, 64, (2, 10))
    cache = KVCache(tiny.config, batch_size=2, max_len=10)
    chunks = [tiny(x[:, :6], cache=cache), tiny(x[:, 6:7], cache=cache), tiny(x[:, 7:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), tiny(x), atol=1e-5, rtol=0)


def test_kv_cache_with_left_padding_matches_the_full_forward_pass(tiny):
    x = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    cache = KVCache(tiny.config, batch_size=2, max_len=9)
    first = tiny(x[:, :5], mask[:, :5], cache)
    rest = tiny(x[:, 5:], mask, cache)
    full = tiny(x, mask)
    torch.testing.assert_close(torch.cat([first, rest], 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_skipping_padding_gives_the_padded_pass_for_real_tokens_and_zeros_for_padding(tiny, side):
    """`skip_padding`: the layers outside attention see only real tokens; the cache it fills serves later steps."""
    lengths = [9, 3, 6, 1]
    x = torch.randint(0, 64, (4, 12))
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])  # right-padded to 9
    if side == "left":
        mask = mask.flip(1)
    mask = torch.cat([mask, torch.ones(4, 3, dtype=torch.long)], 1)  # then 3 more tokens through the cache
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


@pytest.mark.parametrize("rows, out_features, bias", [(1, 96, True), (1, 97, False), (16, 97, True), (32, 96, False),
                                                      (33, 96, True)])  # 97: outputs left over; 33: nn.Linear's path
def test_few_row_product_equals_nn_linear_in_value_and_gradient(rows, out_features, bias):
    """gpt.model.Linear computes up to DECODE_ROWS rows as a batched product of output slices (decoding's path)."""
    layer = Linear(32, out_features, bias=bias)
    x = torch.randn(rows, 1, 32, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the sliced path needs more than one thread
    try:
        y = layer(x)
    finally:
        torch.set_num_threads(threads)
    y_ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.weight])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, layer.weight])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)
