"""How do I interleave fine-tuning and edits in a plain PyTorch training loop?

Fine-tune on a language-modelling batch each step and, every few steps, edit the model in place
between two optimizer steps. The edit needs no weight gradient and leaves ``.grad``, the optimizer
state and ``requires_grad`` untouched; the next optimizer step starts from the edited weights.
Runs on CPU in seconds on a random-initialised GPT-2 (no download).
"""

import torch
import transformers

import mend_kernels as mk

VOCAB = 128


def main(steps: int = 6, edit_every: int = 3) -> list[float]:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A fresh editor without normalisation is a plain gradient step on the edited weights; load a
    # meta-trained one (mk.MENDEditor.load) for real edits.
    editor = mk.MENDEditor.for_model(model, rank=16, edit_lr=2.0, normalize=False)
    text = torch.randint(0, VOCAB, (steps, 4, 12), generator=torch.Generator().manual_seed(1))
    gains = []  # log p(target) gained by each edit

    for step in range(steps):
        model.train()
        loss = model(input_ids=text[step], labels=text[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        if (step + 1) % edit_every == 0:  # between two optimizer steps: no gradient in flight
            model.eval()  # edits are computed with dropout off
            ids = torch.randint(0, VOCAB, (1, 8))
            labels = torch.full_like(ids, -100)
            labels[0, -1] = target = step % VOCAB
            before = _log_prob(model, ids, target)
            editor.edit(model, input_ids=ids, labels=labels, keep_original=False)  # no revert: training goes on
            gains.append(_log_prob(model, ids, target) - before)
            print(f"step {step + 1}: fine-tuning loss {loss.item():.3f}, edit gained {gains[-1]:+.3f} log p")
    return gains


def _log_prob(model: torch.nn.Module, ids: torch.Tensor, token: int) -> float:
    with torch.no_grad():
        return model(ids).logits[0, -2].log_softmax(-1)[token].item()


if __name__ == "__main__":
    main()
