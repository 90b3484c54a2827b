"""What each bad input gets: one line saying what is wrong and what to do, never a traceback or a
partial file.

The tables below are the documentation: each row is what a user types (a command line, or a call of
a library function) and a piece of the one line they get back.

Command lines run as `python -m ...` would run them, in a few driver subprocesses (torch is imported
once per driver; each case runs its module's `__main__` through runpy, with its own environment).
For each: a non-zero exit, one short line on stderr (after argparse's usage block, for argparse
errors), no traceback, nothing written, renamed, made or removed under plots/, runs/ or data/ (an
audit hook in the driver sees what the case itself does there), and nothing new or changed under the
case's own $DPO_PLOTS_DIR and $DPO_CACHE. Ctrl-C runs in real subprocesses that get SIGINT as soon
as they print a known line, with seconds of work still ahead (no sleep, so no race with the load of
the machine): exit 130, one line whatever progress frames came first, and every file in their
$DPO_PLOTS_DIR a whole PNG.
Library calls run here: each raises ValueError with one short line.
"""

import contextlib
import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WATCHED = [REPO / "plots", REPO / "runs", REPO / "data"]
CASE_SECONDS = 60  # a case still running after this has started real work: a missing up-front check
# characters, the test's folder written {tmp}: the longest "one short line" (offline: URL, files,
# folder)
SHORT = 400


UNWRITABLE = {
    "DPO_PLOTS_DIR": "{tmp}/a_file/plots"
}  # a folder under a file: not writable even for root
NO_FOLDER = r"\({tmp}/a_file is a file, not a folder\)"
CH8 = "chapters.ch8_instruction_dpo"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
ON_LINUX = pytest.mark.skipif(not Path("/proc/self/mounts").is_file(), reason="no /proc here")

