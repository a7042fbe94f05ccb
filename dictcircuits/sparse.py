"""Sparse TopK and BatchTopK kernels for training: with k ≪ F only k rows of the dictionary are touched per token.

A dense TopK step costs about 12·d·F FLOP per token (encoder and decoder, forward and backward). Here the
encoder forward stays dense (2·d·F: every pre-activation is needed to pick the top k), but it runs over row
blocks of the batch whose [rows, F] pre-activations stay in cache (matmul, then top-k, per block), so the whole
[B, F] matrix is never written to memory and read back; only the selected entries are kept. The decoder forward
(embedding_bag), the decoder gradient, the encoder gradient and the input gradient only touch the selected
rows: about 2·d·F + 10·k·d FLOP per token.

The selection is a CSR matrix [B, F] (SparseFeatures): k entries a row for TopK, a varying number for BatchTopK,
whose k·B entries of the whole batch come from per-row candidates (blocked_batch_topk). The backward passes run
as sparse × dense products on it: in feature-major CSR form [F, B] (tokens grouped by feature, found by one sort
of the indices) for the weight gradients, in token-major form for the input gradient, and as a sampled product
(SDDMM) for the gradient of the selected values. No [nnz, d] intermediate is built.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from valid parts (sorted, distinct columns per row; not checked)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _by_token(idx: torch.Tensor, values: torch.Tensor, F_: int) -> torch.Tensor:
    """CSR [B, F] holding values [B, k] at idx [B, k] (idx sorted along each row)."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device)  # [B+1]
    return _csr(crow, idx.reshape(-1), values.reshape(-1), (B, F_))


