"""bench/machine.py: the FLOP and byte counts against hand counts and torch's own FLOP counter on a
tiny GPT-2, and the instruction-set reader. No timing is asserted."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import machine
from gpt import GPT, GPTConfig
from gpt.lora import add_lora
from gpt.model import KVCache

CFG = GPTConfig.tiny()  # C = 32, 2 layers, 4 heads, vocab 64
ATTENTION_OPS = ("attention", "sdpa")


def matmul_flops(counter: FlopCounterMode) -> int:
    """What torch's counter charged to the matrix products, attention's left out."""
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if not any(a in str(op) for a in ATTENTION_OPS))


def test_closed_forms_by_hand():
    # C = 32: a token's four block products 2 · (32·96 + 32·32 + 32·128 + 128·32) = 24 · 32² a layer
    assert machine.linear_flops(CFG, 3) == 3 * 2 * 24 * 32 * 32
    assert machine.attention_flops(CFG, 5) == 5 * 2 * 2 * 32 * 2  # QKᵀ and AV, 2 layers
    assert machine.head_flops(CFG, 7) == 7 * 2 * 32 * 64
    assert [machine.causal_pairs(t) for t in (1, 2, 3, 4)] == [1, 3, 6, 10]
    # prompt 2, chosen 3, rejected 1: prompt 3 pairs; chosen 3·2 + 6; rejected 1·2 + 1
    assert machine.packed_pair_pairs(2, 3, 1) == 3 + 12 + 3
    forward = machine.forward_flops(CFG, 6, 18, 4)
    assert forward == machine.linear_flops(CFG, 6) + machine.attention_flops(CFG, 18) + (
        machine.head_flops(CFG, 4)
    )
    # full fine-tuning: 3× the forward, + the KL's reference head at the 4 response positions
    assert machine.fast_step_flops(CFG, [(2, 3, 1)]) == 3 * forward + machine.head_flops(CFG, 4)
    # TRL: rows of 5 and 3 tokens, head everywhere, 3× policy + 1× reference
    assert machine.plain_step_flops(CFG, [(2, 3, 1)]) == 4 * machine.forward_flops(
        CFG, 8, 15 + 6, 8
    )


def test_weight_bytes_are_the_parameters_less_the_position_table_but_one_row():
    model = GPT(CFG)
    params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    expected = 4 * (params - CFG.n_positions * CFG.n_embd + CFG.n_embd)
    assert machine.weight_bytes(CFG) == expected
    gpt2 = GPTConfig.from_name("gpt2")  # 124,439,808 parameters
    assert machine.weight_bytes(gpt2) == 4 * (124_439_808 - 1024 * 768 + 768)
    # batch 1, prompt 4, 3 new tokens: weights 3 times, KV over 5 then 6 tokens
    kv = 4 * 2 * CFG.n_embd * CFG.n_layer * (5 + 6)
    assert machine.decode_bytes(CFG, 4, 3) == 3 * machine.weight_bytes(CFG) + kv


def test_forward_products_equal_torchs_flop_counter():
    model = GPT(CFG).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counted = machine.causal_forward_flops(CFG, 2, 9)
    # torch's counter skips the CPU attention kernel: the rest is the four products and the head
    assert matmul_flops(counter) == counted - machine.attention_flops(CFG, 2 * 45)


def test_attention_flops_equal_torchs_count_of_the_written_out_products():
    B, H, T, S, D = 2, CFG.n_head, 3, 7, CFG.n_embd // CFG.n_head
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-2, -1)).softmax(-1) @ v
    assert counter.get_total_flops() * CFG.n_layer == machine.attention_flops(CFG, B * T * S)


def test_packed_pairs_count_the_packed_mask():
    """`packed_pair_pairs` is the number of allowed (query, key) pairs among the real tokens of
    `packed_pairs_batch`'s mask."""
    from types import SimpleNamespace

    from chapters.common.rows import packed_pairs_batch

    sizes = [(4, 3, 2), (2, 1, 5)]
    pairs = [
        SimpleNamespace(prompt=[1] * P, chosen=[2] * C, rejected=[3] * R) for P, C, R in sizes
    ]
    batch = packed_pairs_batch(pairs, pad_id=0)
    for b, (P, C, R) in enumerate(sizes):
        real = P + C + R
        assert int(batch.attn[b, 0, :real, :real].sum()) == machine.packed_pair_pairs(P, C, R)


