"""What this machine can do, measured in the benchmark's own process, and what a workload asks of
it.

Every benchmark prints, beside its tables:
- the CPU's instruction sets (AVX2, AVX-512, AMX, from /proc/cpuinfo's flags) and the kernels torch
  runs (`torch.backends.cpu.get_cpu_capability()`), with the variables that cap them (`--isa avx2`);
- the fp32 matmul peak: a square product of `n` = 2048, best of a few, at the benchmark's thread
  count, through torch.mm (MKL) and through oneDNN's inner product (the kernel `gpt.model.Linear`
  uses without a gradient); the larger of the two is "the peak" each workload is a fraction of;
- the memory bandwidth: `torch.sum` over a 256 MiB float32 buffer (eight times the L3 cache of the
  machines this project runs on), best of a few, bytes read per second.

What a workload does is counted from GPT-2's shapes on the real tokens (padding's work is waste,
not counted): 2·m·n·k FLOPs per matrix product (one multiply and one add per term) for the
attention projections, the MLP, the attention scores QKᵀ and their product with V over the (query,
key) pairs the mask allows, and the output head at the positions where it is applied. Layer norms,
GELU, softmax, embeddings, the loss and the optimizer are not counted (they are O(tokens · C), a
fraction of a percent at GPT-2's shapes). A training step's backward counts 2× its forward
(gradients of the inputs and of the weights, one product each); a product whose weight is frozen
(LoRA's base weights, the tied head under LoRA) counts only its input gradient, 1×. Decoding one
token at batch 1 reads every weight once: its bytes/s counts all parameter bytes but the position
table's (one row is read) plus the KV cache's keys and values of every layer.
"""

import os
import platform
import sys
import time
from dataclasses import dataclass

# --isa avx2: the variables that put torch (ATen's own kernels), oneDNN and MKL on their AVX2 code.
# Each library reads its variable once, when it first runs, so they must be in the environment from
# the process's start: `select_isa` starts the command again with them set.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
ISA_CHOICES = ("native", "avx2")


def add_isa_argument(parser):
    parser.add_argument(
        "--isa",
        choices=ISA_CHOICES,
        default="native",
        help="native (default): the best kernels for this CPU; avx2: torch, oneDNN and MKL held to "
        "AVX2 (the command restarts itself with "
        + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
        + ")",
    )


def select_isa(isa: str, argv=None):
    """Make the process run on `isa`'s kernels: for avx2, unless the variables are already set,
    start the same command again with them (os.execve; nothing has run yet). Call it right after
    parsing the arguments, before any tensor work. `argv`: the arguments main() was given, when not
    the command line's (then the variables must be set by the caller)."""
    if isa != "avx2" or all(os.environ.get(k) == v for k, v in AVX2_ENV.items()):
        return
    if argv is not None and list(argv) != sys.argv[1:]:
        raise ValueError(
            "--isa avx2 from Python: set "
            + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
            + " in the environment before starting it"
        )
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})


# ---------------------------------------------------------------------------- instruction sets


