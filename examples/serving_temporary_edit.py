"""How do I apply an edit temporarily while serving, e.g. for one request or one tenant?

Edits are saved as their factors (``handle.save`` / ``mk.save_edits``: a few rows per weight) and
applied for the duration of a ``with`` block; on exit the model is restored, also on an exception.
Runs on CPU in seconds on a random-initialised GPT-2 (no download).
"""

import tempfile
from pathlib import Path

import torch
import transformers

import mend_kernels as mk


def main() -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128)).eval()
    editor = mk.MENDEditor.for_model(model, rank=16, edit_lr=0.05)
    ids = torch.randint(0, 128, (1, 8))
    labels = torch.full_like(ids, -100)
    labels[0, -1] = 42  # the last token should become 42

    # Offline: compute the edit once and keep its factors on disk.
    path = Path(tempfile.mkdtemp()) / "edit.safetensors"
    with torch.no_grad():
        mk.save_edits(editor.compute_edit(model, input_ids=ids, labels=labels), path)

    # Serving: load the factors and apply them only where they are wanted.
    edits = mk.load_edits(path)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(ids).logits[0, -2].log_softmax(-1)[42].item()
        # In place: full-speed forwards; the weights are restored bit for bit on exit.
        with mk.temporarily_edited(model, edits, mode="inplace"):
            edited = model(ids).logits[0, -2].log_softmax(-1)[42].item()
        # Low-rank side path: no weight is written, so other threads keep reading the plain model.
        with mk.temporarily_edited(model, edits, mode="lowrank"):
            side_path = model(ids).logits[0, -2].log_softmax(-1)[42].item()
    print(f"log p(42): plain {plain:.3f}, edited in place {edited:.3f}, edited as a side path {side_path:.3f}")
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert abs(edited - side_path) < 1e-4


if __name__ == "__main__":
    main()