def test_decode_step_products_equal_torchs_flop_counter():
    """One cached step: a query per row over 6 keys, the head at one position a row."""
    model = GPT(CFG).eval()
    cache = KVCache(CFG, 3, 16)
    with torch.no_grad():
        model.hidden_states(torch.randint(0, CFG.vocab_size, (3, 5)), cache=cache)
        with FlopCounterMode(display=False) as counter:
            h = model.hidden_states(torch.randint(0, CFG.vocab_size, (3, 1)), cache=cache)
            model.lm_head(h[:, -1])
    step = machine.forward_flops(CFG, 3, 3 * 6, 3)
    assert matmul_flops(counter) == step - machine.attention_flops(CFG, 3 * 6)
    # and the whole generation: decode_flops = the prompt pass + these steps
    assert machine.decode_flops(CFG, [5, 5, 5], 2) == machine.forward_flops(CFG, 15, 45, 3) + step


@pytest.mark.parametrize("lora", [False, True])
def test_training_step_products_equal_torchs_flop_counter(lora):
    """Forward + backward of the packed layout's products (attention's left out: torch charges it
    the full rectangle), full fine-tuning and LoRA rank 2 on attention; the head at 4 positions."""
    torch.manual_seed(0)
    model = GPT(CFG)
    shapes = [(CFG.n_embd, 3 * CFG.n_embd), (CFG.n_embd, CFG.n_embd)]
    if lora:
        add_lora(model, rank=2, alpha=4, targets=("attn.c_attn", "attn.c_proj"))
    x = torch.randint(0, CFG.vocab_size, (2, 6))
    with FlopCounterMode(display=False) as counter:
        h = model.run_blocks(x, torch.arange(6))  # 12 tokens
        logits = h[0, :4] @ model.lm_head.weight.T  # the head at 4 positions
        logits.logsumexp(-1).sum().backward()
    tokens, rows = 12, 4
    expected = machine.step_flops(
        CFG, tokens, 0, rows, lora_rank=2 if lora else 0, lora_shapes=shapes
    )
    assert matmul_flops(counter) == expected


def test_cpu_flags_and_isa_summary():
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
    flags = machine.cpu_flags(text)
    assert {"avx2", "fma", "avx512f", "avx512_bf16"} <= flags and "amx_tile" not in flags
    assert machine.cpu_model(text) == "Some CPU"
    assert machine.isa_summary(flags) == "AVX2 yes, FMA yes, AVX-512 yes (F, BF16), AMX no"
    assert machine.isa_summary({"avx2", "fma"}) == "AVX2 yes, FMA yes, AVX-512 no, AMX no"
    assert machine.isa_summary({"avx2", "avx512f", "amx_tile", "amx_bf16"}).endswith(
        "AMX yes (BF16)"
    )
    assert machine.cpu_flags("no flags here") == set()
    line = machine.isa_line()
    assert torch.backends.cpu.get_cpu_capability() in line


def test_select_isa_native_is_a_no_op_and_python_callers_are_told_to_set_the_variables(
    monkeypatch,
):
    machine.select_isa("native", ["--isa", "native"])  # returns, nothing restarted
    for k in machine.AVX2_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="ATEN_CPU_CAPABILITY=avx2"):
        machine.select_isa("avx2", ["--isa", "avx2", "--not-the-command-line"])
    for k, v in machine.AVX2_ENV.items():
        monkeypatch.setenv(k, v)
    machine.select_isa("avx2", ["--anything"])  # already set: nothing to do


def test_limits_report_and_fractions():
    limits = machine.Limits(2, 2048, 80e9, 160e9, 30e9, "CPU x")
    assert limits.peak == 160e9
    assert limits.flops(96e9) == "96.0 GFLOP/s, 60% of peak"
    assert limits.bytes(15e9) == "15.0 GB/s, 50% of bandwidth"
    best = limits.best_with(machine.Limits(2, 2048, 90e9, 150e9, 33e9, "CPU x"))
    assert (best.mm_flops, best.onednn_flops, best.bandwidth) == (90e9, 160e9, 33e9)
    assert "160.0 GFLOP/s" in limits.report() and "30.0 GB/s" in limits.report()
