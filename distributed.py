"""DDP helpers for train.py: process-group setup from torchrun's env vars and a global-batch contrastive loss.

Launch: `torchrun --nproc_per_node 4 train.py ...` (one node) or add `--nnodes 2 --node_rank R
--rdzv_backend c10d --rdzv_endpoint HOST:PORT` (several nodes). Without torchrun everything is a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's env; joins the process group (nccl on CUDA, else gloo)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return rank, world, local_rank


def is_main() -> bool:
    """True on rank 0, and in a plain (non-distributed) run: log, save and evaluate only there."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every process (`flag` itself without torchrun). For decisions every rank must take
    together, such as skipping a step: a rank that skips alone leaves the others waiting in the step's collectives
    until the process group times out."""
    return sum_over_ranks(int(not flag), device) == 0


def sum_over_ranks(n: int, device: torch.device) -> int:
    """n summed over every process (an all_reduce under torchrun; n itself otherwise)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t)
    return int(t.item())


def cleanup(wait: bool = True) -> None:
    """Leave the process group (call at the end of training). With `wait`, every rank waits for the others first:
    a rank that closed its gloo connections while another still used them aborted that one at exit (SIGABRT, 1 run
    in 6). After an error, wait=False: the other ranks may never reach the barrier."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


class _AllGather(torch.autograd.Function):
    """[b, D] equal-size local rows -> [world, b, D] rows of every rank; backward: SUM of every rank's gradient.

    Every rank computes the same global loss L from the gathered tensor, so each rank's backward yields
    dL/d(all rows). Summing those over ranks (all_reduce) and keeping our slice gives world * dL/d(local rows).
    DDP then AVERAGES parameter gradients over ranks: (1/world) * sum_r world * dL/de_r * de_r/dtheta
    = sum_r dL/de_r * de_r/dtheta, exactly the gradient of one process on the global batch. (Returning only our
    own rank's dL/de_r, as with a plain no-grad gather plus re-inserting the local rows, would be 1/world of it.)
    Parameters used after the gather (logit_scale) get dL/dscale on every rank; DDP's average leaves it as is.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)  # [world, b, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks
        return grad[dist.get_rank()]


def _gather_rows(x: torch.Tensor, sizes: list[int], differentiable: bool) -> torch.Tensor:
    """Concatenate every rank's x ([sizes[r], ...]) in rank order; pads to the largest size for the collective."""
    pad = max(sizes) - x.shape[0]
    xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    if differentiable:
        parts = _AllGather.apply(xp)  # [world, max_b, ...]
    else:
        parts = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(parts, xp.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _sizes(x: torch.Tensor) -> list[int]:
    """Rows of x on every rank, in rank order."""
    b = torch.tensor([x.shape[0]], device=x.device)
    sizes_t = [torch.empty_like(b) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes_t, b)
    return [int(s) for s in sizes_t]


def gather_for_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Local [b, D] embeddings and [b] group ids -> the global batch [B, D], [B, D], [B] (rank order).

    Feed the result to loss.clip_loss on every rank: with DDP the parameter gradients then equal those of one
    process on the global batch (see _AllGather). `groups` must mean the same thing on every rank (e.g. the
    label index, or a stable hash of the caption such as int(sha1(caption)[:15], 16) -- never Python's hash(),
    which differs between processes). groups=None means every pair is distinct: ids are made globally unique.
    Ranks may hold different batch sizes (e.g. a short last batch).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return image_emb, text_emb, groups
    sizes = _sizes(image_emb)
    if groups is None:  # distinct pairs: offset local indices by the rows of lower ranks
        groups = torch.arange(image_emb.shape[0], device=image_emb.device) + sum(sizes[:dist.get_rank()])
    all_img = _gather_rows(image_emb, sizes, differentiable=True)   # [B, D]
    all_txt = _gather_rows(text_emb, sizes, differentiable=True)    # [B, D]
    all_groups = _gather_rows(groups, sizes, differentiable=False)  # [B]
    return all_img, all_txt, all_groups


def gather_cached(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """No-grad gather for accum.py: the global [B, D], [B, D], [B] and the row where this rank's rows start."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return image_emb, text_emb, groups, 0
    sizes = _sizes(image_emb)
    return (_gather_rows(image_emb, sizes, False), _gather_rows(text_emb, sizes, False),
            _gather_rows(groups, sizes, False), sum(sizes[:dist.get_rank()]))


def sync_grads(model: torch.nn.Module, average: bool = False) -> None:
    """All-reduce gradients after accum.accumulated_backward under torchrun (it bypasses DDP's hooks).

    contrastive (average=False): every rank's backward passes took the gradient of the same global loss through its
    own rows only, so the SUM over ranks is the full gradient -- except logit_scale, whose gradient every rank took
    whole: averaged. A row-wise loss (average=True, e.g. ce): each rank's loss is the mean over its own rows, so
    everything is averaged, as DDP does.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for _, p in named])         # one collective, not one per tensor
    dist.all_reduce(flat)
    world, i = dist.get_world_size(), 0
    for n, p in named:
        g = flat[i:i + p.numel()].view_as(p.grad)
        p.grad.copy_(g / world if average or n == "logit_scale" else g)
        i += p.numel()
