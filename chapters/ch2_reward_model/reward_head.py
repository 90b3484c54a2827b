"""The GPT-2 reward model r_φ(x, y) and its training on eq. (26): the machinery chapters 2, 7 and 10
train and query.

    pairs = PreferencePairs.from_token_lists(chosen, rejected)  # prompt + y_w, prompt + y_l
    rm = RewardModel(gpt.GPT(config))           # or RewardModel(copy.deepcopy(sft_model))
    train_reward_model(rm, pairs, steps=400)    # AdamW on eq. (26)
    pair_accuracy(rm, pairs)                    # share of pairs with r_φ(y_w) > r_φ(y_l)

The loss itself, eq. (26), is `chapters.ch2_reward_model.reward_model_loss`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import gpt
from chapters.ch2_reward_model.bradley_terry import bt_probability, reward_model_loss
from chapters.common.rows import right_pad
from chapters.training.loop import check_finite, gradient_norm


@dataclass
class PreferencePairs:
    """Comparisons (x, y_w, y_l) as token ids: chosen = prompt + y_w, rejected = prompt + y_l.

    chosen_ids, rejected_ids (N, T) long and chosen_mask, rejected_mask (N, T) (1 = real token, 0 =
    padding), all padded to one length T. Build from token lists with
    `PreferencePairs.from_token_lists`.
    """

    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor

    @classmethod
    def from_token_lists(cls, chosen, rejected, pad_id: int = 0) -> "PreferencePairs":
        """Right-pad lists of token ids (prompt + response) for the chosen and the rejected side to
        one length."""
        if len(chosen) != len(rejected):
            raise ValueError(
                f"{len(chosen)} chosen but {len(rejected)} rejected sequences; give one of each "
                f"per pair"
            )
        length = max(len(s) for s in [*chosen, *rejected])
        return cls(*right_pad(chosen, pad_id, length), *right_pad(rejected, pad_id, length))

    def __len__(self):
        return self.chosen_ids.shape[0]

    def __getitem__(self, index) -> "PreferencePairs":
        return PreferencePairs(
            self.chosen_ids[index],
            self.chosen_mask[index],
            self.rejected_ids[index],
            self.rejected_mask[index],
        )


class RewardModel(nn.Module):
    """Report §3.3: r_φ(x, y), a GPT-2 with a linear layer on top giving one scalar, read at the
    last real token.

        rm = RewardModel(gpt.GPT(config))  # or RewardModel(copy.deepcopy(sft_model)): from π_SFT
        r = rm(input_ids, attention_mask)  # (B, T) ids of prompt + response, mask 1 = real -> (B,)

    Padding may sit on the right (as `PreferencePairs` builds it) or on the left (as `gpt.generate`
    returns); either way the head reads `backbone.hidden_states` at the last position whose mask is
    1. Train it with `train_reward_model`; centre its outputs per prompt with
    `chapters.ch2_reward_model.normalize_rewards`.
    """

    def __init__(self, backbone: gpt.GPT):
        super().__init__()
        self.backbone = backbone
        n_embd = backbone.config.n_embd
        self.head = nn.Linear(n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not attention_mask.bool().any(-1).all():
            raise ValueError(
                "a row of attention_mask has no real token; every sequence needs at least one"
            )
        B, T = input_ids.shape
        hidden = self.backbone.hidden_states(input_ids, attention_mask)  # (B, T, C)
        last = (torch.arange(T, device=input_ids.device) * attention_mask.bool()).argmax(
            -1
        )  # (B,): last real token
        return self.head(hidden[torch.arange(B, device=input_ids.device), last]).squeeze(
            -1
        )  # (B, C) -> (B,)


def pair_rewards(model: RewardModel, pairs: PreferencePairs):
    """(r_φ(x, y_w), r_φ(x, y_l)), each (N,), one forward pass over chosen and rejected."""
    device = next(model.parameters()).device
    ids = torch.cat([pairs.chosen_ids, pairs.rejected_ids]).to(device)  # (2N, T)
    mask = torch.cat([pairs.chosen_mask, pairs.rejected_mask]).to(device)
    return model(ids, mask).chunk(2)


def train_reward_model(
    model: RewardModel,
    pairs: PreferencePairs,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    generator=None,
    progress: bool = True,
):
    """Report eq. (26) minimised by AdamW on minibatches of `pairs`; returns the loss of each step
    (a list).

    Minibatches run through the data in a shuffled order (`generator` seeds it), epoch after epoch.
    Leaves the model in eval mode. A non-finite loss or gradient norm stops it before that step's
    update (`chapters.training.loop.Diverged`, one line).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    order, losses = torch.empty(0, dtype=torch.long), []
    bar = tqdm(range(steps), desc="reward model", disable=not progress, leave=False)
    for step in bar:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(pairs), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        r_w, r_l = pair_rewards(model, pairs[batch])
        loss = reward_model_loss(r_w, r_l)
        opt.zero_grad()
        loss.backward()
        norm = float(gradient_norm(model.parameters()))
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            bar.close()
            where = f"step {step + 1} of {steps}"
            check_finite(
                "the reward model",
                where,
                loss.item(),
                norm,
                f"train_reward_model's lr (now {lr:g})",
            )
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: PreferencePairs) -> float:
    """The fraction of pairs where r_φ(x, y_w) > r_φ(x, y_l)."""
    model.eval()
    r_w, r_l = pair_rewards(model, pairs)
    return (r_w > r_l).double().mean().item()


def count_task_pairs(
    num_pairs: int,
    generator=None,
    vocab_size: int = 16,
    target: int = 7,
    prompt_len: int = 4,
    max_response: int = 8,
):
    """Synthetic comparisons with a known reward: r*(x, y) = the number of `target` tokens in the
    response y.

    Each pair: a random prompt, two responses of random length 2..max_response (a random share of
    them `target`), labelled by eq. (23) on r*. Token 0 is padding and never appears in a sequence.
    Returns (PreferencePairs, r*(x, y_w) (N,), r*(x, y_l) (N,)).
    """
    others = torch.tensor([t for t in range(1, vocab_size) if t != target])

    def response():
        length = int(torch.randint(2, max_response + 1, (), generator=generator))
        rate = torch.rand((), generator=generator) * 0.6  # share of target tokens in this response
        hit = torch.rand(length, generator=generator) < rate
        return torch.where(
            hit, target, others[torch.randint(len(others), (length,), generator=generator)]
        ).tolist()

    chosen, rejected, r_w, r_l = [], [], [], []
    for _ in range(num_pairs):
        prompt = others[torch.randint(len(others), (prompt_len,), generator=generator)].tolist()
        y1, y2 = response(), response()
        r1, r2 = y1.count(target), y2.count(target)
        if torch.rand((), generator=generator, dtype=torch.float64) >= bt_probability(r1, r2):
            (y1, r1), (y2, r2) = (y2, r2), (y1, r1)
        chosen.append(prompt + y1)
        rejected.append(prompt + y2)
        r_w.append(r1)
        r_l.append(r2)
    return PreferencePairs.from_token_lists(chosen, rejected), torch.tensor(r_w), torch.tensor(r_l)