class _FeatureMajor:
    """The entries of a CSR [B, F] (column indices col [nnz], token of each entry rows [nnz]) grouped by feature:
    a stable sort of the columns, so that a CSR [F, B] (the transposed matrix) can carry any values laid out
    like col."""

    def __init__(self, col: torch.Tensor, rows: torch.Tensor, B: int, F_: int):
        feat, self.perm = _stable_sort(col, F_)  # [nnz] each
        self.crow = torch.zeros(F_ + 1, dtype=torch.long, device=col.device)  # [F+1]
        self.crow[1:] = torch.bincount(feat, minlength=F_).cumsum(0)
        self.tokens = rows[self.perm]  # [nnz] token of each entry, ascending within a feature
        self.size = (F_, B)

    def mm(self, values: torch.Tensor, dense: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over entries of feature f of values · dense[token]: the product Vᵀ dense, values [nnz] (any shape
        laid out like col), dense [B, d] -> [F, d]; added into `out` when given (no fresh [F, d] tensor: on CPU
        a fresh one of 32 MiB or more is a new mapping whose pages fault on first touch, about 10 ms a step at
        F = 16384)."""
        vt = _csr(self.crow, self.tokens, values.reshape(-1)[self.perm], self.size)  # [F, B]
        return torch.sparse.mm(vt, dense) if out is None else torch.addmm(out, vt, dense, out=out)


BLOCK_BYTES = 32 * 2 ** 20  # pre-activations of one row block (2-core EPYC, d = 512, F = 16384: 32 MiB 4 % faster a step than 16)
MIN_BLOCK_ROWS = 256  # fewer rows per block and the matmul re-reads W_enc [d, F] too often


def block_rows(F_: int, itemsize: int = 4) -> int:
    """Rows per block of the encoder: BLOCK_BYTES of [rows, F] pre-activations, at least MIN_BLOCK_ROWS."""
    return max(MIN_BLOCK_ROWS, BLOCK_BYTES // (itemsize * F_))


def blocked_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                 rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of x W_enc + b_enc per row (x [B,d], W_enc [d,F], b_enc [F]) -> (values [B,k], indices [B,k], in
    top-k's order), computed block by block of `rows` rows (default block_rows(F)) into one reused [rows, F]
    buffer. Each row's values come from the same matmul and top-k as the unblocked product, so the result only
    differs by the matmul's summation order."""
    B, F_ = x.shape[0], W_enc.shape[1]
    rows = min(B, rows or block_rows(F_, x.element_size()))
    vals = x.new_empty(B, k)  # [B, k]
    idx = torch.empty(B, k, dtype=torch.long, device=x.device)  # [B, k]
    pre = x.new_empty(rows, F_)  # [rows, F], reused by every block
    for i in range(0, B, rows):
        n = min(rows, B - i)
        block = torch.addmm(b_enc, x[i:i + n], W_enc, out=pre[:n])  # [n, F]
        torch.topk(block, k, dim=-1, sorted=False, out=(vals[i:i + n], idx[i:i + n]))
    return vals, idx


def _stable_sort(keys: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of flat integer keys in [0, bound): (sorted keys, permutation). On CPU the stable sort of
    int32 keys takes about 2 ms for 131k keys whatever their order, where the int64 sorts take 50-400 ms on some
    patterns (many repeats, presorted runs), so keys that fit go through int32."""
    small = keys.to(torch.int32) if bound < 2 ** 31 else keys
    out, perm = small.sort(stable=True)
    return out.to(keys.dtype), perm


def _sort_rows(idx: torch.Tensor, F_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [B,k] sorted along each row, and where each entry came from in idx.reshape(-1): one flat stable sort
    of row·F + index (faster on CPU than a sort along the last dimension)."""
    B, k = idx.shape
    base = torch.arange(0, B * F_, F_, device=idx.device)[:, None]  # [B, 1]
    keys, order = _stable_sort((idx + base).reshape(-1), B * F_)  # [B*k] each
    return keys.view(B, k) - base, order


def _rows_of(crow: torch.Tensor) -> torch.Tensor:
    """The row of each entry of a CSR with row pointers crow [B+1] -> [nnz]."""
    B = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(B, device=crow.device), crow.diff(), output_size=int(crow[-1]))


def topk_select(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, rows: int | None = None
                ) -> "SparseFeatures":
    """The top k of ReLU(x W_enc + bias) in each row (x [B,d], W_enc [d,F], bias [F]) as a CSR with k entries
    a row (zeros where a row has fewer than k positive ones), columns ascending."""
    B, F_ = x.shape[0], W_enc.shape[1]
    vals, idx = blocked_topk(x, W_enc, bias, k, rows)  # [B, k] each
    idx, order = _sort_rows(idx, F_)  # CSR rows need sorted columns
    vals = vals.reshape(-1)[order].clamp_min_(0)
    return SparseFeatures(torch.arange(0, B * k + 1, k, device=x.device), idx.reshape(-1), vals, F_)


CANDIDATES_PER_K = 4  # BatchTopK: per-row candidates kept by the blocked encoder, as a multiple of k


def blocked_batch_topk(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                       rows: int | None = None, candidates: int | None = None) -> "SparseFeatures":
    """The k·B largest entries of ReLU(x W_enc + bias) over the whole batch (BatchTopK), exactly, without the
    [B, F] matrix: the blocked encoder keeps each row's top m candidates (m = CANDIDATES_PER_K·k); τ is the
    (k·B)-th largest candidate. An entry left out of row r is at most r's m-th candidate c_r, so where every
    c_r ≤ max(τ, 0) the candidates hold the selection (up to ties at τ, which any top-k breaks arbitrarily).
    Rows with c_r above that are encoded again in full, which only raises τ, so one such pass is exact.
    Zeros are dropped. -> CSR selection, columns ascending in each row."""
    B, F_ = x.shape[0], W_enc.shape[1]
    n = min(k * B, B * F_)
    m = min(F_, max(k, candidates or CANDIDATES_PER_K * k))  # at least k a row, so that τ exists
    vals, idx = blocked_topk(x, W_enc, bias, m, rows)  # [B, m] each
    vals.clamp_min_(0)
    row = torch.arange(B, device=x.device)[:, None].expand(B, m)  # [B, m]
    tau = vals.reshape(-1).topk(n, sorted=False).values.min()
    redo = (vals.amin(1) > tau.clamp_min(0)).nonzero().squeeze(1) if m < F_ else idx.new_empty(0)  # [r]
    if redo.numel():  # these rows may hold more than their m candidates above τ: take all their entries
        full = torch.relu(torch.addmm(bias, x[redo], W_enc))  # [r, F]
        keep = torch.ones(B, dtype=torch.bool, device=x.device)
        keep[redo] = False
        vals = torch.cat([vals[keep].reshape(-1), full.reshape(-1)])
        idx = torch.cat([idx[keep].reshape(-1), torch.arange(F_, device=x.device).repeat(len(redo))])
        row = torch.cat([row[keep].reshape(-1), redo.repeat_interleave(F_)])
    vals, idx, row = vals.reshape(-1), idx.reshape(-1), row.reshape(-1)
    top_vals, top = vals.topk(n, sorted=False)
    top = top[top_vals > 0]
    keys, order = _stable_sort(row[top] * F_ + idx[top], B * F_)  # by row, then column
    crow = torch.zeros(B + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.bincount(keys // F_, minlength=B).cumsum(0)
    return SparseFeatures(crow, keys % F_, vals[top][order], F_)


class _SparseAutoencoder(torch.autograd.Function):
    """A TopK or BatchTopK autoencoder in one Function: x [B,d] -> x̂ = Σ_j v_j W_dec[i_j] + b_dec [B, d], with
    (v, i) the selected entries of ReLU((x − c) W_enc + b_enc), c = b_dec when centred, else 0: the top k of each
    row, or with batch=True the top k·B of the whole batch. Also returns the selection as CSR parts (row
    pointers, columns, values; not differentiable).

    Forward: the blocked encoder (topk_select / blocked_batch_topk, with the centring folded into the bias),
    then embedding_bag. Backward: the gradient of the selected values by a sampled product, one feature-major
    grouping (one sort) shared by both weight gradients, W_enc's as (x − c)ᵀ G directly (no outer product of
    b_dec with the bias gradient to add), and b_dec's through the encoder as −W_enc ΣG.

    workspace: a dict the caller keeps from call to call (the trainer, whose gradients stay allocated from step to
    step): where W_enc.grad or W_dec.grad exists, this gradient is added into it in place and none is returned for
    it, through a scratch kept in the dict. Other callers leave it None and get plain gradients."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k: int, batch: bool, centre: bool, rows: int | None,
                workspace: dict | None):
        bias = b_enc - b_dec @ W_enc if centre else b_enc  # [F]
        sel = (blocked_batch_topk if batch else topk_select)(x, W_enc, bias, k, rows)
        x_hat = F.embedding_bag(sel.idx, W_dec, sel.crow[:-1], per_sample_weights=sel.vals, mode="sum") + b_dec
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, sel.crow, sel.idx, sel.vals)
        ctx.centre = centre
        ctx.params = (W_enc, W_dec) if workspace is not None else None
        ctx.workspace = workspace
        ctx.mark_non_differentiable(sel.crow, sel.idx, sel.vals)
        return x_hat, sel.crow, sel.idx, sel.vals

    @staticmethod
    def backward(ctx, grad_hat, _grad_crow, _grad_idx, _grad_vals):
        x, W_enc, W_dec, b_dec, crow, col, vals = ctx.saved_tensors
        (B, d), F_ = x.shape, W_dec.shape[0]
        need_x, need_W_enc, need_b_enc, need_W_dec, need_b_dec = ctx.needs_input_grad[:5]
        enc_W, dec_W = ctx.params or (None, None)
        pattern = _csr(crow, col, torch.zeros_like(vals), (B, F_))  # [B, F]
        g = torch.sparse.sampled_addmm(pattern, grad_hat, W_dec.T, beta=0.0).values()  # [nnz]
        g = g * (vals > 0)  # the ReLU's gate: the gradient of the selected pre-activations
        fm = _FeatureMajor(col, _rows_of(crow), B, F_)
        grad_x = grad_W_enc = grad_b_enc = grad_W_dec = grad_b_dec = None
        if need_W_dec:
            if dec_W is not None and dec_W.grad is not None:
                fm.mm(vals, grad_hat, out=dec_W.grad)
            else:
                grad_W_dec = fm.mm(vals, grad_hat)  # [F, d]
        if need_W_enc:
            xc = x - b_dec if ctx.centre else x  # [B, d]
            if enc_W is not None and enc_W.grad is not None:  # via a [F, d] scratch kept in the workspace
                scratch = ctx.workspace.get("W_enc")
                if scratch is None or scratch.shape != (F_, d) or scratch.dtype != g.dtype:
                    scratch = ctx.workspace["W_enc"] = x.new_empty(F_, d)
                enc_W.grad.add_(fm.mm(g, xc, out=scratch.zero_()).T)
            else:
                grad_W_enc = fm.mm(g, xc).T  # [d, F]
        col_sum = None
        if need_b_enc or (need_b_dec and ctx.centre):
            col_sum = torch.zeros(F_, dtype=g.dtype, device=g.device).index_add_(0, col, g)  # [F]
        if need_b_enc:
            grad_b_enc = col_sum
        if need_b_dec:
            grad_b_dec = grad_hat.sum(0) - W_enc @ col_sum if ctx.centre else grad_hat.sum(0)  # [d]
        if need_x:
            grad_x = torch.sparse.mm(_csr(crow, col, g, (B, F_)), W_enc.T)  # [B, d]
        return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """(values [B,k], indices [B,k] ascending along each row, W_dec [F,d]) -> Σ_j values_j W_dec[indices_j]
    [B, d]."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        vals, idx, W_dec = ctx.saved_tensors
        F_ = W_dec.shape[0]
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:  # <grad_out[b], W_dec[idx[b, j]]> at the B·k entries only
            pattern = _by_token(idx, torch.zeros_like(vals), F_)  # [B, F]
            grad_vals = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.T, beta=0.0).values().view_as(vals)
        if ctx.needs_input_grad[2]:
            B, k = idx.shape
            rows = torch.arange(B, device=idx.device).repeat_interleave(k)  # [B*k]
            grad_W = _FeatureMajor(idx.reshape(-1), rows, B, F_).mm(vals, grad_out)  # [F, d]
        return grad_vals, None, grad_W


def sparse_autoencoder(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                       b_dec: torch.Tensor, k: int, batch: bool = False, centre: bool = True, rows: int | None = None,
                       workspace: dict | None = None) -> tuple[torch.Tensor, "SparseFeatures"]:
    """A TopK (batch=False) or BatchTopK (batch=True) autoencoder's (x̂ [B,d], selected features) with a sparse
    backward. x [B,d], W_enc [d,F], b_enc [F], W_dec [F,d], b_dec [d]; centre: encode x − b_dec. The encoder runs
    in blocks of `rows` rows (default block_rows(F); rows >= B: one unblocked product). workspace: see
    _SparseAutoencoder."""
    x_hat, crow, idx, vals = _SparseAutoencoder.apply(x, W_enc, b_enc, W_dec, b_dec, k, batch, centre, rows,
                                                      workspace)
    return x_hat, SparseFeatures(crow, idx, vals, W_enc.shape[1])


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j vals_j W_dec[idx_j] for each row, without materialising the [B, F] feature matrix. idx [B, k] must
    hold distinct indices in ascending order along each row (AuxK's dead latents)."""
    return _SparseDecode.apply(vals, idx, W_dec)


class SparseFeatures(NamedTuple):
    """A [B, F] feature matrix kept as its selected entries, CSR: row pointers crow [B+1], column indices idx
    [nnz] ascending within each row, values vals [nnz] (some may be 0)."""

    crow: torch.Tensor
    idx: torch.Tensor
    vals: torch.Tensor
    F: int

    def to_dense(self) -> torch.Tensor:  # [B, F]
        out = torch.zeros(self.crow.numel() - 1, self.F, dtype=self.vals.dtype, device=self.vals.device)
        out[_rows_of(self.crow), self.idx] = self.vals
        return out
