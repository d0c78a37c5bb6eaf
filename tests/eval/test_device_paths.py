"""Every branch that picks a device-specific path runs on CPU: faiss on a GPU, bf16 autocast through the MoE layer.

(The grouped-GEMM choice is tested in tests/experts/test_grouped.py.)
"""

from __future__ import annotations

import faiss
import torch

import ssroute.eval.knn as knn_module
import ssroute.kmeans as kmeans_module
from ssroute.eval.knn import knn_accuracy
from ssroute.kmeans import kmeans
from ssroute.moe import build_moe


def test_knn_moves_its_index_to_the_gpus_faiss_sees(monkeypatch) -> None:
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index)  # a CPU index stands in
    torch.manual_seed(0)
    train, labels = torch.randn(40, 8), torch.arange(40) % 4
    on_gpu = knn_accuracy(train, labels, train[:10], labels[:10], k=3)
    assert len(moved) == 1 and isinstance(moved[0], faiss.IndexFlatIP)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert knn_accuracy(train, labels, train[:10], labels[:10], k=3) == on_gpu and len(moved) == 1
    assert knn_module._index(8).__class__ is faiss.IndexFlatIP


def test_kmeans_asks_faiss_for_the_gpu_when_it_sees_one(monkeypatch) -> None:
    asked = []
    real = faiss.Kmeans

    def recording(d, k, **options):
        asked.append(options["gpu"])
        return real(d, k, **{**options, "gpu": False})  # run on the CPU here

    monkeypatch.setattr(kmeans_module.faiss, "Kmeans", recording)
    points = torch.cat([torch.randn(20, 4), torch.randn(20, 4) + 10])
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assign, _ = kmeans(points, 2, niter=5)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    kmeans(points, 2, niter=5, plus_plus=False)
    assert asked == [True, False]
    assert len(set(assign[:20].tolist())) == 1 and assign[0] != assign[-1]


def test_moe_layer_trains_under_bf16_autocast() -> None:
    # trainer.precision=bf16-mixed: the experts compute in bfloat16, the combine keeps their dtype
    torch.manual_seed(0)
    for router in ("token_choice", "expert_choice", "vq"):
        moe = build_moe(dim=16, hidden=32, num_experts=4, router=router)
        x = torch.randn(2, 9, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        assert moe.experts.w_in.grad is not None and moe.experts.w_in.grad.dtype == torch.float32
