"""The streamed scorer against a plain log-softmax over full logits."""
import pytest
import torch

from dictcircuits import scoring
from dictcircuits.models import Tokens
from dictcircuits.scoring import Scorer
from dictcircuits.toy import TOY_FAMILIES


def _plain(clean, other, ids, valid):
    """(CE, KL(clean ‖ other)) summed over the valid positions, from full logits."""
    lp, lq = clean[:, :-1].log_softmax(-1), other[:, :-1].log_softmax(-1)  # [b, p-1, V]
    ce = -lq.gather(-1, ids[:, 1:, None]).squeeze(-1)[valid].sum()
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - lq), 0).sum(-1)[valid].sum()  # 0·log 0 = 0 at ids both sides mask
    return float(ce), float(kl)


@pytest.mark.parametrize("family", TOY_FAMILIES)
def test_scorer_matches_full_log_softmax(toy_models, family, monkeypatch):
    """Variants scored from hidden states, a vocabulary slice at a time (slices that do not divide the vocabulary,
    padding in the batch, gemma2's softcap), give the CE and KL of a log-softmax over the full logits."""
    monkeypatch.setattr(scoring, "BLOCK", 1)  # the smallest slices: 64 ids
    model = toy_models[family]
    assert model.vocab_size % 64  # so the last slice is a partial one
    toks = model.tokenize(["When Mary and John went to the store, John gave a drink to", "The keys"])
    ids, mask = toks.input_ids, toks.attention_mask
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    edits = [{}, {"resid.0": lambda x: -3 * x}, {"resid.0": torch.zeros_like}]
    with torch.no_grad():
        clean = model.run(toks)
        scorer = Scorer(model, clean, toks)
        rows = Tokens(torch.cat([ids] * 3), torch.cat([mask] * 3))

        def stacked(x):  # x [3b, p, d]: each row group gets its own edit
            parts = x.chunk(3)
            return torch.cat([parts[0], -3 * parts[1], torch.zeros_like(parts[2])])

        hidden = model.run(rows, {"resid.0": stacked}, hidden=True)  # [3b, p, d]
        got = scorer.score(hidden, 3, kl=(0, 1))
        assert got[2][1] is None  # KL only where asked
        for g, edit in enumerate(edits):
            want = _plain(clean, model.run(toks, edit), ids, valid)
            assert got[g][0] == pytest.approx(want[0], rel=1e-5)
            if g in (0, 1):
                assert got[g][1] == pytest.approx(want[1], rel=1e-4, abs=1e-4)  # fp32: Σp·log p − Σp·log q
        assert got[0][1] == pytest.approx(0, abs=1e-4)  # the clean run against itself
        assert abs(got[2][0] - got[0][0]) > 1e-3  # zeroing the stream changes the loss: the rows are told apart
        assert scorer.ce_clean == pytest.approx(_plain(clean, clean, ids, valid)[0], rel=1e-6)
        assert scorer.n == int(valid.sum())


class _Masked:
    """A stand-in model whose unembedding W sets ids below `masked` to −inf, as padded vocabularies do."""

    def __init__(self, W, masked):
        self.W, self.masked = W, masked

    def logits_at(self, h, start, stop):
        z = h @ self.W[start:stop].T  # [..., stop - start]
        z[..., :max(0, self.masked - start)] = -torch.inf
        return z


def test_scorer_with_masked_ids_and_without_next_tokens(monkeypatch):
    """Slices whose logits are all −inf add nothing (no NaN from −inf − −inf, 0·log 0 counts 0), and a batch
    with no next token scores 0 rather than failing."""
    monkeypatch.setattr(scoring, "BLOCK", 1)  # slices of 64 ids: the first two are wholly masked
    g = torch.Generator().manual_seed(0)
    head = _Masked(torch.randn(300, 8, generator=g), 150)
    ids = torch.randint(150, 300, (2, 6), generator=g)
    toks = Tokens(ids, torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))
    valid = (toks.attention_mask[:, 1:] * toks.attention_mask[:, :-1]).bool()
    h_clean, h_other = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    clean = head.logits_at(h_clean, 0, 300)
    scorer = Scorer(head, clean, toks)
    got = scorer.score(torch.cat([h_other, h_clean]), 2, kl=(0, 1))
    want = _plain(clean, head.logits_at(h_other, 0, 300), ids, valid)
    assert got[0][0] == pytest.approx(want[0], rel=1e-5) and got[0][1] == pytest.approx(want[1], rel=1e-4)
    assert got[1][1] == pytest.approx(0, abs=1e-4) and scorer.ce_clean == pytest.approx(got[1][0], rel=1e-5)
    one = Tokens(ids[:, :1], torch.ones(2, 1, dtype=torch.long))
    empty = Scorer(head, head.logits_at(h_clean[:, :1], 0, 300), one)
    assert empty.n == 0 and empty.score(h_other[:, :1], 1) == [(0.0, 0.0)]


def test_scorer_is_float64_accurate_on_a_gemma_sized_vocabulary():
    """Over 262k ids, CE and KL agree with a float64 log-softmax of the same float32 logits to 5e-6 nats a
    position, and the clean probabilities sum to 1 within 2e-6 (a float32 log_softmax misses by up to 6e-5 on
    Gemma-3, and every KL inherits it)."""
    g = torch.Generator().manual_seed(1)
    V, d = 2 ** 18, 16
    head = _Masked(torch.randn(V, d, generator=g), 0)
    ids = torch.randint(0, V, (1, 9), generator=g)
    toks = Tokens(ids, torch.ones_like(ids))
    h = torch.randn(3, 9, d, generator=g)  # logits of std 4: many ids of similar weight, hard for float32 sums
    clean = head.logits_at(h[:1], 0, V)
    scorer = Scorer(head, clean, toks)
    assert (scorer.p_sum - 1).abs().max() < 2e-6
    got = scorer.score(h, 3, kl=(0, 1, 2))
    lp = clean[0, :-1].double().log_softmax(-1)  # [8, V]
    for i in range(3):
        lq = head.logits_at(h[i, :-1], 0, V).double().log_softmax(-1)
        ce = float(-lq.gather(-1, ids[0, 1:, None]).sum())
        kl = float((lp.exp() * (lp - lq)).sum())
        assert got[i][0] == pytest.approx(ce, rel=1e-7, abs=5e-6 * 8)
        assert got[i][1] == pytest.approx(kl, rel=1e-6, abs=5e-6 * 8)
    assert got[1][1] > 1  # the other rows are far from the clean one: the check is not of zeros
