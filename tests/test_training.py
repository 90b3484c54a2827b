"""chapters.training: `finetune` runs through chapter 8's loop yet takes exactly the steps of a
plain Adam loop."""

import copy

import pytest
import torch

import gpt
from chapters.training.finetune import finetune, next_token_loss


def plain_adam_loop(model, loss_fn, data, steps, batch_size, lr, generator, checkpoints):
    """What `finetune` promises, written out: draw a minibatch, zero the gradients, backward, Adam
    step."""
    n = len(next(iter(data.values())))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses, saved = [], []
    for step in range(1, steps + 1):
        idx = torch.randint(n, (batch_size,), generator=generator)
        loss = loss_fn(model, {k: v[idx] for k, v in data.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in checkpoints:
            saved.append((step, copy.deepcopy(model.state_dict())))
    model.eval()
    return losses, saved


def masked_loss(model, batch):
    """A second loss over two keys of the batch: next-token loss weighted by a per-row mask."""
    logits = model(batch["ids"][:, :-1])
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none"
    )
    return (per_token.mean(-1) * batch["w"]).sum() / batch["w"].sum()


@pytest.mark.parametrize("loss_fn", [next_token_loss, masked_loss])
def test_finetune_takes_bit_identical_steps_to_a_plain_adam_loop(one_thread, loss_fn):
    g = torch.Generator().manual_seed(3)
    data = {"ids": torch.randint(11, (40, 9), generator=g), "w": torch.rand(40, generator=g) + 0.5}
    torch.manual_seed(0)
    model = gpt.GPT(
        gpt.GPTConfig.tiny(vocab_size=11, n_positions=16, dropout=0.1)
    )  # dropout draws from torch's RNG
    model(
        data["ids"][:2]
    ).sum().backward()  # a gradient left over: neither loop may add it to the first step
    twin = copy.deepcopy(model)
    steps, batch, lr, checkpoints = (
        7,
        6,
        3e-3,
        (2, 7),
    )  # batch 6: the loop's weighted mean of one micro-batch
    torch.manual_seed(1)
    got, got_saved = finetune(
        model,
        loss_fn,
        data,
        steps,
        batch,
        lr,
        torch.Generator().manual_seed(5),
        checkpoints=checkpoints,
        progress=False,
    )
    torch.manual_seed(1)
    want, want_saved = plain_adam_loop(
        twin, loss_fn, data, steps, batch, lr, torch.Generator().manual_seed(5), checkpoints
    )
    assert got == want  # floats compared exactly
    assert [s for s, _ in got_saved] == [s for s, _ in want_saved] == list(checkpoints)
    for (_, a), (_, b) in zip(got_saved, want_saved):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert not model.training
    assert len(set(got)) > 1  # the loss moved: the steps did something


def test_finetune_leaves_the_generator_where_the_plain_loop_does():
    """Chapters draw on after fine-tuning (chapter 6's held-out prompts): the generator must end
    where it did."""
    data = {"ids": torch.randint(5, (10, 4), generator=torch.Generator().manual_seed(0))}
    model = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=5, n_positions=8))
    g, h = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    finetune(model, next_token_loss, data, 3, 4, 1e-3, g, progress=False)
    plain_adam_loop(copy.deepcopy(model), next_token_loss, data, 3, 4, 1e-3, h, ())
    assert torch.equal(g.get_state(), h.get_state())


def test_finetune_refuses_zero_steps():
    model = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=5, n_positions=8))
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        finetune(
            model,
            next_token_loss,
            {"ids": torch.zeros(3, 4, dtype=torch.long)},
            0,
            2,
            1e-3,
            torch.Generator(),
        )
