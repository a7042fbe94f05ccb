"""The sparse TopK kernels compute exactly what the dense TopK SAE computes, gradients included."""
import torch

from dictcircuits.sparse import dense_features, sparse_decode, sparse_topk_encode


def test_sparse_topk_matches_dense_forward_and_backward():
    torch.manual_seed(0)
    B, d, F, k = 64, 16, 96, 5
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(d, F, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(F, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(F, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, d, dtype=torch.float64)
    params = [x, W_enc, b_enc, W_dec]

    pre = torch.relu(x @ W_enc + b_enc)
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    dense_loss = ((f @ W_dec - target) ** 2).sum()
    dense_grads = torch.autograd.grad(dense_loss, params)

    s_vals, s_idx = sparse_topk_encode(x, W_enc, b_enc, k)
    torch.testing.assert_close(dense_features(s_vals, s_idx, F), f)
    sparse_loss = ((sparse_decode(s_vals, s_idx, W_dec) - target) ** 2).sum()
    sparse_grads = torch.autograd.grad(sparse_loss, params)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for g_sparse, g_dense in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(g_sparse, g_dense)
    assert (sparse_grads[1] != 0).any(dim=0).sum() <= B * k  # only selected encoder columns get gradient