# (id, module or script, arguments, environment, what the one line says (a regex; {tmp} is the
# test's folder), marks)
CLI = [
    # python -m chapters
    (
        "chapters-unknown-chapter",
        "chapters",
        ["--only", "ch99"],
        {},
        r"argument --only: invalid choice: 'ch99'",
        (),
    ),
    ("chapters-misspelt-flag", "chapters", ["--quik"], {}, r"unrecognized arguments: --quik", ()),
    (
        "chapters-plots-unwritable",
        "chapters",
        ["--quick"],
        UNWRITABLE,
        rf"^error: cannot write figures to {{tmp}}/a_file/plots {NO_FOLDER}; set \$DPO_PLOTS_DIR "
        rf"to a folder you can write$",
        (),
    ),
    # the chapters
    (
        "ch1-samples-too-few",
        "chapters.ch1_preference_models",
        ["--samples", "10"],
        {},
        r"^error: --samples must be at least 100 for a chi-square test; pass a larger number$",
        (),
    ),
    (
        "ch1-seed-not-int",
        "chapters.ch1_preference_models",
        ["--seed", "one"],
        {},
        r"argument --seed: 'one' is not an integer$",
        (),
    ),
    (
        "ch1-plots-unwritable",
        "chapters.ch1_preference_models",
        [],
        UNWRITABLE,
        r"^error: cannot write figures to {tmp}/a_file/plots ",
        (),
    ),
    (
        "ch2-rm-steps-0",
        "chapters.ch2_reward_model",
        ["--rm-steps", "0"],
        {},
        r"argument --rm-steps: must be at least 1, got 0$",
        (),
    ),
    (
        "ch3-responses-1",
        "chapters.ch3_kl_optimum",
        ["--responses", "1"],
        {},
        r"^error: --responses must be between 2 and 50, got 1$",
        (),
    ),
    (
        "ch3-plots-unwritable",
        "chapters.ch3_kl_optimum",
        [],
        UNWRITABLE,
        r"^error: cannot write figures to {tmp}/a_file/plots ",
        (),
    ),
    (
        "ch4-beta-0",
        "chapters.ch4_dpo",
        ["--beta", "0"],
        {},
        r"argument --beta: must be > 0, got 0$",
        (),
    ),
    (
        "ch4-beta-nan",
        "chapters.ch4_dpo",
        ["--beta", "nan"],
        {},
        r"argument --beta: 'nan' is not a finite number$",
        (),
    ),
    (
        "ch4-repeats-0",
        "chapters.ch4_dpo",
        ["--repeats", "0"],
        {},
        r"argument --repeats: must be at least 1, got 0$",
        (),
    ),
    (
        "ch5-samples-too-few",
        "chapters.ch5_theory",
        ["--samples", "5"],
        {},
        r"^error: --samples must be at least 100 to measure",
        (),
    ),
    (
        "ch5-plots-unwritable",
        "chapters.ch5_theory",
        [],
        UNWRITABLE,
        r"^error: cannot write figures to {tmp}/a_file/plots ",
        (),
    ),
    (
        "ch6-iterations-0",
        "chapters.ch6_ppo",
        ["--iterations", "0"],
        {},
        r"argument --iterations: must be at least 1, got 0$",
        (),
    ),
    (
        "ch6-beta-negative",
        "chapters.ch6_ppo",
        ["--beta", "-1"],
        {},
        r"argument --beta: must be > 0, got -1$",
        (),
    ),
    (
        "ch7-seed-not-int",
        "chapters.ch7_frontier",
        ["--seed", "1.5"],
        {},
        r"argument --seed: '1.5' is not an integer$",
        (),
    ),
    (
        "ch7-plots-unwritable",
        "chapters.ch7_frontier",
        [],
        UNWRITABLE,
        r"^error: cannot write figures to {tmp}/a_file/plots ",
        (),
    ),
    (
        "ch9-beta-0",
        "chapters.ch9_dpo_vs_ppo",
        ["--beta", "0"],
        {},
        r"argument --beta: must be > 0, got 0$",
        (),
    ),
    (
        "ch9-sweep-negative",
        "chapters.ch9_dpo_vs_ppo",
        ["--sweep", "-1"],
        {},
        r"argument --sweep: must be 0 or more, got -1$",
        (),
    ),
    (
        "ch10-seed-not-int",
        "chapters.ch10_dpo_family",
        ["--seed", "x"],
        {},
        r"argument --seed: 'x' is not an integer$",
        (),
    ),
    (
        "ch10-plots-unwritable",
        "chapters.ch10_dpo_family",
        ["--quick"],
        UNWRITABLE,
        r"^error: cannot write figures to {tmp}/a_file/plots ",
        (),
    ),
    # chapter 8 (arguments, then the data set, then the folders: all before any training)
    ("ch8-beta-0", CH8, ["--betas", "0.1", "0"], {}, r"argument --betas: must be > 0, got 0$", ()),
    (
        "ch8-batch-size-0",
        CH8,
        ["--batch-size", "0"],
        {},
        r"argument --batch-size: must be at least 1, got 0$",
        (),
    ),
    (
        "ch8-temperature-negative",
        CH8,
        ["--temperatures", "0", "-1"],
        {},
        r"argument --temperatures: must be >= 0, got -1$",
        (),
    ),
    (
        "ch8-unknown-model",
        CH8,
        ["--model", "gpt3"],
        {},
        r"argument --model: invalid choice: 'gpt3'",
        (),
    ),
    (
        "ch8-device-unknown",
        CH8,
        ["--smoke", "--device", "toaster"],
        {},
        r"--device 'toaster' is not a torch device",
        (),
    ),
    (
        "ch8-device-cuda-missing",
        CH8,
        ["--smoke", "--device", "cuda"],
        {},
        r"--device cuda: this machine has no CUDA GPU",
        NO_CUDA,
    ),
    (
        "ch8-max-length-past-context",
        CH8,
        ["--smoke", "--max-length", "300"],
        {},
        r"^error: --max-length 300 exceeds the model's context of 256 tokens; give at most 256$",
        (),
    ),
    (
        "ch8-checkpoint-missing",
        CH8,
        ["--checkpoint", "{tmp}/no/such/ckpt"],
        {},
        r"^error: --checkpoint {tmp}/no/such/ckpt: no such file or folder$",
        (),
    ),
    (
        "ch8-data-missing",
        CH8,
        ["--smoke", "--data", "{tmp}/no.json"],
        {},
        r"^error: --data: no data file at {tmp}/no\.json; give the path of "
        r"instruction-data-with-preference\.json$",
        (),
    ),
    (
        "ch8-data-malformed",
        CH8,
        ["--smoke", "--data", "{tmp}/malformed.json"],
        {},
        r"^error: 1 bad entry in the data set: entry 0: missing key\(s\) rejected$",
        (),
    ),
    (
        "ch8-data-empty",
        CH8,
        ["--smoke", "--data", "{tmp}/empty.json"],
        {},
        r"^error: no usable preference pair in the train and validation and test split: of 0 "
        r"entries .* at least 11 entries",
        (),
    ),
    (
        "ch8-data-all-identical",
        CH8,
        ["--smoke", "--data", "{tmp}/identical.json"],
        {},
        r"^error: no usable preference pair .* have chosen == rejected and 0 are longer than "
        r"--max-length 256 tokens",
        (),
    ),
    (
        "ch8-out-unwritable",
        CH8,
        ["--smoke", "--out", "{tmp}/a_file/out"],
        {},
        rf"^error: --out: cannot write tables to {{tmp}}/a_file/out {NO_FOLDER}; pass another "
        rf"folder$",
        (),
    ),
    (
        "ch8-out-in-proc",  # root may write anywhere, but /proc holds no folder of ours
        CH8,
        ["--smoke", "--out", "/proc/nope/run"],
        {},
        r"^error: --out: cannot write tables to /proc/nope/run \(/proc is on the virtual file "
        r"system proc, which holds no files\); pass another folder$",
        ON_LINUX,
    ),
    (
        "ch8-out-held-by-another-run",  # this test's process holds {tmp}/held's lock meanwhile
        CH8,
        ["--smoke", "--out", "{tmp}/held"],
        {},
        rf"^error: --out {{tmp}}/held is in use by another run \(pid {os.getpid()}\); two runs in "
        r"one folder would mix their files: wait for it to end, or pass another --out$",
        (),
    ),
    (
        "ch8-seed-negative",
        CH8,
        ["--smoke", "--seed", "-5"],
        {},
        r"argument --seed: must be 0 or more, got -5$",
        (),
    ),
    (
        "ch8-diverges",  # the command: NaN weights at SFT's 2nd step, said in one line
        CH8,
        ["--smoke", "--dpo-lr", "1e6", "--sft-lr", "1e6", "--out", "{tmp}/diverges"],
        {},
        r"^error: SFT diverged at batch \d+ of \d+ in epoch 1: loss \S+, gradient norm \S+; "
        r"stopped before the update, nothing saved after it; lower --sft-lr \(now 1e\+06\) and "
        r"run again$",
        (),
    ),
    # chapter 8's scale flags (chapters.ch8_instruction_dpo.scaled_run): refused before the model or
    # the data are read
    (
        "ch8-fsdp-without-torchrun",
        CH8,
        ["--smoke", "--fsdp", "--out", "{tmp}/out"],
        {},
        r"^error: --fsdp shards the model over the processes torchrun starts; run: torchrun "
        r"--standalone ",
        (),
    ),
    (
        "ch8-resume-nothing",
        CH8,
        ["--smoke", "--resume", "--out", "{tmp}/out"],
        {},
        r"^error: --resume: nothing to resume in {tmp}/out \(no checkpoints/ or models/ there\); "
        r"run without --resume",
        (),
    ),
    (
        "ch8-grad-accum-past-batch",
        CH8,
        ["--smoke", "--batch-size", "2", "--grad-accum", "4", "--out", "{tmp}/out"],
        {},
        r"^error: --batch-size 2 is fewer pairs than the 1 process\(es\) × --grad-accum 4 "
        r"micro-batches",
        (),
    ),
    (
        "ch8-ladder-resume",
        CH8,
        ["--smoke", "--ladder", "--resume", "--out", "{tmp}/out"],
        {},
        r"^error: --ladder runs in one process and saves no models, .*; leave out --resume, or run "
        r"without --ladder$",
        (),
    ),
    (
        "ch8-authors-fsdp",
        CH8,
        ["--smoke", "--authors-setup", "--fsdp", "--out", "{tmp}/out"],
        {},
        r"^error: --authors-setup runs in one process .*; leave out --fsdp, or run without "
        r"--authors-setup$",
        (),
    ),
    (
        "ch8-lr-schedule-unknown",
        CH8,
        ["--smoke", "--lr-schedule", "step"],
        {},
        r"argument --lr-schedule: invalid choice: 'step' \(choose from",
        (),
    ),
    (
        "ch8-warmup-negative",
        CH8,
        ["--smoke", "--warmup-steps", "-1"],
        {},
        r"argument --warmup-steps: must be 0 or more, got -1$",
        (),
    ),
    # gpt: generation and download
    (
        "generation-no-prompt",
        "gpt.generation",
        [],
        {},
        r"the following arguments are required: --prompt$",
        (),
    ),
    (
        "generation-top-k-negative",
        "gpt.generation",
        ["--prompt", "Hi", "--top-k", "-1"],
        {},
        r"argument --top-k: must be 0 or more, got -1$",
        (),
    ),
    (
        "generation-top-k-not-int",
        "gpt.generation",
        ["--prompt", "Hi", "--top-k", "2.5"],
        {},
        r"argument --top-k: '2.5' is not an integer$",
        (),
    ),
    (
        "generation-top-p-0",
        "gpt.generation",
        ["--prompt", "Hi", "--top-p", "0"],
        {},
        r"argument --top-p: must be in \(0, 1\], got 0$",
        (),
    ),
    (
        "generation-top-p-above-1",
        "gpt.generation",
        ["--prompt", "Hi", "--top-p", "1.5"],
        {},
        r"argument --top-p: must be in \(0, 1\], got 1.5$",
        (),
    ),
    (
        "generation-temperature-nan",
        "gpt.generation",
        ["--prompt", "Hi", "--temperature", "nan"],
        {},
        r"argument --temperature: 'nan' is not a finite number$",
        (),
    ),
    (
        "generation-temperature-negative",
        "gpt.generation",
        ["--prompt", "Hi", "--temperature", "-1"],
        {},
        r"argument --temperature: must be >= 0, got -1$",
        (),
    ),
    (
        "generation-max-new-tokens-negative",
        "gpt.generation",
        ["--prompt", "Hi", "--max-new-tokens", "-1"],
        {},
        r"argument --max-new-tokens: must be at least 1, got -1$",
        (),
    ),
    (
        "generation-empty-prompt",
        "gpt.generation",
        ["--prompt", ""],
        {},
        r"argument --prompt: is empty; give some text to continue$",
        (),
    ),
    (
        "generation-checkpoint-missing",
        "gpt.generation",
        ["--prompt", "Hi", "--checkpoint", "{tmp}/no/such/ckpt"],
        {},
        r"^error: checkpoint {tmp}/no/such/ckpt: no such file or folder$",
        (),
    ),
    (
        "generation-unknown-model",
        "gpt.generation",
        ["--prompt", "Hi", "--model", "gpt3"],
        {},
        r"argument --model: invalid choice: 'gpt3' \(choose from 'gpt2', ",
        (),
    ),
    (
        "download-unknown-model",
        "gpt.download",
        ["gpt3"],
        {},
        r"argument NAME: invalid choice: 'gpt3' \(choose from 'gpt2', ",
        (),
    ),
    (
        "download-unknown-source",
        "gpt.download",
        ["gpt2", "--source", "tf"],
        {},
        r"argument --source: invalid choice: 'tf' \(choose from 'openai', 'hf'\)$",
        (),
    ),
    (
        "download-cache-unwritable",
        "gpt.download",
        ["gpt2", "--cache-dir", "{tmp}/a_file/cache"],
        {},
        rf"^error: cannot write the cache folder {{tmp}}/a_file/cache/gpt2/openai {NO_FOLDER}; "
        rf"pass --cache-dir DIR",
        (),
    ),
    (
        "download-offline",
        "gpt.download",
        ["gpt2"],
        {},
        r"^error: could not download https://.*/124M/checkpoint \(.*\)\. Run the command again; "
        r"offline, put hparams\.json, "
        r"model\.ckpt\.index, model\.ckpt\.data-00000-of-00001 .* into "
        r"{tmp}/download-offline/cache/gpt2/openai/ by hand",
        (),
    ),
    # the benchmarks
    (
        "bench-gpt2-repeats-0",
        "bench/bench_gpt2.py",
        ["--repeats", "0"],
        {},
        r"argument --repeats: must be at least 1, got 0$",
        (),
    ),
    (
        "bench-dpo-step-steps-0",
        "bench/bench_dpo_step.py",
        ["--steps", "0"],
        {},
        r"argument --steps: must be at least 1, got 0$",
        (),
    ),
    (
        "bench-dpo-step-shape",
        "bench/bench_dpo_step.py",
        ["--shape", "gpt5"],
        {},
        r"argument --shape: invalid choice: 'gpt5'",
        (),
    ),
    (
        "bench-dpo-step-cuda-missing",
        "bench/bench_dpo_step.py",
        ["--device", "cuda"],
        {},
        r"--device cuda: this machine has no CUDA GPU",
        NO_CUDA,
    ),
    (
        "bench-dpo-family-pairs-0",
        "bench/bench_dpo_family.py",
        ["--pairs", "0"],
        {},
        r"argument --pairs: must be at least 1, got 0$",
        (),
    ),
]
SLOW = {
    "download-offline"
}  # waits for the name lookup to fail: its own driver, so it waits beside the others

