"""How do I capture (u, delta) in my own loss, turn them into an edit, and train the editor my way?

Runs on CPU in seconds on a random-initialised GPT-2 (no download). The editor is fresh (the identity
on normalised rows); load a meta-trained one with ``mk.MENDEditor.load(path, model)``.
"""

import torch
import torch.nn.functional as F
import transformers

import mend_kernels as mk


def main() -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128))
    model.eval().requires_grad_(False)  # the base model stays frozen; only the editor trains
    editor = mk.MENDEditor.for_model(model, rank=16, edit_lr=0.05)  # last MLP blocks (GPT-2 preset)

    ids = torch.randint(0, 128, (2, 8))
    wanted = torch.tensor([7, 9])  # the next token each sequence should predict

    def my_loss(logits: torch.Tensor) -> torch.Tensor:  # any differentiable loss of the outputs
        return F.cross_entropy(logits[:, -1], wanted)

    # 1. Capture: no weight gradient is formed; backward stops at the lowest captured layer.
    with mk.capture_rows(model, editor.targets) as capture:
        loss_before = my_loss(model(ids).logits)
        loss_before.backward()
    rows = capture.all_rows()  # {weight name: (u (n, in), delta (n, out))}, float32

    # 2. The editor is a plain nn.Module: captured rows -> WeightEdit factors.
    edits = editor(rows)
    handle = mk.apply_edits(model, edits)  # in place, rank-k, no dense update
    with torch.no_grad():
        loss_after = my_loss(model(ids).logits)
    handle.revert()  # bit-exact
    print(f"my loss: before {loss_before.item():.3f}, after the edit {loss_after.item():.3f}")
    assert all(p.grad is None for p in model.parameters())

    # 3. Train the editor with any objective and optimizer: the edit runs as a low-rank side path,
    #    so gradients reach the editor through the factors and step sizes.
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-3)
    with mk.temporarily_edited(model, editor(rows)):  # mode="lowrank": no weight changes
        post_edit_loss = my_loss(model(ids).logits)
    post_edit_loss.backward()
    optimizer.step()
    print(f"post-edit loss {post_edit_loss.item():.3f}; editor step sizes {editor.edit_lrs.tolist()}")


if __name__ == "__main__":
    main()
