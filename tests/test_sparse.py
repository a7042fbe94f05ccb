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


def test_topk_trainer_sparse_and_dense_steps_agree():
    from dictcircuits.trainers import SPARSE_MIN_WIDTH_PER_K, TrainerConfig, make_trainer

    k = 4
    cfg = TrainerConfig(arch="topk", width=SPARSE_MIN_WIDTH_PER_K * k, k=k)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    trainer = make_trainer(16, cfg, total_steps=10, batch_tokens=256)
    trainer.init_from(x)
    trainer.since_fired[:5] = 10 ** 9  # a few dead latents, so the AuxK term runs too
    sparse_loss, sparse_hat, sparse_f = trainer.loss(x, 0)
    sparse_grads = torch.autograd.grad(sparse_loss, [trainer.dic.W_enc, trainer.dic.W_dec, trainer.dic.b_dec])
    dense_loss, dense_hat, dense_f = trainer.dense_loss(x, 0)
    dense_grads = torch.autograd.grad(dense_loss, [trainer.dic.W_enc, trainer.dic.W_dec, trainer.dic.b_dec])
    torch.testing.assert_close(sparse_loss, dense_loss)
    torch.testing.assert_close(sparse_f, dense_f.detach())
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