# Ctrl-C: (id, command after `python -u -m`, the line on stdout after which SIGINT goes (a regex:
# a known point with seconds of work still ahead, never a time), what the one line says, marks)
CH1_SGD = r"^§2\.1 Christiano et al\."  # then 200 SGD steps, ~10 s
CTRL_C = [
    (
        "ctrl-c-chapters",
        ["chapters", "--only", "ch1_preference_models"],
        CH1_SGD,
        r"^interrupted: stopped by Ctrl-C in ch1_preference_models \(0 of 1 chapters done\); files "
        r"already written are whole$",
        (),
    ),
    (
        "ctrl-c-ch4",
        ["chapters.ch4_dpo"],
        r"^infinite data \(expected loss\)",  # then 20 data sets at 11 sizes, ~5 s
        r"^interrupted: stopped by Ctrl-C; files already written are whole$",
        (),
    ),
    (
        "ctrl-c-ch1",
        ["chapters.ch1_preference_models"],
        CH1_SGD,
        r"^interrupted: stopped by Ctrl-C; files already written are whole$",
        (),
    ),
]


def _tiny_gpt():
    from gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.tiny())


def _gen(**kw):
    from gpt import generate

    model = _tiny_gpt()
    ids = kw.pop("ids", torch.tensor([[1, 2, 3]]))
    return generate(model, ids, kw.pop("max_new_tokens", 4), **kw)


