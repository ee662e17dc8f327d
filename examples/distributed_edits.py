"""How do I edit a model trained with DistributedDataParallel so that every rank has the same weights?

Rank 0 computes the edit (only it needs an editor); ``mk.broadcast_edits`` sends its factors (a few
rows per weight, never dense weights) to every rank, and each rank applies them with the same call,
so all ranks end with bit-identical weights and training continues in lockstep. Runs 2 CPU
processes with the gloo backend in seconds on a random-initialised GPT-2 (no download).
"""

import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

import mend_kernels as mk


def train_and_edit(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128))
        ddp_model = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
        text = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(rank))  # per-rank data

        def fine_tuning_step() -> None:
            ddp_model(input_ids=text, labels=text).loss.backward()  # gradients all-reduced by DDP
            optimizer.step()
            optimizer.zero_grad()

        fine_tuning_step()
        edits = None
        if rank == 0:
            editor = mk.MENDEditor.for_model(model, rank=16, edit_lr=0.05)
            ids = torch.randint(0, 128, (1, 8))
            labels = torch.full_like(ids, -100)
            labels[0, -1] = 42
            with torch.no_grad():  # compute_edit runs on the model inside the DDP wrapper
                edits = editor.compute_edit(ddp_model, input_ids=ids, labels=labels)
        received = mk.broadcast_edits(edits)
        mk.apply_edits(ddp_model.module, received, keep_original=False)
        fine_tuning_step()
        weights = {name: p.detach().contiguous() for name, p in model.named_parameters() if name != "lm_head.weight"}
        save_file(weights, str(Path(out_dir) / f"weights{rank}.safetensors"))  # lm_head is tied to wte
        mk.save_edits(received, Path(out_dir) / f"edits{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def main(world_size: int = 2) -> tuple[list[dict[str, torch.Tensor]], list[list[mk.WeightEdit]]]:
    """Each rank's final weights and the edits it applied."""
    out_dir = Path(tempfile.mkdtemp())
    mp.spawn(train_and_edit, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size)
    weights = [load_file(str(out_dir / f"weights{rank}.safetensors")) for rank in range(world_size)]
    edits = [mk.load_edits(out_dir / f"edits{rank}.safetensors") for rank in range(world_size)]
    identical = all(torch.equal(w[name], weights[0][name]) for w in weights for name in w)
    print(f"{world_size} ranks applied {len(edits[0])} weight edits; identical weights after another step: {identical}")
    return weights, edits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
