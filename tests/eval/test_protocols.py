import torch

from ssroute.eval.features import ShardSampler, gather_unique
from ssroute.eval.knn import knn_predict
from ssroute.eval.linear import linear_probe_accuracy


def test_weighted_knn_matches_a_hand_computed_vote():
    # query [1, 0]: neighbours at cos 1.0 (class 0), 0.8 (class 1), 0.6 (class 1)
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # temperature 0.07: exp(1/0.07) > exp(0.8/0.07) + exp(0.6/0.07) -> class 0
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.07).tolist() == [0]
    # temperature 10: weights nearly equal, two votes beat one -> class 1
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=10.0).tolist() == [1]


def test_linear_probe_separates_linearly_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    assert linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:]) > 0.95
    noise_labels = torch.randint(0, 2, (600,), generator=g)
    assert linear_probe_accuracy(x[:400], noise_labels[:400], x[400:], noise_labels[400:]) < 0.65


def test_shards_cover_every_index_and_duplicates_are_dropped():
    shards = [list(ShardSampler(10, r, 4)) for r in range(4)]
    assert sorted(set(i for s in shards for i in s)) == list(range(10))
    index = torch.tensor([i for s in shards for i in s])
    values = index * 2
    (out,) = gather_unique(None, values, index=index, world_size=1)
    assert out.tolist() == [2 * i for i in range(10)]