def _sample(**kw):
    from gpt.generation import sample_next

    return sample_next(torch.randn(2, 10), **kw)


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _call(module, name, *args, **kw):
    import importlib

    return getattr(importlib.import_module(module), name)(*args, **kw)


# (id, the call, what its ValueError says (a regex), marks)
LIBRARY = [
    (
        "generate-temperature-negative",
        lambda: _gen(temperature=-1),
        r"temperature must be a finite number >= 0 \(0 = greedy\)",
        (),
    ),
    (
        "generate-temperature-nan",
        lambda: _gen(temperature=float("nan")),
        r"temperature must be a finite number >= 0 .*got nan",
        (),
    ),
    (
        "generate-top-k-negative",
        lambda: _gen(top_k=-1),
        r"top_k must be an integer >= 1 \(None or 0: off",
        (),
    ),
    (
        "generate-top-p-0",
        lambda: _gen(top_p=0.0),
        r"top_p must be a number in \(0, 1\] .*got 0.0",
        (),
    ),
    (
        "generate-top-p-above-1",
        lambda: _gen(top_p=1.5),
        r"top_p must be a number in \(0, 1\] .*got 1.5",
        (),
    ),
    (
        "generate-max-new-tokens-negative",
        lambda: _gen(max_new_tokens=-1),
        r"max_new_tokens must be an integer >= 1, got -1",
        (),
    ),
    (
        "generate-token-beyond-vocab",
        lambda: _gen(ids=_t(64).long()[None]),
        r"^input_ids hold token id 64, outside the model's vocabulary 0\.\.63 \(64 tokens\); "
        r"encode with the tokenizer",
        (),
    ),
    (
        "forward-token-beyond-vocab",
        lambda: _tiny_gpt()(torch.tensor([[1, 2, 70]])),
        r"^input_ids hold token id 70, outside the model's vocabulary 0\.\.63 \(64 tokens\)",
        (),
    ),
    (
        "forward-negative-token",  # -100, the ignore index of a cross-entropy, fed as an input
        lambda: _tiny_gpt()(torch.tensor([[1, -100, 3]])),
        r"^input_ids hold token id -100, outside the model's vocabulary 0\.\.63 \(64 tokens\)",
        (),
    ),
    (
        "response-logprobs-token-beyond-vocab",
        lambda: _call(
            "chapters.ch4_dpo",
            "response_logprobs",
            _t(0).expand(1, 4, 5),
            _t(0, 1, 5, 2).long()[None],
            _t(0, 1, 1, 1).bool()[None],
        ),
        r"^input_ids hold token id 5, outside the logits' vocabulary 0\.\.4 \(5 tokens\)",
        (),
    ),
    (
        "generate-empty-prompt",
        lambda: _gen(ids=_t().long()[None]),
        r"the prompt is empty .*give at least one token",
        (),
    ),
    (
        "generate-one-row-not-a-batch",
        lambda: _gen(ids=_t(1, 2).long()),
        r"input_ids must be a \(batch, tokens\) tensor",
        (),
    ),
    (
        "generate-past-context",
        lambda: _gen(max_new_tokens=10**6),
        r"exceeds the context of 64; shorten the prompt",
        (),
    ),
    ("sample-next-top-k-negative", lambda: _sample(top_k=-1), r"top_k must be an integer >= 1", ()),
    ("sample-next-top-p-0", lambda: _sample(top_p=0.0), r"top_p must be a number in \(0, 1\]", ()),
    (
        "sample-next-temperature-negative",
        lambda: _sample(temperature=-1.0),
        r"temperature must be a finite number >= 0",
        (),
    ),
    (
        "generate-eos-beyond-vocab",
        lambda: _gen(eos_id=64),
        r"eos_id 64 is outside the model's vocabulary 0..63",
        (),
    ),
    (
        "sample-next-one-row-of-logits",
        lambda: _call("gpt.generation", "sample_next", torch.randn(10)),
        r"logits must be \(batch, vocab\), got shape \(10,\)",
        (),
    ),
    (
        "load-gpt2-not-a-name",
        lambda: _call("gpt", "load_gpt2", 123),
        r"load_gpt2 takes a model name .* or a checkpoint path, got 123",
        (),
    ),
    (
        "load-gpt2-unknown-source",
        lambda: _call("gpt", "load_gpt2", "gpt2", source="tf"),
        r"unknown source 'tf'; valid sources: openai, hf",
        (),
    ),
    (
        "dpo-loss-beta-nan",
        lambda: _call("chapters.ch4_dpo", "dpo_loss", _t(0), _t(0), _t(0), _t(0), float("nan")),
        r"beta must be a finite number > 0",
        (),
    ),
    (
        "response-logprobs-float-ids",
        lambda: _call(
            "chapters.ch4_dpo",
            "response_logprobs",
            _t(0).expand(1, 4, 5),
            _t(0, 0, 0, 0)[None],
            _t(1, 1, 1, 1).bool()[None],
        ),
        r"input_ids must be token ids of dtype torch.long, got torch.float64",
        (),
    ),
    (
        "optimal-policy-beta-nan",
        lambda: _call(
            "chapters.ch3_kl_optimum", "optimal_policy", _t(0.5, 0.5), _t(0, 1), float("nan")
        ),
        r"beta must be > 0 and finite",
        (),
    ),
    (
        "load-gpt2-unknown-name",
        lambda: _call("gpt", "load_gpt2", "gpt3"),
        r"unknown model name 'gpt3'",
        (),
    ),
    (
        "load-gpt2-missing-path",
        lambda: _call("gpt", "load_gpt2", "/no/such/ckpt"),
        r"no such file or folder",
        (),
    ),
    (
        "dpo-loss-beta-0",
        lambda: _call("chapters.ch4_dpo", "dpo_loss", _t(0), _t(0), _t(0), _t(0), 0.0),
        r"beta must be .*> 0",
        (),
    ),
    (
        "dpo-loss-shapes",
        lambda: _call(
            "chapters.ch4_dpo", "dpo_loss", _t(0, 0), _t(0, 0, 0), _t(0, 0), _t(0, 0), 0.1
        ),
        r"do not broadcast",
        (),
    ),
    (
        "response-logprobs-shapes",
        lambda: _call(
            "chapters.ch4_dpo",
            "response_logprobs",
            _t(0).expand(1, 3, 5),
            _t(0, 0, 0, 0).long()[None],
            _t(1, 1, 1, 1).bool()[None],
        ),
        r"shapes disagree",
        (),
    ),
    (
        "optimal-policy-beta-0",
        lambda: _call("chapters.ch3_kl_optimum", "optimal_policy", _t(0.5, 0.5), _t(0, 1), 0.0),
        r"beta must be > 0",
        (),
    ),
    (
        "optimal-policy-negative-reference",
        lambda: _call("chapters.ch3_kl_optimum", "optimal_policy", _t(-0.5, 1.5), _t(0, 1), 1.0),
        r"pi_ref must be a distribution .* every entry >= 0",
        (),
    ),
    (
        "optimal-policy-shapes",
        lambda: _call("chapters.ch3_kl_optimum", "optimal_policy", _t(0.5, 0.5), _t(0, 1, 2), 1.0),
        r"pi_ref \(2,\) and rewards \(3,\) do not broadcast; give one reward per response",
        (),
    ),
    (
        "plackett-luce-repeated-option",
        lambda: _call("chapters.ch1_preference_models", "plackett_luce", _t(0, 0, 0), [0, 0, 1]),
        r"ranking repeats an option",
        (),
    ),
    (
        "gae-gamma-above-1",
        lambda: _call("chapters.ch6_ppo", "gae", _t(0, 0), _t(0, 0), 2.0, 0.9),
        r"gamma and lam must be in \[0, 1\], got 2.0 and 0.9",
        (),
    ),
    (
        "gae-shapes",
        lambda: _call("chapters.ch6_ppo", "gae", _t(0, 0), _t(0, 0, 0), 0.9, 0.9),
        r"rewards \(2,\), values \(3,\) .*must have one shape",
        (),
    ),
    (
        "preference-loss-unknown-kind",
        lambda: _call(
            "chapters.ch10_dpo_family", "preference_loss", "dpoo", _t(0), _t(0), _t(0), _t(0), 0.1
        ),
        r"unknown kind 'dpoo'; use one of dpo, ",
        (),
    ),
]


