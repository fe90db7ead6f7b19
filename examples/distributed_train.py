"""Train a causal LM with ``CGGRModel`` on several processes: DDP, FSDP2 or Accelerate. Launch with torchrun:

    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --engine ddp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --engine fsdp2 --global-selection
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --engine accelerate

Backend: NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available, else gloo on the CPU
(``--backend`` forces one). The model is a tiny random-weight Llama (no download); ``--model NAME`` trains a
Hugging Face checkpoint instead. The data are random-length token sequences right-padded to ``--seq-len`` and
split across the ranks by a ``DistributedSampler``, so every rank gets batches of the same (B, T), which
``--global-selection`` needs.

Where each engine goes:
    DDP:        DDP(CGGRModel(model))                    (the wrapper around the CGGRModel: fused head kept)
    FSDP2:      fully_shard(layer) for each layer, then fully_shard(CGGRModel(model)) as the root
    Accelerate: accelerator.prepare(CGGRModel(model), optimizer, dataloader); the curriculum's step() through
                accelerator.unwrap_model

Rank 0 prints, per optimizer step, the loss averaged over ranks (with ``--global-selection`` that is the mean
loss over every kept token of the global batch) and the sequences trained on; at the end every rank checks
that its weights equal rank 0's (the engines keep the replicas identical).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cggr import CGGRModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("ddp", "fsdp2", "accelerate"), default="ddp")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: nccl when CUDA is available, else gloo")
    p.add_argument("--model", default=None, help="Hugging Face model name or path (default: a tiny random Llama)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.5, help="share of sequences trained on after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--router-layers", type=int, default=1)
    p.add_argument("--selection", choices=("topk", "random"), default="topk")
    p.add_argument("--global-selection", action="store_true",
                   help="choose the hardest sequences of all ranks' batches (default: of each rank's own)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP/FSDP would broadcast them anyway)
    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model).to(device)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len)
    return LlamaForCausalLM(cfg).to(device)


def make_loader(args: argparse.Namespace, vocab: int, rank: int, world: int) -> DataLoader:
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * world * args.grad_accum * args.steps
    ids = torch.randint(0, vocab, (n, args.seq_len), generator=g)
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (n,), generator=g)
    mask = (torch.arange(args.seq_len) < lengths[:, None]).long()  # right padding to one fixed length
    labels = ids.masked_fill(mask == 0, -100)
    sampler = DistributedSampler(TensorDataset(ids), num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(TensorDataset(ids, labels, mask), batch_size=args.batch_size, sampler=sampler, drop_last=True)


def train(args: argparse.Namespace) -> None:
    """Set up the process group (or let Accelerate), train, and check that the replicas agree."""
    use_cuda = args.backend == "nccl" or (args.backend == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    accelerator = None
    if args.engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not use_cuda, gradient_accumulation_steps=args.grad_accum)
        device = accelerator.device
    else:
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model(args, device)
    cggr = CGGRModel(model, num_router_layers=args.router_layers, min_tokens_ratio=args.ratio,
                     warmup_steps=args.warmup_steps, selection=args.selection,
                     global_selection=args.global_selection)
    loader = make_loader(args, model.config.vocab_size, rank, world)
    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(cggr, device_ids=[local_rank] if use_cuda else None)
    elif args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # each decoder layer its own unit, then the CGGRModel as the root
            fully_shard(layer)
        train_model = fully_shard(cggr)
    else:
        train_model = cggr
    optimizer = torch.optim.AdamW(train_model.parameters(), lr=args.lr)
    if accelerator is not None:
        train_model, optimizer = accelerator.prepare(train_model, optimizer)

    batches = iter(loader)
    for step in range(args.steps):
        step_loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            ids, labels, mask = (t.to(device) for t in next(batches))
            if accelerator is not None:
                with accelerator.accumulate(train_model):
                    loss = train_model(ids, labels=labels, attention_mask=mask).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                sync = micro == args.grad_accum - 1
                ctx = train_model.no_sync() if args.engine == "ddp" and not sync else contextlib.nullcontext()
                if args.engine == "fsdp2":
                    train_model.set_requires_gradient_sync(sync)
                with ctx:
                    loss = train_model(ids, labels=labels, attention_mask=mask).loss
                    (loss / args.grad_accum).backward()
            step_loss += loss.detach() / args.grad_accum
        if accelerator is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        cggr.step()  # the curriculum: once per optimizer step (the CGGRModel inside any wrapper)
        dist.all_reduce(step_loss)
        metrics = cggr.get_metrics()
        if rank == 0:
            scope = "of all ranks" if args.global_selection else "per rank"
            print(f"step {step}: loss {float(step_loss) / world:.4f}, trained on {metrics['sequences_selected']} "
                  f"of {metrics['batch_size']} sequences {scope}", flush=True)

    # the replicas must be identical: every rank compares its full weights with rank 0's
    worst = torch.zeros((), device=device)
    for p in cggr.parameters():
        full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        ref = full.clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (full - ref).abs().max().float())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if float(worst) != 0.0 or not torch.isfinite(step_loss):
        raise SystemExit(f"replicas differ after training (max |diff| {float(worst)}) or the loss is not finite")
    if rank == 0:
        print(f"done: {args.engine} on {world} processes ({backend}), replicas identical", flush=True)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))  # every object holding the model wrappers lives and dies in here
    # Free the wrappers (DDP's reducer, Accelerate's references; cycles too) while the group still exists: a
    # reducer destroyed after its process group can hang the process at exit. Then tear the group down together.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
