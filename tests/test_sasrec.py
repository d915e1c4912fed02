import numpy as np
import torch

from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.data.sequences import left_pad, training_windows


def model(**kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=30, hidden=16, n_heads=2, inner=32, max_len=8, **kw)).eval()


def test_shapes_and_scores_agree():
    m = model()
    seqs = left_pad([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8, 9, 10, 11, 12])], 8)
    assert seqs.shape == (2, 8) and seqs[0, :5].tolist() == [0] * 5 and seqs[1].tolist() == list(range(5, 13))
    h = m.encode(seqs)
    assert h.shape == (2, 8, 16)
    u = m.user_embedding(seqs)
    allsc = m.score_all(u)
    assert allsc.shape == (2, 31) and torch.isinf(allsc[:, 0]).all()
    items = torch.tensor([[3, 9], [30, 1]])
    torch.testing.assert_close(m.score_items(u, items), allsc.gather(1, items))


def test_causality():
    """Changing the item at t+1 leaves the outputs at positions <= t unchanged, and changes later ones."""
    m = model()
    a = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, 5] = 20
    ha, hb = m.encode(a), m.encode(b)
    torch.testing.assert_close(ha[:, :5], hb[:, :5])
    assert not torch.allclose(ha[:, 5:], hb[:, 5:])


def test_padding_does_not_change_scores():
    m = model()
    hist = torch.tensor([3, 4, 5])
    short = torch.cat([torch.zeros(2, dtype=torch.long), hist])[None]  # length 5
    long = torch.cat([torch.zeros(5, dtype=torch.long), hist])[None]  # length 8
    torch.testing.assert_close(m.score_all(m.user_embedding(short)), m.score_all(m.user_embedding(long)))


def test_training_windows_cover_every_prefix_once():
    seq = np.arange(1, 24)  # 22 (input, target) pairs
    for stride in (None, 4, 8):
        x, y = training_windows([seq], 8, stride)
        targets = sorted(y[y != 0].tolist())
        assert targets == list(range(2, 24)), stride
        for xi, yi in zip(x, y):  # each target follows its input directly
            for j in np.nonzero(yi)[0]:
                assert yi[j] == xi[j] + 1
    x, y = training_windows([seq], 8, 4)
    # with stride 4 every target sees at least 8 - 4 = 4 items of history (except the sequence start)
    for xi, yi in zip(x, y):
        for j in np.nonzero(yi)[0]:
            assert (xi[: j + 1] != 0).sum() >= min(5, yi[j] - 1)


def test_user_embedding_equals_last_position_of_full_encode():
    m = model()
    seqs = left_pad([np.array([1, 2, 3]), np.arange(4, 16)], 8)
    torch.testing.assert_close(m.user_embedding(seqs), m.encode(seqs)[:, -1])
