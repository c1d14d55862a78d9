"""gather_for_loss + DDP on 2 CPU processes (gloo) gives the loss and gradients of one process on the global batch."""
import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed import gather_for_loss, init_distributed, is_main  # noqa: E402
from loss import clip_loss  # noqa: E402

GROUPS = torch.tensor([0, 1, 2, 0, 1, 3, 2, 0])  # positives across ranks (0 on both), a singleton (3)
CASES = [(4, GROUPS), (3, None), (5, GROUPS)]  # rows on rank 0 (rank 1 gets the rest), group ids


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, t):  # [b, 6], [b, 5] -> [b, 4], [b, 4], scalar
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.logit_scale.exp()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def grads(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    assert init_distributed() == (rank, 2, rank) and is_main() == (rank == 0)
    model = nn.parallel.DistributedDataParallel(Tiny())
    x, t = batch()
    results = []
    for split, groups in CASES:
        lo, hi = (0, split) if rank == 0 else (split, 8)
        model.zero_grad()
        img, txt, scale = model(x[lo:hi], t[lo:hi])
        all_img, all_txt, all_groups = gather_for_loss(img, txt, None if groups is None else groups[lo:hi])
        loss = clip_loss(all_img, all_txt, scale, all_groups)
        loss.backward()
        results.append((loss.detach(), grads(model.module), all_groups))
    torch.save(results, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    x, t = batch()
    for i, (_, groups) in enumerate(CASES):
        ref = Tiny()
        loss = clip_loss(*ref(x, t)[:2], ref.logit_scale.exp(), groups)
        loss.backward()
        for rank in (0, 1):
            d_loss, d_grads, d_groups = torch.load(tmp_path / f"rank{rank}.pt")[i]
            assert torch.allclose(d_loss, loss.detach(), atol=1e-5), (i, rank)
            for name, g in grads(ref).items():
                assert torch.allclose(d_grads[name], g, atol=1e-5), (i, rank, name, d_grads[name], g)
            if groups is None:  # made globally unique
                assert torch.equal(d_groups, torch.arange(8))


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() == (0, 1, 0) and is_main()
    a, b, g = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 0, 1])
    out = gather_for_loss(a, b, g)
    assert out[0] is a and out[1] is b and out[2] is g
