"""Bad input to the intervention / attribution / splice / compare / baseline APIs gets one DictCircuitsError before
any computation; the CLI turns every failure into one `error:` line and an exit status (1 bug, 2 bad input,
130 interrupted), --debug shows the traceback, --version and --help work."""
import errno
import json
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dictcircuits
from dictcircuits import DictCircuitsError, cli
from dictcircuits.circuit.node_effects import metric_grads, node_effects, run_capture
from dictcircuits.archs.identity import identity
from dictcircuits.archs.linear import ica, nmf, pca, random_directions
from dictcircuits.baselines import fit_baseline, train_baselines
from dictcircuits.compare import Comparison, activation_correlation, compare, max_cosine
from dictcircuits.dictionary import save_dictionary
from dictcircuits.intervene import ablate, compare_bases, fit_pca, greedy_patch, patch, steer
from dictcircuits.models import Tokens, pad
from dictcircuits.splice import splice
from dictcircuits.tasks import Task, load_task
from dictcircuits.trace import trace
from dictcircuits.toy import random_dictionaries, random_dictionary

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "Then, Alice and Bob went to the garden. Bob gave a ring to"]
CORRUPT = ["When Alice and Bob went to the store, Mary gave a drink to",
           "Then, Mary and John went to the garden. Alice gave a ring to"]


@pytest.fixture(scope="module")
def s(model):
    """The toy GPT-2 (d=32, 64 positions), a two-prompt task batch and random dictionaries (F=64) at every site."""
    batch = Task("toy-ioi", CLEAN, CORRUPT, [" Mary", " Alice"], [" John", " Bob"]).tokenize(model)
    dicts = random_dictionaries(model, "all", arch="relu", expansion=2)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(model=model, batch=batch, dicts=dicts, tokens=batch.clean, x=x,
                           narrow={"resid.0": random_dictionary("relu", 16, 32)},
                           vocab=model.hf.get_input_embeddings().num_embeddings)


def _ids(s, **changes):
    """The clean prompts with some ids changed ({(row, pos): id})."""
    ids = s.tokens.input_ids.clone()
    for (r, p), v in changes.get("at", {}).items():
        ids[r, p] = v
    return Tokens(ids, s.tokens.attention_mask)


def _nan_dictionary():
    dic = random_dictionary("relu", 32, 64)
    with torch.no_grad():
        dic.W_dec[3, 1] = float("nan")
    return dic


