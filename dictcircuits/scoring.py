"""Next-token cross-entropy and KL(clean ‖ variant) over a batch of contexts, for `evaluate()`.

Per site, evaluate() scores several variants of each context (spliced, zero- and mean-ablated, with and without
the position rule). On a large vocabulary (Gemma-3: 262k) their logits are most of the evaluation's memory
traffic: [rows, pos, vocab] floats written by the unembedding, then read and written again by a log-softmax. So
the variants arrive here as final hidden states and are unembedded one vocabulary slice at a time, keeping per
position only a running log-sum-exp, the target's logit and Σ_v p_v·logit_v: the same numbers up to float32
rounding (closer to float64 than a float32 log-softmax), with no [rows, pos, vocab] tensor (benchmarks/README.md
measures both).
"""
from __future__ import annotations

import torch

from .models import Model, Tokens

BLOCK = 2 ** 21  # floats per [rows, slice] block of logits (8 MB): near the cache, yet matmuls wide enough


class Scorer:
    """CE and KL against one batch's clean run. The clean log-probabilities are computed once, from full
    logits: KL(clean ‖ q) = Σ p·log p − Σ p·(z_q − lse_q), so a variant needs only Σ p·z_q and its log-sum-exp."""

    def __init__(self, model: Model, clean: torch.Tensor, tokens: Tokens):  # clean logits [b, p, V]
        ids, mask = tokens.input_ids.to(clean.device), tokens.attention_mask.to(clean.device)
        self.model = model
        self.valid = (mask[:, 1:] * mask[:, :-1]).bool()  # [b, p-1]: positions with a next token
        self.targets = ids[:, 1:][self.valid]  # [n]
        self.n = int(self.valid.sum())
        z = clean[:, :-1][self.valid].float()  # [n, V]
        top = z.amax(-1, keepdim=True)  # [n, 1]
        # the log-sum-exp from float32 sums of 2048 ids added in float64: a float32 log_softmax over 262k ids errs
        # by up to 6e-5, which the probabilities then carry (their sum is off 1 by as much) into every KL
        e = (z - top).exp()  # [n, V]
        total = torch.stack([e[:, i:i + 2048].sum(-1) for i in range(0, e.shape[1], 2048)], -1)  # [n, V / 2048]
        lse = top + total.double().sum(-1, keepdim=True).log().float()  # [n, 1]
        del e
        lp = z - lse  # [n, V]
        del z
        self.p = lp.exp()  # [n, V]
        self.p_sum = self.p.sum(-1)  # [n]: 1 up to rounding, kept so KL matches Σ p·(log p − log q) exactly
        # Σ p·log p per position (0·log 0 = 0 at masked ids), so that KL is a sum of small per-position differences
        self.neg_entropy = (self.p * lp).nan_to_num_(nan=0.0, neginf=-torch.inf).sum(-1)  # [n]
        self.ce_clean = float(-lp.gather(-1, self.targets[:, None]).sum())

    def score(self, hidden: torch.Tensor, groups: int, kl: tuple[int, ...] = (0,)) -> list[tuple[float, float | None]]:
        """hidden [groups*b, p, d]: final hidden states of `groups` variants of the batch, stacked along rows.
        Returns per variant (summed CE, summed KL(clean ‖ variant)) over the real positions; KL only for the
        variants in `kl` (None elsewhere)."""
        b, d = self.valid.shape[0], hidden.shape[-1]
        h = hidden[:, :-1].reshape(groups, b, -1, d)[:, self.valid].reshape(-1, d)  # [groups*n, d]
        rows = h.shape[0]
        if rows == 0:  # no position has a next token
            return [(0.0, 0.0 if g in kl else None) for g in range(groups)]
        target = self.targets.repeat(groups)  # [groups*n]
        # running sums over the slices (about 100 on Gemma-3) in float64, so that adding them rounds nothing more
        top = torch.full((rows,), -torch.inf, device=h.device)  # running max of the logits
        total = torch.zeros(rows, dtype=torch.float64, device=h.device)  # running Σ exp(z − top)
        z_target = torch.zeros(rows, device=h.device)
        pz = torch.zeros(len(kl), self.n, dtype=torch.float64, device=h.device)  # Σ_v p_v z_v, the KL variants
        kl_rows = torch.tensor(kl, dtype=torch.long, device=h.device)
        vocab = self.p.shape[1]
        chunk = max(64, BLOCK // rows)  # vocabulary ids per slice: 2752 on Gemma-3 (762 rows), 172 on dc-mini
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            z = self.model.logits_at(h, start, stop).float()  # [groups*n, C]
            new_top = torch.maximum(top, z.amax(-1)).clamp(min=torch.finfo(z.dtype).min)  # finite: -inf logits add 0
            total = total * (top - new_top).double().exp() + (z - new_top[:, None]).exp().sum(-1)
            top = new_top
            hit = (target >= start) & (target < stop)
            z_target[hit] = z[hit, target[hit] - start]
            if len(kl):
                pz += (z.view(groups, self.n, -1)[kl_rows] * self.p[:, start:stop]).nan_to_num_(
                    nan=0.0, posinf=torch.inf, neginf=-torch.inf).sum(-1)  # 0·(−inf) = 0 where p and q mask an id
        lse = (top + total.log()).view(groups, self.n)  # [groups, n], float64
        ce = (lse - z_target.view(groups, self.n)).sum(-1)  # [groups]
        out: list[tuple[float, float | None]] = [(float(c), None) for c in ce]
        for j, g in enumerate(kl):
            out[g] = (out[g][0], float((self.neg_entropy - pz[j] + lse[g] * self.p_sum).sum()))
        return out
