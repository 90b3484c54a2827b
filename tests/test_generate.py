"""Generation: the KV cache changes nothing, batching changes nothing, and greedy equals
transformers'.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt import GPT, GPTConfig, generate, generation
from gpt.checkpoint import load_gpt2
from gpt.cli import run
from gpt.generation import left_pad, sample_next

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small random GPT-2 in transformers, and ours loaded from its save_pretrained folder."""
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    ).eval()
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
    theirs = hf.generate(
        prompt,
        max_new_tokens=60,
        do_sample=False,
        attention_mask=torch.ones_like(prompt),
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(generate(model, prompt, 60, temperature=0), theirs)


def test_batched_left_padded_generation_equals_one_at_a_time(pair):
    _, model = pair
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    batched = generate(model, ids, 30, temperature=0, attention_mask=mask)  # (3, 9 + 30)
    for row, p in zip(batched, prompts):
        alone = generate(model, torch.tensor([p]), 30, temperature=0)[0]
        assert torch.equal(row[9 - len(p) :], alone)


def test_batched_left_padded_greedy_equals_transformers_generate(pair):
    """The bench's row in small: prompts of different lengths, left-padded, greedy, the same tokens
    as transformers'."""
    hf, model = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 11, 7, 2, 9)]
    ids, mask = left_pad(prompts, pad_id=0)
    theirs = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=25,
        min_new_tokens=25,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(generate(model, ids, 25, temperature=0, attention_mask=mask), theirs)


def test_top_k_1_equals_greedy(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (2, 5))
    sampled = generate(
        model, prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(sampled, generate(model, prompt, 20, temperature=0))


def test_seeded_sampling_repeats_and_seeds_differ(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (2, 5))

    def run(seed):
        return generate(model, prompt, 20, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_each_row_stops_at_its_own_eos_and_is_filled_with_eos(pair):
    _, model = pair
    prompt = torch.randint(0, 300, (4, 5))
    free = generate(model, prompt, 20, temperature=0)
    eos = int(free[0, 7])  # the third token row 0 produces: row 0 must stop there
    out = generate(model, prompt, 20, temperature=0, eos_id=eos)
    for row, ref in zip(out, free):
        new, ref_new = row[5:], ref[5 : 5 + len(row) - 5]
        hits = (ref_new == eos).nonzero()
        stop = int(hits[0]) if len(hits) else len(new)
        assert torch.equal(
            new[: stop + 1], ref_new[: stop + 1]
        )  # identical up to and including its EOS
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


# --------------------------------------------------------- bad arguments: one line, before any work

BAD_GENERATE = [  # (keyword arguments of generate, what its ValueError says)
    (
        dict(temperature=-1.0),
        r"^temperature must be a finite number >= 0 \(0 = greedy\), got -1.0$",
    ),
    (dict(temperature=float("nan")), r"^temperature must be a finite number >= 0 .*, got nan$"),
    (dict(temperature=float("inf")), r"^temperature must be a finite number >= 0 .*, got inf$"),
    (
        dict(top_k=-1),
        r"^top_k must be an integer >= 1 \(None or 0: off, every token stays\), got -1$",
    ),
    (dict(top_k=2.5), r"^top_k must be an integer >= 1 .*, got 2.5$"),
    (
        dict(top_p=0.0),
        r"^top_p must be a number in \(0, 1\] \(None or 1: off, every token stays\), got 0.0$",
    ),
    (dict(top_p=1.5), r"^top_p must be a number in \(0, 1\] .*, got 1.5$"),
    (dict(top_p=float("nan")), r"^top_p must be a number in \(0, 1\] .*, got nan$"),
    (dict(max_new_tokens=0), r"^max_new_tokens must be an integer >= 1, got 0$"),
    (dict(max_new_tokens=-1), r"^max_new_tokens must be an integer >= 1, got -1$"),
    (
        dict(input_ids=torch.tensor([[1, 64]])),
        r"^input_ids hold token id 64, outside the model's vocabulary 0..63 \(64 tokens\); "
        "encode with the tokenizer the checkpoint was trained with$",
    ),
    (
        dict(input_ids=torch.tensor([[-1, 3]])),
        r"^input_ids hold token id -1, outside the model's vocabulary 0..63 \(64 tokens\);",
    ),
    (
        dict(input_ids=torch.zeros(1, 0, dtype=torch.long)),
        r"^the prompt is empty \(input_ids of shape \(1, 0\)\); "
        r"give at least one token, e\.g\. GPT-2's <\|endoftext\|>",
    ),
    (
        dict(input_ids=torch.tensor([[1.0, 2.0]])),
        r"^input_ids must be a \(batch, tokens\) tensor of token ids "
        r"\(torch\.long\), got a torch\.float32 tensor of shape \(1, 2\)$",
    ),
    (dict(input_ids=torch.tensor([1, 2])), r"got a torch\.int64 tensor of shape \(2,\)$"),
    (dict(eos_id=64), r"^eos_id 64 is outside the model's vocabulary 0..63$"),
    (
        dict(attention_mask=torch.ones(1, 2, dtype=torch.long)),
        r"^attention_mask has shape \(1, 2\) but input_ids "
        r"\(1, 3\); make both with left_pad$",
    ),
]


@pytest.mark.parametrize(
    "kwargs, message", BAD_GENERATE, ids=lambda v: str(v)[:40] if isinstance(v, dict) else ""
)
def test_bad_generate_arguments_are_one_line_value_errors_before_any_work(kwargs, message):
    model = GPT(GPTConfig.tiny()).eval()  # vocab 64, context 64
    model.hidden_states = lambda *a, **k: pytest.fail("the model ran on bad arguments")
    kwargs = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), r"^temperature must be a finite number >= 0"),
        (dict(top_k=-3), r"^top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"^top_p must be a number in \(0, 1\]"),
        (
            dict(logits=torch.zeros(10)),
            r"^logits must be \(batch, vocab\), got shape \(10,\); take logits\[:, -1\]$",
        ),
    ],
)
def test_bad_sample_next_arguments_are_one_line_value_errors(kwargs, message):
    kwargs = {"logits": torch.zeros(2, 10), **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_next(**kwargs)


def test_top_k_0_and_top_p_1_turn_the_filter_off_as_in_transformers():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))

    def draw(**kw):
        return sample_next(logits, generator=torch.Generator().manual_seed(1), **kw)

    assert torch.equal(draw(top_k=0), draw()) and torch.equal(draw(top_p=1.0), draw())
    assert not torch.equal(draw(top_k=2), draw())  # the same seed does differ once a filter bites


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (123,),
            r"^load_gpt2 takes a model name \(gpt2, gpt2-medium, gpt2-large, gpt2-xl\) or a "
            r"checkpoint path, got 123$",
        ),
        (("",), r"^load_gpt2 takes a model name .* or a checkpoint path, got ''$"),
        (
            ("gpt2", None, "tf"),
            r"^unknown source 'tf'; valid sources: openai, hf \(None: whichever is cached\)$",
        ),
        (
            ("gpt3",),
            r"^unknown model name 'gpt3'; valid names: gpt2, gpt2-medium, gpt2-large, gpt2-xl \(or "
            r"a path",
        ),
    ],
)
def test_bad_load_gpt2_arguments_are_one_line_value_errors(args, message):
    with pytest.raises(ValueError, match=message):
        load_gpt2(*args)


