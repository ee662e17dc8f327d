"""Quick start: edit a small GPT-2 in place with MEND, check the edit, and revert it.

The editor here is freshly initialised (the identity on normalised gradients), so the edit is a
normalised gradient step on the weights MEND edits; a meta-trained editor makes far better edits.
Runs on CPU in seconds, with no download: the model is random-initialised from a config.
"""

import torch
import transformers

import mend_kernels as mk

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256)).eval()

# One edit request: a prompt of 8 tokens whose next token should become 42.
input_ids = torch.randint(0, 256, (1, 9))
input_ids[0, -1] = 42
labels = torch.full_like(input_ids, -100)
labels[0, -1] = 42


def target_log_prob() -> float:
    with torch.no_grad():
        return model(input_ids).logits[0, -2].log_softmax(-1)[42].item()


editor = mk.MENDEditor.for_model(model, rank=64, edit_lr=0.05)  # last 3 MLP blocks, 2 shape groups
print("edited weights:", [t.name for t in editor.targets])
before_weights = {n: p.clone() for n, p in model.named_parameters()}
before = target_log_prob()
handle = editor.edit(model, input_ids=input_ids, labels=labels)  # in place, rank-k update
after = target_log_prob()
print(f"log p(target): before {before:.3f}, after edit {after:.3f}")
handle.revert()  # bit-exact restore
restored = all(torch.equal(p, before_weights[n]) for n, p in model.named_parameters())
print(f"after revert {target_log_prob():.3f}; weights restored exactly: {restored}")
