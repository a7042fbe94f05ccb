"""The sparse TopK kernels compute exactly what the dense TopK SAE computes, gradients included."""
import torch

from dictcircuits.sparse import SparseFeatures, sparse_decode, sparse_topk_encode


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
    torch.testing.assert_close(SparseFeatures(s_vals, s_idx, F).to_dense(), f)
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
    torch.testing.assert_close(sparse_f.to_dense(), dense_f.detach())
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sparse_topk_float32_gradients_and_metrics():
    """float32 at a wider shape: every gradient within 1e-5 relative of the dense path; the step metrics from
    (values, indices) equal those of the dense feature matrix."""
    from dictcircuits.trainers import Trainer

    g = torch.Generator().manual_seed(2)
    B, d, F, k = 512, 64, 2048, 16
    x = torch.randn(B, d, generator=g)
    x[:8] = 0.0  # these tokens have fewer than k positive pre-activations (b_enc is mostly negative)
    x.requires_grad_()
    W_enc = (torch.randn(d, F, generator=g) / d ** 0.5).requires_grad_()
    b_enc = (torch.randn(F, generator=g) * 0.1 - 0.3).requires_grad_()
    W_dec = torch.randn(F, d, generator=g).requires_grad_()
    target = torch.randn(B, d, generator=g)
    params = [x, W_enc, b_enc, W_dec]

    s_vals, s_idx = sparse_topk_encode(x, W_enc, b_enc, k)
    assert (s_idx[:, 1:] > s_idx[:, :-1]).all()  # ascending along each row
    f = torch.relu(x @ W_enc + b_enc)
    f = torch.zeros_like(f).scatter(-1, s_idx, f.gather(-1, s_idx))  # the same top k, densely
    dense_grads = torch.autograd.grad(((f @ W_dec - target) ** 2).sum(), params)
    sparse_grads = torch.autograd.grad(((sparse_decode(s_vals, s_idx, W_dec) - target) ** 2).sum(), params)
    for g_sparse, g_dense in zip(sparse_grads, dense_grads):
        assert float((g_sparse - g_dense).norm() / g_dense.norm()) < 1e-5

    sf = SparseFeatures(s_vals.detach(), s_idx, F)
    assert (sf.vals == 0).any()  # zero entries count neither as nonzero nor as firing
    fired, nonzero = Trainer.firing(sf)
    fired_dense, nonzero_dense = Trainer.firing(sf.to_dense())
    assert torch.equal(fired, fired_dense) and int(nonzero) == int(nonzero_dense)


def _dense_topk_reference(x, W_enc, b_enc, k):
    """The whole [B, F] pre-activation, then top-k: (values, indices) with indices ascending along each row."""
    vals, idx = (x @ W_enc + b_enc).topk(k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    return vals.gather(1, order).clamp_min(0), idx


def test_blocked_topk_equals_unblocked_with_ties_and_k_near_F():
    """Integer-valued inputs make every product exact whatever the block, with many tied pre-activations: the
    blocked encoder picks the same values and indices as the dense top-k, for k up to F and any block size."""
    from dictcircuits.sparse import blocked_topk

    g = torch.Generator().manual_seed(3)
    B, d, F = 50, 4, 24  # pre-activations in [-5, 5]: at most 11 distinct values among 24 per row
    x = torch.randint(-1, 2, (B, d), generator=g).float()
    W_enc = torch.randint(-1, 2, (d, F), generator=g).float()
    b_enc = torch.randint(-1, 2, (F,), generator=g).float()
    pre = x @ W_enc + b_enc
    assert all(len(row.unique()) < F // 2 for row in pre)  # plenty of ties in every row
    for k in (1, 5, F - 1, F):
        ref_vals, ref_idx = pre.topk(k, dim=-1, sorted=False)
        for rows in (1, 7, B, 4 * B):
            vals, idx = blocked_topk(x, W_enc, b_enc, k, rows)
            assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals), (k, rows)
            s_vals, s_idx = sparse_topk_encode(x, W_enc, b_enc, k, rows)
            d_vals, d_idx = _dense_topk_reference(x, W_enc, b_enc, k)
            assert torch.equal(s_idx, d_idx) and torch.equal(s_vals, d_vals), (k, rows)


def test_blocked_sparse_step_gradients_match_dense():
    """float32: values, indices and every gradient of the blocked encoder (odd block sizes, a last short block)
    agree with the unblocked one and with dense autograd through the whole [B, F] matrix."""
    g = torch.Generator().manual_seed(4)
    B, d, F, k = 300, 32, 1024, 16
    x = torch.randn(B, d, generator=g).requires_grad_()
    W_enc = (torch.randn(d, F, generator=g) / d ** 0.5).requires_grad_()
    b_enc = (torch.randn(F, generator=g) * 0.1).requires_grad_()
    W_dec = torch.randn(F, d, generator=g).requires_grad_()
    target = torch.randn(B, d, generator=g)
    params = [x, W_enc, b_enc, W_dec]

    pre = torch.relu(x @ W_enc + b_enc)
    d_vals, d_idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, d_idx, d_vals)
    dense_grads = torch.autograd.grad(((f @ W_dec - target) ** 2).sum(), params)
    for rows in (B, 64, 37, 1):
        vals, idx = sparse_topk_encode(x, W_enc, b_enc, k, rows)
        torch.testing.assert_close(SparseFeatures(vals, idx, F).to_dense(), f.detach())
        grads = torch.autograd.grad(((sparse_decode(vals, idx, W_dec) - target) ** 2).sum(), params)
        for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec"), grads, dense_grads):
            assert float((a - b).norm() / b.norm()) < 1e-5, (rows, name)


def test_block_rows_keeps_a_block_in_cache_budget():
    from dictcircuits.sparse import BLOCK_BYTES, MIN_BLOCK_ROWS, block_rows

    for F in (1024, 16384, 20480, 2 ** 20):
        rows = block_rows(F)
        assert rows >= MIN_BLOCK_ROWS
        assert rows == MIN_BLOCK_ROWS or rows * F * 4 <= BLOCK_BYTES


def test_topk_init_scale_gives_low_early_fvu_on_known_sparse_features():
    """Superposition data with 512 known sparse directions (d = 64): after init_from, the first four steps of
    TopK and BatchTopK reconstruct most of the variance (with the encoder at the decoder's unit scale they
    started at FVU 0.87 and 2.4), and the scaling keeps which latents are selected."""
    from dictcircuits.synthetic import Superposition
    from dictcircuits.trainers import TrainerConfig, make_trainer

    sp = Superposition.make(64, 512, avg_active=8, seed=0)
    x, _ = sp.sample(512 * 4, seed=1)  # [2048, 64]
    x = x * (64 / x.pow(2).sum(-1).mean()).sqrt()  # the trainers' units: E‖x‖² = d
    for arch, limit in (("topk", 0.35), ("batchtopk", 0.5)):
        trainer = make_trainer(64, TrainerConfig(arch=arch, width=1024, k=8, decay_start=1.0), total_steps=4,
                               batch_tokens=512)
        w_before = trainer.dic.W_enc.detach().clone()
        trainer.init_from(x[:512])
        c = trainer.dic.W_enc.detach() / w_before
        assert 0.1 < float(c.mean()) < 0.9 and torch.allclose(c, c.mean())  # one positive factor below 1
        fvu = [float(trainer.step(x[i * 512:(i + 1) * 512], i)[2]) for i in range(4)]
        assert max(fvu) < limit, (arch, fvu)
