"""Data-parallel training: `torchrun --nproc-per-node 2 -m dictcircuits train ...` on the gloo backend (CPU)."""
import json
import os
import subprocess
import sys

import torch

from dictcircuits.formats import load_dictionaries


def test_two_process_gloo_run(tokenizer, tmp_path):
    from dictcircuits.toy import toy_model

    model = toy_model("gpt2", tokenizer=tokenizer)
    folder = tmp_path / "toy-gpt2"
    model.hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dictcircuits", "train", "--model", str(folder), "--sites", "resid.0,mlp.1", "--arch", "topk",
           "--width", "2x", "--k", "4", "--tokens", "2048", "--batch-size", "128", "--buffer-tokens", "1024",
           "--ctx-len", "32", "--harvest-batch", "8", "--device", "cpu", "--no-progress", "--log-every", "4", "--eval-tokens", "128",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dicts = load_dictionaries(out)
    t = dicts["resid.0"].meta["training"]
    assert t["world_size"] == 2 and t["steps"] == 8 and t["tokens"] == 2048  # 8 steps x 128 tokens x 2 ranks
    assert 0 < t["final"]["fvu"] < 1 and t["heldout"]["tokens"] == 4 * 32  # GPT-2 adds no BOS: 4 full contexts
    steps = [json.loads(ln)["tokens"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["site"] == "mlp.1"]
    assert steps == [1024, 2048]
    # train() checks that both ranks ended with identical dictionaries (it raises otherwise), and only
    # rank 0 printed the summary
    assert proc.stdout.count("end to end") == 1 and proc.stdout.count("saved to") == 1
    assert torch.isfinite(dicts["mlp.1"].W_dec).all()