# ---------------------------------------------------------------- the driver (runs in a subprocess)


class _CaseTimeout(BaseException):
    pass


def _snapshot(roots):
    """Every file and folder under `roots`: path -> (size, mtime) for files, None for folders."""
    seen = {}
    for root in map(Path, roots):
        for p in [root, *root.rglob("*")] if root.exists() else []:
            seen[str(p)] = None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
    return seen


def _changes(before, after):
    return sorted(
        {p for p in before.keys() | after.keys() if before.get(p, "gone") != after.get(p, "gone")}
    )


# paths under WATCHED that the running case opened for writing, renamed to, made or removed
_WRITES = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event, args):
    """Audit hook: the repository's folders are watched by what this process does to them, so other
    processes writing there at the same time (a shared checkout) are not blamed on a case."""
    if (
        event == "open"
        and isinstance(args[0], (str, os.PathLike))
        and (args[2] or 0) & _WRITE_FLAGS
    ):
        path = args[0]
    elif event in ("os.rename", "os.replace"):
        path = args[1]
    elif event in ("os.mkdir", "os.remove", "os.rmdir"):
        path = args[0]
    else:
        return
    if isinstance(path, (str, os.PathLike)):
        path = Path(os.path.abspath(path))
        if any(path == root or root in path.parents for root in WATCHED):
            _WRITES.append(str(path))


