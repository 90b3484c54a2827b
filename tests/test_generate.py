"""Generation: the KV cache changes nothing, batching changes nothing, and greedy equals transformers'."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt import GPT, GPTConfig, generate
from gpt.checkpoint import load_gpt2
from gpt.generation import left_pad, sample_next


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small random GPT-2 in transformers, and ours loaded from its save_pretrained folder."""
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4)).eval()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, load_gpt2(folder)


def test_greedy_with_cache_equals_greedy_without_for_60_tokens(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (2, 8))
    cached = generate(model, prompt, 60, temperature=0)
    uncached = generate(model, prompt, 60, temperature=0, use_cache=False)
    assert cached.shape == (2, 68)
    assert torch.equal(cached, uncached)


def test_greedy_equals_transformers_generate(pair):
    hf, model = pair
    prompt = torch.randint(0, 300, (1, 8))
    theirs = hf.generate(prompt, max_new_tokens=60, do_sample=False, attention_mask=torch.ones_like(prompt),
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, prompt, 60, temperature=0), theirs)


def test_batched_left_padded_generation_equals_one_at_a_time(pair):
    _, model = pair
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    batched = generate(model, ids, 30, temperature=0, attention_mask=mask)  # (3, 9 + 30)
    for row, p in zip(batched, prompts):
        alone = generate(model, torch.tensor([p]), 30, temperature=0)[0]
        assert torch.equal(row[9 - len(p):], alone)


def test_top_k_1_equals_greedy(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (2, 5))
    sampled = generate(model, prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, prompt, 20, temperature=0))


def test_seeded_sampling_repeats_and_seeds_differ(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (2, 5))
    run = lambda seed: generate(model, prompt, 20, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_each_row_stops_at_its_own_eos_and_is_filled_with_eos(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (4, 5))
    free = generate(model, prompt, 20, temperature=0)
    eos = int(free[0, 7])  # the third token row 0 produces: row 0 must stop there
    out = generate(model, prompt, 20, temperature=0, eos_id=eos)
    for row, ref in zip(out, free):
        new, ref_new = row[5:], ref[5:5 + len(row) - 5]
        hits = (ref_new == eos).nonzero()
        stop = int(hits[0]) if len(hits) else len(new)
        assert torch.equal(new[: stop + 1], ref_new[: stop + 1])  # identical up to and including its EOS
        assert (new[stop:] == eos).all()  # then only EOS
    assert out.shape[1] <= free.shape[1]


def test_top_p_keeps_the_smallest_set_holding_p_of_the_mass():
    """probs (0.5, 0.3, 0.15, 0.05): top_p=0.7 keeps {0, 1}; top_p=0.85 keeps {0, 1, 2}."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    freq = torch.bincount(sample_next(logits, top_p=0.7, generator=g), minlength=4) / 4000
    assert abs(freq[0] - 0.5 / 0.8) < 0.03  # renormalised over the kept tokens (3 sigma ≈ 0.023)


def test_prompt_plus_new_tokens_longer_than_context_is_refused():
    model = GPT(GPTConfig.tiny()).eval()
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
