"""How do I edit a model inside a transformers Trainer run?

``MENDEditCallback`` applies queued edits between optimizer steps (in ``on_step_end``), logs their
factors, and re-applies or drops the edits a checkpoint reload undoes. Runs on CPU in seconds on a
random-initialised GPT-2 (no download); the Trainer needs ``accelerate`` (``pip install mend-kernels[hf]``).
"""

import tempfile

import torch
import transformers

import mend_kernels as mk
from mend_kernels.integrations.transformers import MENDEditCallback


class RandomText(torch.utils.data.Dataset):
    """Fine-tuning data: random token sequences (a language-modelling batch)."""

    def __init__(self, n: int, length: int = 12, vocab: int = 128):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main(output_dir: str | None = None) -> MENDEditCallback:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128))
    editor = mk.MENDEditor.for_model(model, rank=16, edit_lr=0.05)
    ids = torch.randint(0, 128, (1, 8))
    labels = torch.full_like(ids, -100)
    labels[0, -1] = 42

    callback = MENDEditCallback(on_reload="reapply")
    # Computed when due, from the weights as they are after optimizer step 2 (dropout off).
    callback.queue(lambda m: editor.compute_edit(m, input_ids=ids, labels=labels), at_step=2)

    args = transformers.TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=2,
        learning_rate=1e-3, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )
    transformers.Trainer(model=model, args=args, train_dataset=RandomText(8), callbacks=[callback]).train()
    print("edits applied at steps", [entry.step for entry in callback.applied])
    return callback


if __name__ == "__main__":
    main()