def _run_case(case):
    saved_env, out, err = dict(os.environ), io.StringIO(), io.StringIO()
    os.environ.update(case["env"])
    roots = [case["env"]["DPO_PLOTS_DIR"], case["env"]["DPO_CACHE"]]
    before = _snapshot(roots)
    _WRITES.clear()
    sys.argv = [case["target"], *case["args"]]
    start = time.perf_counter()
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if case["target"].endswith(".py"):
                    runpy.run_path(str(REPO / case["target"]), run_name="__main__")
                else:
                    runpy.run_module(case["target"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # what the interpreter does with it
                code = (
                    e.code
                    if isinstance(e.code, int) or e.code is None
                    else (print(e.code, file=sys.stderr), 1)[1]
                )
            except _CaseTimeout:
                code = f"still running after {CASE_SECONDS} s"
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        signal.alarm(0)
        os.environ.clear()
        os.environ.update(saved_env)
    return {
        "code": code or 0,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "seconds": time.perf_counter() - start,
        "changed": sorted(set(_WRITES)) + _changes(before, _snapshot(roots)),
    }


def _drive(cases_file, results_file):
    sys.path.insert(0, str(REPO))
    warnings.filterwarnings(
        "ignore", message=".*found in sys.modules", category=RuntimeWarning
    )  # runpy, module reruns
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_CaseTimeout()))
    sys.addaudithook(_audit)
    import torch

    torch.set_num_threads(1)
    cases = json.loads(Path(cases_file).read_text())
    Path(results_file).write_text(json.dumps([_run_case(c) for c in cases]))