# ------------------------------------------------------- the command line: python -m gpt.generation


@pytest.fixture(scope="module")
def gpt2_vocab_folder(tmp_path_factory):
    """A tiny GPT-2 with GPT-2's vocabulary (50257), in a save_pretrained folder: what --checkpoint
    takes."""
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=8, n_layer=1, n_head=2)).eval()
    folder = tmp_path_factory.mktemp("hf_vocab50257")
    hf.save_pretrained(folder)
    return folder


def test_command_line_prints_the_prompt_and_its_greedy_continuation(gpt2_vocab_folder, capsys):
    from gpt import get_tokenizer

    generation.main(
        ["--checkpoint", str(gpt2_vocab_folder), "--prompt", "Hello there", "--max-new-tokens", "6"]
    )
    tok = get_tokenizer()
    ids = generate(
        load_gpt2(gpt2_vocab_folder),
        torch.tensor([tok.encode("Hello there")]),
        6,
        temperature=0,
        eos_id=50256,
    )
    assert capsys.readouterr().out == tok.decode(ids[0].tolist()) + "\n"


BAD_COMMAND_LINES = [  # (arguments after --prompt Hi, the last line argparse prints)
    (["--top-k", "-1"], "argument --top-k: must be 0 or more, got -1"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
    (["--temperature", "-0.5"], "argument --temperature: must be >= 0, got -0.5"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1, got -1"),
    (
        ["--model", "gpt3"],
        "argument --model: invalid choice: 'gpt3' (choose from 'gpt2', 'gpt2-medium', "
        "'gpt2-large', 'gpt2-xl')",
    ),
    (
        ["--model", "gpt2-medium", "--checkpoint", "x"],
        "argument --checkpoint: not allowed with argument --model",
    ),
    (["--prompt", ""], "argument --prompt: is empty; give some text to continue"),
]


@pytest.mark.parametrize(
    "argv, line", BAD_COMMAND_LINES, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_command_line_is_one_argparse_line_before_loading_anything(
    argv, line, capsys, monkeypatch
):
    monkeypatch.setattr(
        generation, "load_gpt2", lambda *a: pytest.fail("loaded weights for a bad command line")
    )
    with pytest.raises(SystemExit) as info:
        generation.main(["--prompt", "Hi", *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m gpt.generation: error: {line}"


def test_prompt_beyond_the_checkpoints_vocabulary_is_one_line(pair, tmp_path, capsys):
    hf, _ = pair  # vocab 300: GPT-2's tokenizer gives ids up to 50256
    hf.save_pretrained(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(
            generation.main, ["--checkpoint", str(tmp_path), "--prompt", "Hello world"]
        )  # ids 15496, 995
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: the prompt's GPT-2 token ids reach 15496 but {tmp_path} has a "
        "vocabulary of 300; use a checkpoint with GPT-2's (50257)\n"
    )


def test_ctrl_c_is_one_line_and_exit_130(gpt2_vocab_folder):
    """Ctrl-C mid-generation (a KeyboardInterrupt from `generate`), in a subprocess: `run` exits at
    once."""
    script = (
        "import gpt.generation as g\n"
        "def interrupted(*args, **kwargs):\n    raise KeyboardInterrupt\ng.generate = interrupted\n"
        f"g.run(g.main, ['--checkpoint', {str(gpt2_vocab_folder)!r}, '--prompt', 'Hi'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert (out.returncode, out.stdout) == (130, "")
    assert (
        out.stderr
        == "interrupted: stopped by Ctrl-C; nothing was written, and no partial download is left\n"
    )


def test_command_line_runs_as_a_module_without_warnings(gpt2_vocab_folder):
    """`python -m gpt.generation`: gpt/__init__.py must not have imported gpt.generation already
    (runpy warns)."""
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "gpt.generation",
            "--checkpoint",
            str(gpt2_vocab_folder),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0 and out.stderr == "" and out.stdout.startswith("Hi")
