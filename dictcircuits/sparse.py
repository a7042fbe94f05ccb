"""Sparse TopK kernels for training: with k ≪ F only k rows of the dictionary are touched per token.

A dense TopK step costs about 12·d·F FLOP per token (encoder and decoder, forward and backward). Here the
encoder forward stays dense (2·d·F: every pre-activation is needed to pick the top k), but the decoder forward
(embedding_bag over k rows), the decoder gradient, the encoder gradient and the input gradient only touch the
k selected rows: about 2·d·F + 10·k·d FLOP per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SparseTopKEncode(torch.autograd.Function):
    """(x [B,d], W_enc [d,F], b_enc [F]) -> top-k of ReLU(x W_enc + b_enc): values [B,k], indices [B,k].
    The backward pass computes gradients only at the selected entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k: int):
        pre = torch.addmm(b_enc, x, W_enc)  # [B, F]
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # [B, k]
        vals = vals.clamp_min(0)
        ctx.save_for_backward(x, W_enc, idx, vals)
        ctx.F = W_enc.shape[1]
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, grad_idx):
        x, W_enc, idx, vals = ctx.saved_tensors
        B, k = idx.shape
        g = grad_vals * (vals > 0)  # [B, k]: the ReLU's gate
        flat = idx.reshape(-1)  # [B*k]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            cols = W_enc.index_select(1, flat).T.reshape(B, k, -1)  # [B, k, d]
            grad_x = torch.bmm(g.unsqueeze(1), cols).squeeze(1)  # [B, d]
        if ctx.needs_input_grad[1]:
            contrib = (x.unsqueeze(1) * g.unsqueeze(-1)).reshape(B * k, -1)  # [B*k, d]
            grad_W = torch.zeros(ctx.F, x.shape[1], dtype=x.dtype, device=x.device)  # [F, d]
            grad_W.index_add_(0, flat, contrib)
            grad_W = grad_W.T
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.F, dtype=x.dtype, device=x.device).index_add_(0, flat, g.reshape(-1))
        return grad_x, grad_W, grad_b, None


class _SparseDecode(torch.autograd.Function):
    """(values [B,k], indices [B,k], W_dec [F,d]) -> Σ_j values_j W_dec[indices_j]  [B, d]."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        vals, idx, W_dec = ctx.saved_tensors
        B, k = idx.shape
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            rows = F.embedding(idx, W_dec)  # [B, k, d]
            grad_vals = torch.bmm(rows, grad_out.unsqueeze(-1)).squeeze(-1)  # [B, k]
        if ctx.needs_input_grad[2]:
            contrib = (vals.unsqueeze(-1) * grad_out.unsqueeze(1)).reshape(B * k, -1)  # [B*k, d]
            grad_W = torch.zeros_like(W_dec).index_add_(0, idx.reshape(-1), contrib)
        return grad_vals, None, grad_W


def sparse_topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int):
    """Top-k ReLU features as (values [B,k], indices [B,k]) with a sparse backward."""
    return _SparseTopKEncode.apply(x, W_enc, b_enc, k)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j vals_j W_dec[idx_j] for each row, without materialising the [B, F] feature matrix."""
    return _SparseDecode.apply(vals, idx, W_dec)


def dense_features(vals: torch.Tensor, idx: torch.Tensor, F_: int) -> torch.Tensor:
    """The [B, F] feature matrix from sparse (values, indices), for metrics."""
    return torch.zeros(vals.shape[0], F_, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)