def cpu_flags(cpuinfo: str) -> set:
    """The flags of the first processor in /proc/cpuinfo's text (empty set when there are none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def isa_summary(flags: set) -> str:
    """'AVX2 yes, AVX-512 yes (F, VNNI, BF16), AMX no': what the CPU offers, from its flags."""
    avx512 = [
        name
        for flag, name in [
            ("avx512f", "F"),
            ("avx512bw", "BW"),
            ("avx512_vnni", "VNNI"),
            ("avx512_bf16", "BF16"),
            ("avx512_fp16", "FP16"),
        ]
        if flag in flags
    ]
    amx = [name for flag, name in [("amx_bf16", "BF16"), ("amx_int8", "INT8")] if flag in flags]
    yes = {True: "yes", False: "no"}
    return (
        f"AVX2 {yes['avx2' in flags]}, FMA {yes['fma' in flags]}, "
        f"AVX-512 {yes['avx512f' in flags]}"
        + (f" ({', '.join(avx512)})" if avx512 else "")
        + f", AMX {yes['amx_tile' in flags]}"
        + (f" ({', '.join(amx)})" if amx else "")
    )


def read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def isa_line() -> str:
    """One line: the CPU, what it offers, what torch runs, and any variable capping the kernels."""
    import torch

    info = read_cpuinfo()
    capped = [f"{k}={os.environ[k]}" for k in AVX2_ENV if k in os.environ]
    return (
        f"CPU {cpu_model(info)}: {isa_summary(cpu_flags(info)) if info else 'flags unknown'}; "
        f"torch's kernels {torch.backends.cpu.get_cpu_capability()}"
        + (f" (capped: {' '.join(capped)})" if capped else " (not capped)")
    )


# ---------------------------------------------------------------------------- measured limits


def _best(fn, repeats):
    fn()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class Limits:
    threads: int
    n: int
    mm_flops: float  # FLOP/s, torch.mm
    onednn_flops: float  # FLOP/s, oneDNN's inner product (0 when unavailable)
    bandwidth: float  # bytes/s read, torch.sum
    isa: str

    @property
    def peak(self) -> float:
        return max(self.mm_flops, self.onednn_flops)

    def flops(self, flop_per_s: float) -> str:
        """'41.2 GFLOP/s, 38% of peak'."""
        return f"{flop_per_s / 1e9:.1f} GFLOP/s, {flop_per_s / self.peak:.0%} of peak"

    def bytes(self, bytes_per_s: float) -> str:
        return f"{bytes_per_s / 1e9:.1f} GB/s, {bytes_per_s / self.bandwidth:.0%} of bandwidth"

    def best_with(self, other: "Limits") -> "Limits":
        """The better of two measurements (taken at a run's start and end): a shared machine's
        load only ever lowers them."""
        return Limits(
            self.threads,
            self.n,
            max(self.mm_flops, other.mm_flops),
            max(self.onednn_flops, other.onednn_flops),
            max(self.bandwidth, other.bandwidth),
            self.isa,
        )

    def report(self) -> str:
        onednn = (
            f", oneDNN inner product {self.onednn_flops / 1e9:.1f}" if self.onednn_flops else ""
        )
        return (
            f"machine: {self.isa}\n"
            f"machine limits at {self.threads} threads, measured now: fp32 matmul peak "
            f"{self.peak / 1e9:.1f} GFLOP/s ({self.n}² square, best of a few: torch.mm "
            f"{self.mm_flops / 1e9:.1f}{onednn}); memory bandwidth {self.bandwidth / 1e9:.1f} GB/s "
            f"(torch.sum over 256 MiB)"
        )


def matmul_flops(n: int = 2048, repeats: int = 5):
    """(torch.mm's, oneDNN inner product's) FLOP/s on an n × n float32 product, best of `repeats`;
    oneDNN's 0.0 where torch has no such operator."""
    import torch

    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    with torch.inference_mode():
        mm = 2 * n**3 / _best(lambda: torch.mm(a, b, out=out), repeats)
        if not (
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        ):
            return mm, 0.0
        linear = torch.ops.mkldnn._linear_pointwise
        return mm, 2 * n**3 / _best(lambda: linear(a, b, None, "none", [], ""), repeats)


def read_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Bytes/s that torch.sum reads from a float32 buffer of `mib` MiB, best of `repeats`."""
    import torch

    buffer = torch.ones(mib * 2**20 // 4)
    with torch.inference_mode():
        return buffer.numel() * 4 / _best(buffer.sum, repeats)


def measure(n: int = 2048, repeats: int = 5, buffer_mib: int = 256) -> Limits:
    """The machine's fp32 matmul peak and memory bandwidth, now, at torch's thread count."""
    import torch

    mm, onednn = matmul_flops(n, repeats)
    return Limits(
        torch.get_num_threads(), n, mm, onednn, read_bandwidth(buffer_mib, 2 * repeats), isa_line()
    )


# ---------------------------------------------------------------------------- FLOP and byte counts


def linear_flops(config, tokens: int) -> int:
    """The blocks' four products for `tokens` tokens: 2 · tokens · (C·3C + C·C + C·4C + 4C·C) a
    layer = 24 · C² · n_layer · tokens."""
    C = config.n_embd
    return 2 * tokens * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) * config.n_layer


def attention_flops(config, pairs: int) -> int:
    """QKᵀ and (scores)V for `pairs` (query, key) pairs: each D multiply-adds per head, two
    products, every layer: 2 · 2 · C · n_layer · pairs."""
    return 4 * config.n_embd * config.n_layer * pairs


def head_flops(config, rows: int) -> int:
    """The output head at `rows` positions: 2 · C · vocab each."""
    return 2 * config.n_embd * config.vocab_size * rows


def forward_flops(config, tokens: int, pairs: int, head_rows: int) -> int:
    return (
        linear_flops(config, tokens)
        + attention_flops(config, pairs)
        + head_flops(config, head_rows)
    )


def causal_pairs(length: int) -> int:
    """(query, key) pairs of one causal sequence: 1 + 2 + ... + length."""
    return length * (length + 1) // 2


def causal_forward_flops(config, batch: int, length: int, head=True) -> int:
    """A causal forward of `batch` rows of `length` real tokens, the head at every position."""
    tokens = batch * length
    return forward_flops(config, tokens, batch * causal_pairs(length), tokens if head else 0)


def decode_flops(config, prompt_lengths, new_tokens: int) -> int:
    """Generation with a KV cache, as `gpt.generate` runs it: the prompts' pass (their real tokens,
    causal over each prompt, the head at the last position), then new_tokens − 1 steps of one
    token a row, each attending to its row's real past and itself."""
    B = len(prompt_lengths)
    flops = forward_flops(
        config, sum(prompt_lengths), sum(causal_pairs(p) for p in prompt_lengths), B
    )
    for step in range(1, new_tokens):
        flops += forward_flops(config, B, sum(p + step for p in prompt_lengths), B)
    return flops