# ---------------------------------------------------------------- running the tables


def _case_env(tmp, name):
    return {
        "DPO_PLOTS_DIR": str(tmp / name / "plots"),
        "DPO_CACHE": str(tmp / name / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
    }


def _run_drivers(tmp, groups):
    def one(i_cases):
        i, cases = i_cases
        cases_file, results_file = tmp / f"cases{i}.json", tmp / f"results{i}.json"
        cases_file.write_text(json.dumps(cases))
        subprocess.run(
            [sys.executable, __file__, str(cases_file), str(results_file)],
            cwd=REPO,
            check=True,
            timeout=CASE_SECONDS * (len(cases) + 1),
        )
        return json.loads(results_file.read_text())

    with ThreadPoolExecutor(len(groups)) as pool:
        return list(pool.map(one, enumerate(groups)))


def _ctrl_c(tmp, name, argv, known):
    """Run `python -m argv`, send SIGINT right after it prints a line matching `known` (its work is
    then under way, with seconds of it left: no sleep, no race with its end), and collect what it
    says."""
    env = {**os.environ, **_case_env(tmp, name), "PYTHONUNBUFFERED": "1"}
    # SIGINT's default action in the child: a shell's background job (`pytest &`) starts with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler, so the signal would be lost
    # and the test would wrongly fail
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(CASE_SECONDS, proc.kill)  # a run that hangs before the line
    watchdog.start()
    first = ""
    for line in proc.stdout:  # up to the known point; at EOF the run ended without it
        first += line
        if re.search(known, line.strip()):
            proc.send_signal(signal.SIGINT)
            break
    watchdog.cancel()
    stdout, stderr = proc.communicate(timeout=CASE_SECONDS)
    if not re.search(known, first, re.M):
        stderr += f"\n(test: no line matching {known!r} on stdout: SIGINT never sent)"
    plots = Path(env["DPO_PLOTS_DIR"])
    partial = [
        p.name
        for p in plots.glob("*")
        if p.suffix != ".png" or not p.read_bytes().endswith(b"IEND\xaeB`\x82")
    ]
    return {"code": proc.returncode, "stdout": first + stdout, "stderr": stderr, "changed": partial}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every command-line row run once: id -> {code, stdout, stderr, changed}."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "a_file").write_text("a file where a folder is expected\n")
    (tmp / "empty.json").write_text("[]")
    (tmp / "malformed.json").write_text(
        json.dumps([{"instruction": "x", "input": "", "output": "", "chosen": "a"}])
    )
    pair = {
        "instruction": "Say hi.",
        "input": "",
        "output": "Hi.",
        "chosen": "Hi.",
        "rejected": "Hi.",
    }
    (tmp / "identical.json").write_text(json.dumps([pair] * 40))
    from chapters.ch8_instruction_dpo.scaled_run import Scale

    held = Scale()
    held.hold(tmp / "held")  # as a run of chapter 8 would, for ch8-out-held-by-another-run
    cases = [
        {
            "id": i,
            "target": t,
            "args": [a.format(tmp=tmp) for a in args],
            "env": {**_case_env(tmp, i), **{k: v.format(tmp=tmp) for k, v in env.items()}},
        }
        for i, t, args, env, _, _ in CLI
    ]
    fast = [c for c in cases if c["id"] not in SLOW]
    groups = [fast[0::2], fast[1::2], [c for c in cases if c["id"] in SLOW]]
    with ThreadPoolExecutor(2) as pool:
        drivers = pool.submit(_run_drivers, tmp, groups)
        ctrl_c = {i: pool.submit(_ctrl_c, tmp, i, argv, at) for i, argv, at, _, _ in CTRL_C}
        results = [r for group in drivers.result() for r in group]
        outcomes = {
            **{c["id"]: r for c, r in zip([c for g in groups for c in g], results)},
            **{i: f.result() for i, f in ctrl_c.items()},
        }
    held.close()
    for o in outcomes.values():
        o["stdout"], o["stderr"] = (o[k].replace(str(tmp), "{tmp}") for k in ("stdout", "stderr"))
    return outcomes


def _assert_one_line(outcome, expected):
    assert outcome["code"] != 0, f"exit code 0; stdout ends {outcome['stdout'][-300:]!r}"
    both = outcome["stdout"] + outcome["stderr"]
    assert "Traceback" not in both, both[-2000:]
    # what is left of each line once progress-bar frames ("... 40%|███ | 4/10 ...", each after a
    # "\r") are taken out: a bar's frames may come before the message, however many
    frames = re.compile(r"[^\r]*?\d+%\|[^|\r]*\| *\d+/\d+ \[[^\]\r]*\]")
    lines = [frames.sub("", line).strip("\r ") for line in outcome["stderr"].split("\n")]
    lines = [line for line in lines if line]
    if lines and lines[0].startswith("usage:"):  # argparse: its usage block, then one error line
        lines = lines[-1:]
    assert len(lines) == 1, f"want one line on stderr, got {lines}"
    assert len(lines[0]) <= SHORT, lines[0]
    assert re.search(expected, lines[0]), f"{lines[0]!r} does not match {expected!r}"
    assert outcome["changed"] == [], f"files written, changed or removed: {outcome['changed']}"


@pytest.mark.parametrize(
    "name, expected", [pytest.param(i, e, id=i, marks=m) for i, _, _, _, e, m in CLI]
)
def test_bad_command_line_gets_one_line_and_writes_nothing(outcomes, name, expected):
    _assert_one_line(outcomes[name], expected)


@pytest.mark.parametrize(
    "name, expected", [pytest.param(i, e, id=i, marks=m) for i, _, _, e, m in CTRL_C]
)
def test_ctrl_c_gets_one_line_exit_130_and_no_partial_file(outcomes, name, expected):
    assert outcomes[name]["code"] == 130, outcomes[name]
    _assert_one_line(outcomes[name], expected)


@pytest.mark.parametrize(
    "call, expected", [pytest.param(c, e, id=i, marks=m) for i, c, e, m in LIBRARY]
)
def test_bad_library_call_raises_value_error_with_one_line(call, expected):
    with pytest.raises(ValueError, match=expected) as err:
        call()
    assert "\n" not in str(err.value) and len(str(err.value)) <= SHORT, str(err.value)


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("positive_int", {"1": 1, "7": 7}, ["0", "-3", "1.5", "x"]),
        ("nonnegative_int", {"0": 0, "7": 7}, ["-1", "2.0"]),
        ("positive_float", {"1e-3": 1e-3, "2": 2.0}, ["0", "-1", "nan", "inf"]),
        ("nonnegative_float", {"0": 0.0, "0.7": 0.7}, ["-0.1", "nan", "-inf"]),
        ("probability", {"1": 1.0, "0.95": 0.95}, ["0", "1.5", "nan"]),
    ],
)
def test_argparse_types_accept_their_range_and_refuse_the_rest(name, good, bad):
    import argparse

    from gpt import cli

    kind = getattr(cli, name)
    assert {text: kind(text) for text in good} == good
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_interrupted_figure_leaves_neither_the_png_nor_a_temporary_file(tmp_path, monkeypatch):
    from chapters.common.figures import plt, save_figure

    fig, _ = plt.subplots()

    def interrupted_savefig(f, **kw):
        f.write(b"\x89PNG half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", interrupted_savefig)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, tmp_path / "fig.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_table_write_keeps_the_previous_table_whole(tmp_path):
    from chapters.common.files import atomic_open

    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad row"), atomic_open(table) as f:
        f.write("a,b\n")
        raise ValueError("bad row")
    assert table.read_text() == "a,b\n1,2\n" and list(tmp_path.iterdir()) == [table]


if __name__ == "__main__":
    _drive(*sys.argv[1:])