# (id, call, what the one error line must say)
API_CASES = [
    # node_effects: counts, methods, nodes, dictionaries, batches
    ("effects-steps-0", lambda s: node_effects(s.model, s.dicts, s.batch, steps=0), r"steps=0 is out of range"),
    ("effects-steps-negative", lambda s: node_effects(s.model, s.dicts, s.batch, steps=-3), r"steps=-3 .*>= 1"),
    ("effects-steps-float", lambda s: node_effects(s.model, s.dicts, s.batch, steps=2.5), r"steps=2.5 is not an int"),
    ("effects-batch-size-negative", lambda s: node_effects(s.model, s.dicts, s.batch, batch_size=-2),
     r"batch_size=-2 is out of range"),
    ("effects-batch-size-0", lambda s: node_effects(s.model, s.dicts, s.batch, batch_size=0), r"batch_size=0"),
    ("effects-max-nodes-0", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact", max_nodes=0),
     r"max_nodes=0"),
    ("effects-method", lambda s: node_effects(s.model, s.dicts, s.batch, method="fast"), r"unknown method 'fast'"),
    ("effects-nodes-without-exact", lambda s: node_effects(s.model, s.dicts, s.batch, method="ig",
                                                           nodes={"resid.0": [(0, 1)]}), r"only applies to .*exact"),
    ("effects-node-float-feature", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact",
                                                          nodes={"resid.0": [(0, 1.5)]}), r"1.5 is not an integer"),
    ("effects-node-feature-out-of-range", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact",
                                                                 nodes={"resid.0": [(0, 64)]}), r"=64 is out of range"),
    ("effects-node-position-out-of-range", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact",
                                                                  nodes={"resid.0": [(999, 1)]}),
     r"999 is out of range"),
    ("effects-node-unknown-site", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact",
                                                         nodes={"mlp.7": [(0, 1)]}), r"mlp.7 with no dictionary"),
    ("effects-node-not-a-pair", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact",
                                                       nodes={"resid.0": [3]}), r"give \(position, feature\)"),
    ("effects-nodes-empty", lambda s: node_effects(s.model, s.dicts, s.batch, method="exact", nodes={}),
     r"names no node"),
    ("effects-no-dictionaries", lambda s: node_effects(s.model, {}, s.batch), r"no dictionaries given"),
    ("effects-wrong-width", lambda s: node_effects(s.model, s.narrow, s.batch), r"reads d=16 but resid.0 .* 32 wide"),
    ("effects-site-missing-layer", lambda s: node_effects(s.model, {"resid.9": s.dicts["resid.0"]}, s.batch),
     r"'resid.9' does not exist"),
    ("effects-site-bad-name", lambda s: node_effects(s.model, {"block3": s.dicts["resid.0"]}, s.batch),
     r"bad site name 'block3'"),
    ("effects-not-a-dictionary", lambda s: node_effects(s.model, {"resid.0": "sae.pt"}, s.batch), r"not a Dictionary"),
    ("effects-clean-equals-corrupt", lambda s: node_effects(s.model, s.dicts, replace(s.batch, corrupt=s.batch.clean)),
     r"clean and corrupt prompts are identical"),
    ("batch-negative-answer-id", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, answer_ids=torch.tensor([-1, 5]))), r"answer_ids: token id -1 is outside"),
    ("batch-answer-out-of-vocab", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, wrong_ids=torch.tensor([5, 10 ** 6]))), r"wrong_ids: token id 1000000 is outside"),
    ("batch-answer-ids-a-list", lambda s: node_effects(s.model, s.dicts, replace(s.batch, answer_ids=[5, 6])),
     r"answer_ids must be an integer tensor"),
    ("batch-answer-ids-float", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, answer_ids=torch.tensor([5.0, 6.0]))), r"answer_ids must be an integer tensor"),
    ("batch-answer-set-not-a-mask", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, answer_sets=[[5, 6], [7]])), r"answer_sets must be a bool mask"),
    ("batch-answer-set-empty", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, answer_sets=torch.zeros(2, s.vocab, dtype=torch.bool),
        wrong_sets=torch.ones(2, s.vocab, dtype=torch.bool))), r"prompt 0 has an empty set"),
    ("batch-answer-equals-wrong", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, wrong_ids=s.batch.answer_ids.clone())), r"prompt 0: the answer and the wrong answer are the same"),
    ("batch-negative-token-id", lambda s: node_effects(s.model, s.dicts, replace(
        s.batch, clean=_ids(s, at={(1, 2): -4}))), r"clean prompts: token id -4 is outside the vocabulary"),
    ("batch-token-out-of-vocab", lambda s: patch(s.model, s.dicts, replace(
        s.batch, corrupt=_ids(s, at={(0, 0): 10 ** 6})), features={"resid.0": "all"}),
     r"corrupt prompts: token id 1000000 is outside"),
    ("batch-not-a-batch", lambda s: patch(s.model, s.dicts, s.tokens, features={"resid.0": "all"}),
     r"patch needs a TaskBatch"),
    ("batch-unknown-metric", lambda s: metric_grads(s.model, replace(s.batch, metric_name="accuracy"), ["resid.0"]),
     r"unknown metric 'accuracy'"),
    ("batch-width-mismatch", lambda s: node_effects(s.model, s.dicts, replace(s.batch, corrupt=s.batch.corrupt[:, :5])),
     r"pairs must match"),
    # patch: positions, feature choices, sites
    ("patch-position-999", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": "all"}, positions=[999]),
     r"position=999 is out of range; give a whole number in -\d+\.\.\d+"),
    ("patch-position-negative-beyond", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": [1]},
                                                       positions=[-100]), r"position=-100 is out of range"),
    ("patch-positions-empty", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": "all"}, positions=[]),
     r"positions=\[\] selects nothing"),
    ("patch-position-float", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": "all"}, positions=[2.0]),
     r"position=2.0 is not an integer"),
    ("patch-positions-string", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": "all"}, positions="3"),
     r"give a list of positions"),
    ("patch-float-feature", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": [1.5]}),
     r"feature index=1.5 is not an integer"),
    ("patch-float-feature-tensor", lambda s: patch(s.model, s.dicts, s.batch,
                                                   features={"resid.0": torch.tensor([1.0])}),
     r"torch.float32 tensor"),
    ("patch-bool-feature", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": [True]}),
     r"feature index=True is not an integer"),
    ("patch-feature-out-of-range", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": [64]}),
     r"feature index=64 is out of range; give a whole number in 0\.\.63"),
    ("patch-feature-negative", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": [-1]}),
     r"feature index=-1 is out of range"),
    ("patch-feature-scalar", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": 5}),
     r"5 is not a feature choice"),
    ("patch-feature-word", lambda s: patch(s.model, s.dicts, s.batch, features={"resid.0": "most"}),
     r"'most' is not a feature choice"),
    ("patch-mask-shape", lambda s: patch(s.model, s.dicts, s.batch,
                                         features={"resid.0": torch.ones(3, dtype=torch.bool)}),
     r"mask of shape \(3,\)"),
    ("patch-errors-string", lambda s: patch(s.model, s.dicts, s.batch, errors="resid.0"), r"give a list of site names"),
    ("patch-unknown-site", lambda s: patch(s.model, s.dicts, s.batch, features={"mlp.9": "all"}),
     r"no dictionary for site\(s\) mlp.9"),
    ("patch-into", lambda s: patch(s.model, s.dicts, s.batch, into="sideways"), r"into='sideways'"),
    ("patch-features-list", lambda s: patch(s.model, s.dicts, s.batch, features=["resid.0"]),
     r"give \{site: 'all'"),
    # ablate
    ("ablate-how", lambda s: ablate(s.model, s.dicts, s.batch, sites=["resid.0"], how="median"), r"ablate with one of"),
    ("ablate-nothing", lambda s: ablate(s.model, s.dicts, s.batch), r"nothing to ablate"),
    ("ablate-reference-with-zero", lambda s: ablate(s.model, s.dicts, s.batch, sites=["resid.0"], reference=s.tokens),
     r"reference= is only used by mean and resample"),
    ("ablate-text-not-tokens", lambda s: ablate(s.model, s.dicts, ["some text"], sites=["resid.0"]),
     r"data is a list, not Tokens"),
    ("ablate-seed-float", lambda s: ablate(s.model, s.dicts, s.batch, sites=["resid.0"], how="resample", seed=0.5),
     r"seed=0.5 is not an integer"),
    ("ablate-empty-prompt", lambda s: ablate(s.model, s.dicts, s.model.tokenize(["", "a drink"]), sites=["resid.0"]),
     r"prompt 0 is empty"),
    ("ablate-sites-string", lambda s: ablate(s.model, s.dicts, s.batch, sites="resid.0"), r"give a list of site names"),
    # steer
    ("steer-value-word", lambda s: steer(s.model, s.dicts, s.batch, {"resid.0": {3: "big"}}),
     r"steering value for feature 3 at resid.0='big' is not a number"),
    ("steer-value-nan", lambda s: steer(s.model, s.dicts, s.batch, {"resid.0": {3: float("nan")}}),
     r"=nan is not finite"),
    ("steer-value-inf", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {3: math.inf}}), r"=inf is not finite"),
    ("steer-value-none", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {3: None}}), r"None is not a number"),
    ("steer-feature-float", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {2.0: 1.0}}),
     r"steered feature at resid.0=2.0 is not an integer"),
    ("steer-feature-out-of-range", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {64: 1.0}}),
     r"=64 is out of range"),
    ("steer-nothing", lambda s: steer(s.model, s.dicts, s.tokens, {}), r"at least one feature"),
    ("steer-site-empty", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {}}), r"at least one entry"),
    ("steer-values-list", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": [3]}),
     r"give \{feature index: value\}"),
    ("steer-position", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {3: 1.0}}, positions=[64]),
     r"position=64 is out of range"),
    ("steer-unknown-site", lambda s: steer(s.model, s.dicts, s.tokens, {"mlp.7": {0: 1.0}}), r"no dictionary for site"),
    # splice and run_capture: tokens the model cannot run
    ("splice-too-long", lambda s: splice(s.model, pad([[5] * 65], s.model.pad_id), s.dicts),
     r"65 tokens long but toy-gpt2 reads at most 64 positions"),
    ("splice-empty-batch", lambda s: splice(s.model, Tokens(torch.zeros(0, 3, dtype=torch.long),
                                                            torch.zeros(0, 3, dtype=torch.long)), s.dicts),
     r"hold no prompts"),
    ("splice-left-padded", lambda s: splice(s.model, Tokens(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]])),
                                            s.dicts), r"1s then 0s \(right padding\)"),
    ("splice-float-ids", lambda s: splice(s.model, Tokens(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.long)),
                                          s.dicts),
     r"input_ids must be integer"),
    ("splice-edit-not-callable", lambda s: splice(s.model, s.tokens, s.dicts, edit="zero"),
     r"edit='zero' is not callable"),
    ("splice-dicts-a-list", lambda s: splice(s.model, s.tokens, [s.dicts["resid.0"]]), r"dictionaries is a list"),
    ("splice-keep-error-word", lambda s: splice(s.model, s.tokens, s.dicts, keep_error="no"), r"keep_error='no'"),
    ("splice-stop-after-number", lambda s: splice(s.model, s.tokens, s.dicts, stop_after=1), r"stop_after=1"),
    ("steer-add-word", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {3: 1.0}}, add="yes"), r"add='yes'"),
    ("capture-negative-id", lambda s: run_capture(s.model, Tokens(torch.tensor([[3, -1]]),
                                                                  torch.ones(1, 2, dtype=torch.long)),
                                                  ["resid.0"]), r"token id -1 is outside the vocabulary"),
    # greedy search
    ("greedy-target-0", lambda s: greedy_patch(s.model, s.dicts["resid.0"], "resid.0", s.batch, target=0),
     r"target=0 is out of range; give a finite number > 0"),
    ("greedy-target-nan", lambda s: greedy_patch(s.model, s.dicts["resid.0"], "resid.0", s.batch, target=float("nan")),
     r"target=nan is not finite"),
    ("greedy-max-steps-0", lambda s: greedy_patch(s.model, s.dicts["resid.0"], "resid.0", s.batch, max_steps=0),
     r"max_steps=0"),
    ("greedy-pool-negative", lambda s: greedy_patch(s.model, s.dicts["resid.0"], "resid.0", s.batch, pool=-1),
     r"pool=-1"),
    ("greedy-wrong-width", lambda s: greedy_patch(s.model, s.narrow["resid.0"], "resid.0", s.batch), r"reads d=16"),
    ("bases-unknown-site", lambda s: compare_bases(s.model, s.dicts["resid.0"], "resid.5", s.batch), r"does not exist"),
    ("pca-one-dim", lambda s: fit_pca(torch.randn(10)), r"activations \[n, d\]"),
    ("pca-k-0", lambda s: fit_pca(s.x, k=0), r"k=0 is out of range"),
    # compare
    ("compare-not-a-dictionary", lambda s: compare("a/", s.dicts["resid.0"]), r"a is a str, not a Dictionary"),
    ("compare-nan-weights", lambda s: compare(s.dicts["resid.0"], _nan_dictionary()),
     r"dictionary b has NaN or Inf"),
    ("compare-model-without-tokens", lambda s: compare(s.dicts["resid.0"], s.dicts["resid.1"], s.model),
     r"needs both a model and tokens"),
    ("compare-model-b-alone", lambda s: compare(s.dicts["resid.0"], s.dicts["resid.1"], model_b=s.model),
     r"model_b only produces"),
    ("compare-batch-size-0", lambda s: compare(s.dicts["resid.0"], s.dicts["resid.1"], s.model, s.tokens,
                                               site="resid.1", batch_size=0), r"batch_size=0"),
    ("compare-width-vs-model", lambda s: compare(s.narrow["resid.0"], s.narrow["resid.0"], s.model, s.tokens,
                                                 site="resid.0"), r"reads d=16 but resid.0"),
    ("compare-correlation-rows", lambda s: activation_correlation(torch.rand(5, 3), torch.rand(4, 3)),
     r"same n >= 2 tokens"),
    ("compare-cosine-empty", lambda s: max_cosine(torch.zeros(0, 4), torch.rand(3, 4)), r"non-empty \[F, d\]"),
    ("compare-one-token", lambda s: compare(s.dicts["resid.0"], s.dicts["resid.1"], s.model,
                                            pad([[5]], s.model.pad_id), site="resid.1"), r"at least 2 tokens"),
    # baselines
    ("baseline-F-0", lambda s: pca(s.x, 0), r"F \(number of directions\)=0 is out of range"),
    ("baseline-F-float", lambda s: random_directions(s.x, 2.5), r"=2.5 is not an integer"),
    ("baseline-pca-too-wide", lambda s: pca(s.x, 9), r"at most d=8 directions"),
    ("baseline-nan", lambda s: ica(torch.full((5, 3), float("nan"))), r"NaN or Inf"),
    ("baseline-one-row", lambda s: pca(s.x[:1]), r"n >= 2"),
    ("baseline-ica-iters-0", lambda s: ica(s.x, 4, iters=0), r"iters=0"),
    ("baseline-ica-tol-nan", lambda s: ica(s.x, 4, tol=float("nan")), r"tol=nan is not finite"),
    ("baseline-nmf-no-F", lambda s: nmf(s.x.abs(), None), r"NMF needs the number of directions"),
    ("baseline-identity-width", lambda s: identity(s.x, 4), r"exactly d=8 directions"),
    ("baseline-seed-word", lambda s: fit_baseline("random", s.x, 4, seed="x"), r"seed='x' is not an integer"),
    ("baseline-kind", lambda s: fit_baseline("svd", s.x), r"unknown baseline 'svd'"),
    ("baseline-train-identity-width", lambda s: train_baselines(s.model, ["resid.0"], "identity", "unused", 100,
                                                                "unused-out", {}, width=16), r"drop --width"),
    # models: tokenize, edits, site names
    ("tokenize-none", lambda s: s.model.tokenize(None), r"tokenize takes a non-empty list of strings, got NoneType"),
    ("tokenize-ids", lambda s: s.model.tokenize([1, 2, 3]),
     r"tokenize takes a non-empty list of strings, got list '\[1, 2, 3\]'"),
    ("tokenize-empty-list", lambda s: s.model.tokenize([]), r"non-empty list of strings, got list '\[\]'"),
    ("tokenize-one-string", lambda s: s.model.tokenize("When Mary"), r"got one string: pass e.g. \['The cat sat'\]"),
    ("run-edit-wrong-shape", lambda s: s.model.run(s.tokens, edits={"resid.0": lambda x: x[:, :1]}),
     r"the edit at resid.0 returned \(2, 1, 32\), not a tensor of the activation's shape \(2, \d+, 32\)"),
    ("run-edit-not-a-tensor", lambda s: s.model.run(s.tokens, edits={"mlp.1": lambda x: 3}),
     r"the edit at mlp.1 returned int"),
    ("site-leading-zero", lambda s: s.model.resolve_sites("resid.01"), r"without leading zeros \(resid.1\)"),
    ("steer-overflow", lambda s: steer(s.model, s.dicts, s.tokens, {"resid.0": {3: 1e30}}),
     r"steering with values up to 1e\+30 overflows the model .*use smaller"),
    # trace and load_task: arguments refused before anything is loaded
    ("trace-model-a-number", lambda s: trace("ioi", model=3.14), r"model 3.14 is not a model"),
    ("trace-model-empty", lambda s: trace("ioi", model=""), r"model '' is not a model"),
    ("trace-sites-numbers", lambda s: trace("ioi", model=s.model, dictionaries=s.dicts, sites=[1]),
     r"sites=\[1\]: give site names as a string"),
    ("trace-n-huge", lambda s: trace("ioi", model=s.model, n=10 ** 7), r"n=10000000 .* at most 3125"),
    ("trace-refine-huge", lambda s: trace("ioi", model=s.model, refine=1e308), r"refine=1e\+308 is out of range"),
    ("trace-device-meta", lambda s: trace("ioi", device="meta"), r"device meta holds no values"),
    ("trace-task-a-number", lambda s: trace(7, model=s.model), r"task 7: give a built-in task name"),
    ("load-task-n-huge", lambda s: load_task("ioi", n=10 ** 8), r"n=100000000: .* at most 100000 prompts"),
    ("load-task-seed-string", lambda s: load_task("ioi", n=3, seed="abc"), r"seed='abc' is not an integer"),
    ("load-task-seed-float", lambda s: load_task("ioi", n=3, seed=1.5), r"seed=1.5 is not an integer"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_api_input(s, call, match):
    with pytest.raises(DictCircuitsError, match=match) as info:
        call(s)
    assert "\n" not in str(info.value)  # one line


def test_api_cases_are_many_and_distinct():
    assert len(API_CASES) >= 25 and len({c[0] for c in API_CASES}) == len(API_CASES)


def test_valid_calls_still_run(s):
    """The checks refuse only what is wrong: the nearest valid calls go through."""
    res = patch(s.model, s.dicts, s.batch, features={"resid.0": torch.tensor([1, 2])}, positions=[-1, 3])
    assert res.metric.shape == (2,)
    steered = steer(s.model, s.dicts, s.tokens, {"resid.0": {3: torch.tensor(2.0), 4: 1}}, positions=[2])
    assert torch.all(steered.states["resid.0"].f[:, 2, 3] == 2.0)
    eff = node_effects(s.model, s.dicts, s.batch, method="exact", nodes={"resid.0": [(3, 1), (3, None)]})
    assert torch.isfinite(eff.features["resid.0"][3, 1]) and torch.isnan(eff.features["resid.0"][3, 2])
    assert identity(s.x).F == 8 and pca(s.x, 8).F == 8


# --- the CLI ---------------------------------------------------------------------------------------------------
def _one_error_line(capsys) -> tuple[str, str]:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return out, lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two saved dictionaries of one site (d=32) and one of another width."""
    root = tmp_path_factory.mktemp("dicts")
    for name, d, seed in (("a", 32, 0), ("b", 32, 1), ("narrow", 16, 2)):
        dic = random_dictionary("relu", d, 64, seed=seed)
        dic.meta["site"] = "resid.1"
        save_dictionary(dic, root / name / "resid.1")
    return root


CLI_CASES = [
    ("missing-path", lambda r: ["compare", str(r / "nowhere"), str(r / "b")], r"nowhere does not exist"),
    ("dataset-without-model", lambda r: ["compare", str(r / "a"), str(r / "b"), "--dataset", "sotu"],
     r"--dataset only apply to activation correlation, which needs --model"),
    ("model-b-without-model", lambda r: ["compare", str(r / "a"), str(r / "b"), "--model-b", "dc-mini"],
     r"--model-b only apply"),
    ("ctx-len-0", lambda r: ["compare", str(r / "a"), str(r / "b"), "--model", "not-loaded", "--ctx-len", "0"],
     r"--ctx-len=0 is out of range"),
    ("tokens-word", lambda r: ["compare", str(r / "a"), str(r / "b"), "--model", "not-loaded", "--tokens", "many"],
     r"cannot read --tokens 'many' as a count"),
    ("bad-site", lambda r: ["compare", str(r / "a"), str(r / "b"), "--site", "layer3"], r"bad site name 'layer3'"),
    ("different-widths", lambda r: ["compare", str(r / "a" / "resid.1"), str(r / "narrow" / "resid.1")],
     r"different widths"),
    ("no-common-site", lambda r: ["compare", str(r / "a"), str(r / "b"), "--site", "mlp.0"], r"share no site mlp.0"),
]


@pytest.mark.parametrize("argv,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(saved, capsys, argv, match):
    before = _snapshot(saved)
    assert cli.main(argv(saved)) == 2
    out, line = _one_error_line(capsys)
    assert out == "" and re.search(match, line), line
    assert _snapshot(saved) == before  # nothing written, changed or removed


def test_compare_json_has_no_nan(saved, capsys, monkeypatch):
    """--json writes null for numbers that cannot be computed (never a bare NaN)."""
    assert cli.main(["compare", str(saved / "a"), str(saved / "b"), "--json"]) == 0
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))  # noqa: E731
    real = strict(capsys.readouterr().out)["resid.1"]
    assert real["act_corr_ab"] is None and 0 < real["mmcs_ab"] < 1 and real["simpson_a"] > 1
    broken = Comparison(F_a=2, F_b=2, mmcs_ab=float("nan"), mmcs_ba=0.5, frac_ab_09=0.0, hist_ab=[0], hist_ba=[0],
                        simpson_a=None, simpson_b=float("inf"), mcs_ab=[float("nan"), 0.5])
    monkeypatch.setattr("dictcircuits.compare.compare", lambda *a, **k: broken)
    assert cli.main(["compare", str(saved / "a"), str(saved / "b"), "--json"]) == 0
    got = strict(capsys.readouterr().out)["resid.1"]
    assert got["mmcs_ab"] is None and got["simpson_a"] is None and got["simpson_b"] is None
    assert got["mcs_ab"] == [None, 0.5] and got["mmcs_ba"] == 0.5
    assert cli.main(["compare", str(saved / "a"), str(saved / "b")]) == 0
    assert "Simpson A n/a" in capsys.readouterr().out


def test_constant_features_have_no_correlation():
    g = torch.Generator().manual_seed(3)
    fa = torch.cat([torch.rand(40, 2, generator=g), torch.zeros(40, 1)], 1)  # feature 2 of A never fires
    fb = torch.cat([fa[:, :1] * 3, torch.full((40, 1), 2.0)], 1)  # B: a copy of A's feature 0, and a constant
    ab, ba = activation_correlation(fa, fb)
    assert ab[0] == pytest.approx(1.0, abs=1e-5) and ab[1].abs() < 0.6 and torch.isnan(ab[2])
    assert ba[0] == pytest.approx(1.0, abs=1e-5) and torch.isnan(ba[1])
    dead = activation_correlation(torch.zeros(10, 2), torch.rand(10, 3, generator=g))
    assert torch.isnan(dead[0]).all() and torch.isnan(dead[1]).all()  # nothing on A's side varies


def test_dead_dictionary_has_null_correlation(s):
    dead = random_dictionary("relu", 32, 16, seed=4)
    with torch.no_grad():
        dead.b_enc.fill_(-1e4)  # no feature ever fires
    r = compare(dead, s.dicts["resid.1"], s.model, s.tokens, site="resid.1")
    assert r.act_corr_ab is None and r.act_corr_ba is None and r.tokens > 0
    live = compare(s.dicts["resid.1"], s.dicts["resid.1"], s.model, s.tokens, site="resid.1")
    assert live.act_corr_ab == pytest.approx(1.0, abs=1e-4)


def test_zero_direction_has_no_simpson():
    dic = random_dictionary("relu", 8, 4)
    with torch.no_grad():
        dic.W_dec.zero_()
    r = compare(dic, dic)
    assert r.simpson_a is None and r.simpson_b is None and r.mmcs_ab == 0.0


def _raiser(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc,code,match", [
    (RuntimeError("boom\nsecond line"), 1,
     r"^error: internal error \(RuntimeError: boom\); this is a bug in dictcircuits: please report it with the "
     r"command you ran, rerun with --debug to see the traceback$"),
    (KeyError("resid.3"), 1, r"internal error \(KeyError: 'resid.3'\)"),
    (ValueError(""), 1, r"internal error \(ValueError: no message\)"),
    (DictCircuitsError("the thing was wrong;\nfix it"), 2, r"^error: the thing was wrong; fix it$"),
    (KeyboardInterrupt(), 130, r"^error: interrupted \(Ctrl-C\)$"),
    (MemoryError(), 2, r"^error: out of memory .*smaller batch size"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"), 2, r"out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/resid.0/ae.safetensors"), 2,
     r"^error: /data/out/resid.0/ae.safetensors: No space left on device; free some disk space"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, r"^error: /root/x: Permission denied; check"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, r"while reading or writing files: No space left"),
    (OSError(errno.ECONNRESET, "Connection reset by peer"), 1, r"internal error \(ConnectionResetError"),
], ids=["runtime", "keyerror", "empty-message", "dc-error-multiline", "ctrl-c", "memory", "cpu-oom", "enospc-path",
        "eacces", "enospc-no-path", "other-oserror"])
def test_every_failure_is_one_line(saved, capsys, monkeypatch, exc, code, match):
    """The real `compare` run (dictionaries loaded) fails in its computation: one line, no partial output, the
    inputs untouched."""
    before = _snapshot(saved)
    monkeypatch.setattr("dictcircuits.compare.compare", _raiser(exc))
    assert cli.main(["compare", str(saved / "a"), str(saved / "b")]) == code
    out, line = _one_error_line(capsys)
    assert out == "" and re.search(match, line), line
    assert _snapshot(saved) == before


def _snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def test_disk_full_names_the_output_folder():
    message, code = cli.describe(OSError(errno.ENOSPC, "No space left on device"), "dash/")
    assert code == 2 and message.startswith("while writing dash/: No space left on device")


def test_broken_pipe_is_quiet(capsys):
    assert cli.describe(BrokenPipeError(errno.EPIPE, "Broken pipe")) == (None, 1)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(saved, capsys, monkeypatch, where):
    monkeypatch.setattr("dictcircuits.compare.run", _raiser(RuntimeError("boom")))
    argv = ["compare", str(saved / "a"), str(saved / "b")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise exc' in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (RuntimeError: boom)")


def test_debug_also_traces_bad_input(saved, capsys):
    assert cli.main(["--debug", "compare", str(saved / "nowhere"), str(saved / "b")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_no_traceback_without_debug(saved, capsys, monkeypatch):
    monkeypatch.setattr("dictcircuits.compare.run", _raiser(RuntimeError("boom")))
    cli.main(["compare", str(saved / "a"), str(saved / "b")])
    assert "Traceback" not in capsys.readouterr().err


def test_missing_module_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("dictcircuits.ghost_module", "not shipped"))
    assert cli.main(["ghost"]) == 2
    _, line = _one_error_line(capsys)
    assert "not available in this build" in line


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dictcircuits {dictcircuits.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(cli.DESCRIPTION.split()) in text and cli.DESCRIPTION.endswith(".")
    assert all(name in text for name in cli.COMMANDS) and "exit status: 0 success" in text


@pytest.mark.parametrize("argv", [["compare"], ["frobnicate"], ["compare", "a", "b", "--tokens"], []],
                         ids=["missing-args", "unknown-command", "option-without-value", "no-command"])
def test_usage_errors_exit_2_with_one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dictcircuits") and "error:" in line]
    assert err.startswith("usage: dictcircuits") and len(errors) == 1 and "Traceback" not in err


# --- every command, run as a user would (the embedded dc-mini): one line, exit 2, nothing written -----------------
PACKAGE = Path(dictcircuits.__file__).parent
DC_MINI, SHIPPED = PACKAGE / "default" / "dc-mini", str(PACKAGE / "default" / "dictionaries" / "dc-mini")
NOISE = re.compile(r"\d+%\||\x1b\[[0-9;]*[A-Za-z]")  # progress bars and their cursor moves


def _model_copy(t, tokenizer=True, **config):
    """dc-mini saved into t/model, without its tokenizer files or with config.json changed."""
    folder = t / "model"
    folder.mkdir()
    for f in DC_MINI.iterdir():
        if tokenizer or not f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return str(folder)


def _gguf(t, cut):
    """A small GGUF written by the gguf package, the last `cut` bytes cut off."""
    gguf = pytest.importorskip("gguf")
    path = t / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.ones(64, 16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:-cut])
    return str(path)


def _special(kind):
    """A --task path that is not a regular file."""
    def make(t):
        path = t / "task.jsonl"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        elif kind == "loop":
            path.symlink_to(path)
        else:
            path.symlink_to(t / "nowhere.jsonl")
        return str(path)
    return make


def _trace(*extra):
    return lambda t: ["trace", "--task", "ioi", "--out", "o", *extra]


COMMAND_CASES = [
    # trace
    ("trace-empty-circuit", _trace("--n", "2", "--steps", "1", "--sites", "resid.1", "--node-threshold", "1e30"),
     r"the circuit is empty: no node scores node_threshold=1e\+30 or more; lower node_threshold"),
    ("trace-refine-huge", _trace("--refine", "1e308"), r"refine=1e\+308 is out of range; give a finite number >= 0 "
                                                       r"and <= 1"),
    ("trace-device-meta", _trace("--device", "meta"), r"--device meta holds no values"),
    ("trace-device-tpu", _trace("--device", "tpu"), r"--device 'tpu' is not a device"),
    *([("trace-device-cuda-on-cpu-torch", _trace("--device", "cuda"), r"--device cuda: CUDA is not available here")]
      if not torch.cuda.is_available() else []),
    ("trace-n-huge", _trace("--n", "100000000"), r"n=100000000 is more prompts .* at most 3125"),
    ("trace-out-empty", lambda t: ["trace", "--task", "ioi", "--out", ""], r"--out is empty"),
    ("trace-model-empty", _trace("--model", ""), r"model '' is not a model"),
    ("trace-task-fifo", lambda t: ["trace", "--task", _special("fifo")(t), "--out", "o"],
     r"task .*task.jsonl is a named pipe \(FIFO\), not a task file"),
    ("trace-task-folder", lambda t: ["trace", "--task", _special("folder")(t), "--out", "o"],
     r"task .*task.jsonl is a folder, not a task file"),
    ("trace-task-link-loop", lambda t: ["trace", "--task", _special("loop")(t), "--out", "o"],
     r"the symbolic link loops back on itself"),
    ("trace-task-broken-link", lambda t: ["trace", "--task", _special("broken")(t), "--out", "o"],
     r"a link to .*nowhere.jsonl, which does not exist"),
    ("trace-sites-leading-zero", _trace("--sites", "resid.01"), r"without leading zeros \(resid.1\)"),
    ("trace-model-without-tokenizer", lambda t: _trace("--model", _model_copy(t, tokenizer=False))(t),
     r"model has no tokenizer .*tokenizer.save_pretrained"),
    ("trace-config-more-layers", lambda t: _trace("--model", _model_copy(t, n_layer=5))(t),
     r"its config says 5 layers but its weights hold 3"),
    ("trace-config-fewer-layers", lambda t: _trace("--model", _model_copy(t, n_layer=2))(t),
     r"its config says 2 layers but its weights hold 3"),
    ("trace-truncated-gguf", lambda t: _trace("--model", _gguf(t, 100))(t),
     r"tiny.gguf is truncated or corrupt: its tensors need \d+ bytes but the file has \d+; download it again"),
    ("trace-gguf-header-cut", lambda t: _trace("--model", _gguf(t, 4000))(t),
     r"tiny.gguf is truncated or corrupt"),
    ("trace-steps-huge", _trace("--steps", "100000000"), r"steps=100000000 is out of range; give a whole number "
                                                         r"in 1\.\.1000"),
    ("trace-mean-tokens-huge", lambda t: ["trace", "--prompt", "The cat", "--mean-tokens", "1000000000000", "--out",
                                          "o"], r"mean_tokens=1000000000000 is out of range; .* in 1\.\.1000000"),
    ("trace-contexts-fifo", lambda t: _trace("--contexts", _special("fifo")(t))(t),
     r"--contexts .*task.jsonl is not a file"),
    ("trace-contexts-folder", lambda t: _trace("--contexts", _special("folder")(t))(t), r"is not a file"),
    # eval, compare, features
    ("eval-sites-leading-zero", lambda t: ["eval", "--sites", "mlp.02"], r"without leading zeros \(mlp.2\)"),
    ("compare-site-leading-zero", lambda t: ["compare", SHIPPED, SHIPPED, "--site", "attn.00"],
     r"without leading zeros \(attn.0\)"),
    ("features-sites-leading-zero", lambda t: ["features", "--out", "o", "--dictionaries", SHIPPED, "--sites",
                                               "resid.01"], r"without leading zeros \(resid.1\)"),
    ("features-top-beyond-memory", lambda t: ["features", "--out", "o", "--top", "1000000000", "--tokens", "1k"],
     r"--top 1000000000 .* features needs .* more than the .*: lower --top"),
    ("eval-tokens-1e30", lambda t: ["eval", "--tokens", "1e30"], r"--tokens '1e30' is more than .*\(at most 1000G\)"),
    ("eval-tokens-beyond-memory", lambda t: ["eval", "--tokens", "900G"],
     r"--tokens 900G .* needs .* TB, more than the .* of memory"),
    ("eval-model-empty", lambda t: ["eval", "--model", ""], r"--model is empty"),
    ("eval-device-meta", lambda t: ["eval", "--device", "meta"], r"--device meta holds no values"),
    ("eval-dictionaries-empty-folder", lambda t: (t / "empty").mkdir() or ["eval", "--dictionaries", "empty"],
     r"--dictionaries empty holds no dictionaries"),
    ("compare-tokens-1e30", lambda t: ["compare", SHIPPED, SHIPPED, "--model", "dc-mini", "--tokens", "1e30"],
     r"--tokens '1e30' is more than"),
    ("compare-tokens-beyond-memory", lambda t: ["compare", SHIPPED, SHIPPED, "--model", "dc-mini", "--tokens", "500G"],
     r"activation correlation on --tokens 500000000000 .* more than the"),
    ("compare-fifo", lambda t: ["compare", _special("fifo")(t), SHIPPED], r"task.jsonl is neither a file nor a folder"),
    ("compare-model-empty", lambda t: ["compare", SHIPPED, SHIPPED, "--model", ""], r"--model is empty"),
    ("features-tokens-1e30", lambda t: ["features", "--out", "o", "--tokens", "1e30"], r"--tokens '1e30' is more"),
    ("features-out-empty", lambda t: ["features", "--out", ""], r"--out is empty"),
    ("features-model-empty", lambda t: ["features", "--out", "o", "--model", ""], r"--model is empty"),
    ("features-device-meta", lambda t: ["features", "--out", "o", "--device", "meta"], r"--device meta"),
]


def _tree(root):
    """Every path under root with what it is (lstat: links, loops and pipes are not followed or opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("argv,match", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES])
def test_bad_command_input(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    before = _tree(tmp_path)
    capsys.readouterr()
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    lines = [line.strip() for line in re.split(r"[\r\n]", NOISE.sub("", err)) if line.strip()]
    lines = [line for line in lines if not line.startswith(("trace:", "Loading weights"))]
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert _tree(tmp_path) == before  # nothing written in the folder it ran in (--out '' would mean here)