def weight_bytes(config, dtype_bytes: int = 4) -> int:
    """Bytes one token's step reads from the weights: every parameter of the blocks and the final
    LayerNorm, and the token table in full (it is the tied head); of the position table one row."""
    C, L = config.n_embd, config.n_layer
    per_layer = 12 * C * C + 13 * C  # c_attn 3C²+3C, c_proj C²+C, c_fc 4C²+4C, c_proj 4C²+C, 2 LNs
    return dtype_bytes * (L * per_layer + 2 * C + config.vocab_size * C + C)


def decode_bytes(config, prompt_length: int, new_tokens: int, dtype_bytes: int = 4) -> int:
    """Bytes read by batch-1 generation: the weights once per pass (the prompt's and each step's),
    plus, at each step after the prompt's, the cached keys and values of every layer (2 · C a
    token a layer) over the past and the new token."""
    kv = sum(
        2 * config.n_embd * config.n_layer * (prompt_length + step) for step in range(1, new_tokens)
    )
    return new_tokens * weight_bytes(config, dtype_bytes) + dtype_bytes * kv


def packed_pair_pairs(P: int, C: int, R: int) -> int:
    """Attention pairs of one packed row prompt + chosen + rejected (`packed_pairs_batch`): the
    prompt causal, each response causal over itself and seeing the whole prompt."""
    return causal_pairs(P) + C * P + causal_pairs(C) + R * P + causal_pairs(R)


def step_flops(
    config,
    tokens: int,
    pairs: int,
    head_rows: int,
    lora_rank: int = 0,
    lora_shapes=(),
    reference_forward: bool = False,
    kl_head_rows: int = 0,
) -> int:
    """One training step's products: forward, backward, and what rides along.

    Full fine-tuning: backward 2× forward, 3× in all. LoRA (`lora_rank` > 0, adapters on the (in,
    out) shapes `lora_shapes` of each layer, the first of them first in a layer): the frozen
    products' backward is their input gradient only (1×; none for layer 0's first adapted product
    and its adapter's A, whose input, the embeddings, needs no gradient), attention's 2×, the
    frozen head's 1×, and the adapters' two products (2 · r · (in + out) a token) 3× in all.
    `reference_forward`: one more forward without gradient (TRL's reference, every step);
    `kl_head_rows`: the token-level KL's reference head (forward only) at that many positions.
    """
    linear, attention = linear_flops(config, tokens), attention_flops(config, pairs)
    head = head_flops(config, head_rows)
    extra = head_flops(config, kl_head_rows)
    if reference_forward:
        extra += linear + attention + head
    if not lora_rank:
        return 3 * (linear + attention + head) + extra
    adapters = 2 * lora_rank * sum(i + o for i, o in lora_shapes) * tokens * config.n_layer
    first_in, first_out = lora_shapes[0]
    # layer 0's first adapted product reads the embeddings, which need no gradient: neither its
    # frozen weight's nor its adapter's A's input gradient is computed
    layer0_input_grad = 2 * first_in * (first_out + lora_rank) * tokens
    return 2 * linear - layer0_input_grad + 3 * attention + 2 * head + 3 * adapters + extra


def fast_step_flops(config, sizes, lora_rank: int = 0, lora_shapes=()) -> int:
    """Chapter 8's fast DPO step on pairs of (prompt, chosen, rejected) lengths: the packed rows
    (the prompt once), the head at the response positions, forward + backward, and the token-level
    KL's reference head on the cached hidden states."""
    response = sum(C + R for _, C, R in sizes)
    return step_flops(
        config,
        sum(P + C + R for P, C, R in sizes),
        sum(packed_pair_pairs(P, C, R) for P, C, R in sizes),
        response,
        lora_rank,
        lora_shapes,
        kl_head_rows=response,
    )


def unpacked_step_flops(config, sizes) -> int:
    """The fast step without prompt reuse: chosen and rejected as separate rows (the prompt
    twice), the head at the response positions, forward + backward, and the KL's reference head."""
    response = sum(C + R for _, C, R in sizes)
    return step_flops(
        config,
        sum(2 * P + C + R for P, C, R in sizes),
        sum(causal_pairs(P + C) + causal_pairs(P + R) for P, C, R in sizes),
        response,
        kl_head_rows=response,
    )


def plain_step_flops(config, sizes, lora_rank: int = 0, lora_shapes=()) -> int:
    """TRL's DPOTrainer and the plain loop: chosen and rejected rows apart (the prompt twice), the
    head at every real position, the policy's forward + backward and the reference's forward (for
    TRL with a PEFT LoRA: the adapter switched off)."""
    tokens = sum(2 * P + C + R for P, C, R in sizes)
    return step_flops(
        config,
        tokens,
        sum(causal_pairs(P + C) + causal_pairs(P + R) for P, C, R in sizes),
        tokens,
        lora_rank,
        lora_shapes,
        reference_forward=True,
    )
