"""TraceConfig: trace's options declared once (the parser is built from the dataclass and read back), one check(),
unknown keywords refused by name, a config and keywords tracing the same circuit, and TraceSettings written to the
JSON with the groups that apply only."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from dictcircuits.circuit import TraceSettings
from dictcircuits.circuit.config import FAITHFULNESS, MAX_NODES, TraceConfig
from dictcircuits.errors import DictCircuitsError
from dictcircuits.toy import random_dictionaries, toy_model
from dictcircuits.trace import add_arguments, trace

from test_circuits import toy_task


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_flag_is_a_field_and_the_defaults_agree():
    args = parse("--task", "ioi")
    flagged = [f for f in dataclasses.fields(TraceConfig) if "cli" in f.metadata]
    assert {f.name for f in flagged} <= set(vars(args))
    assert set(vars(args)) - {f.name for f in flagged} == {"model", "dictionaries", "out"}
    assert TraceConfig.from_args(args) == TraceConfig(task="ioi")
    assert TraceConfig().faithfulness == FAITHFULNESS and TraceConfig().max_nodes == MAX_NODES


def test_flags_become_typed_fields(tmp_path):
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("one context\n\n two\n")
    config = TraceConfig.from_args(parse("--task", "sva", "--aggregate", "sum", "--per-prompt", "--steps", "3",
                                         "--keep-edge-influence", "0.5", "--contexts", str(contexts)))
    assert config == TraceConfig(task="sva", positions=False, per_prompt="auto", steps=3, keep_edge_influence=0.5,
                                 contexts=["one context", " two"])
    assert TraceConfig.from_args(parse("--task", "ioi", "--per-prompt", "7")).per_prompt == 7
    with pytest.raises(SystemExit):  # still one way of sizing on the command line
        parse("--task", "ioi", "--nodes", "3", "--faithfulness", "0.5")


BAD = [
    (dict(task="ioi", n=0), "n=0"),
    (dict(task="ioi", prompt="The cat"), "not both"),
    (dict(), "give --task NAME or --prompt TEXT"),
    (dict(task="ioi", answer=" Mary"), "--answer applies to --prompt"),
    (dict(prompt="The cat", ablation="corrupt"), "needs a corrupt prompt"),
    (dict(prompt="The cat", mean_tokens=0), "mean_tokens=0"),
    (dict(task="ioi", per_prompt=5, faithfulness=0.9), "--per-prompt N fixes its size"),
    (dict(task="ioi", nodes=3, keep_influence=0.5), "not nodes and keep_influence"),
    (dict(task="ioi", faithfulness=None), "nothing sizes the circuit"),
    (dict(task="ioi", graph="replacement", nodes=3), "nodes does not apply to graph='replacement'"),
    (dict(task="ioi", max_feature_nodes=3), "max_feature_nodes caps the rows of replacement graphs"),
    (dict(task="ioi", dashboard="/nonexistent"), "is not a feature dashboard"),
    (dict(task="ioi", sites=[1]), "give site names as a string"),
    (dict(task="ioi", method="exact", per_prompt=3), "method exact does not measure"),
]


@pytest.mark.parametrize("options, message", BAD, ids=[m for _, m in BAD])
def test_check_refuses_in_one_line(options, message):
    with pytest.raises(DictCircuitsError, match=message) as err:
        TraceConfig(**options).check()
    assert "\n" not in str(err.value)


def test_unknown_keywords_are_named():
    with pytest.raises(DictCircuitsError, match="trace has no option 'max_node'"):
        trace("ioi", max_node=10)
    with pytest.raises(DictCircuitsError, match="a TraceConfig and the keyword 'nodes'"):
        trace(TraceConfig(task="ioi"), nodes=10)


def test_a_config_and_keywords_trace_the_same_circuit(tokenizer):
    torch.manual_seed(1)
    model = toy_model("gpt2", tokenizer=tokenizer)
    dicts = random_dictionaries(model, "resid.*", expansion=2)
    options = dict(method="attrib", nodes=4, progress=False)
    by_keywords = trace(toy_task(), model, dicts, **options)
    by_config = trace(TraceConfig(task=toy_task(), **options), model, dicts)
    assert by_config.settings == by_keywords.settings and by_config.settings.nodes == 4
    assert sorted(by_config.graph.nodes) == sorted(by_keywords.graph.nodes)
    assert by_config.verification.faithfulness == pytest.approx(by_keywords.verification.faithfulness)


def test_settings_write_the_groups_that_apply():
    task = TraceSettings(sites=["resid.1"], metric="logit_diff", replacement_score=0.5, wrong=" John")
    written = task.to_dict()
    assert written["sites"] == ["resid.1"] and "replacement_score" not in written and "wrong" not in written
    assert "source" not in written
    prompt = TraceSettings(mode="prompt", wrong=" John", source="prompt 'x'").to_dict()
    assert prompt["wrong"] == " John" and prompt["source"] == "prompt 'x'" and "completeness_score" not in prompt
    replacement = TraceSettings(graph="replacement", replacement_score=0.5).to_dict()
    assert replacement["replacement_score"] == 0.5 and "top_token" not in replacement
    assert TraceSettings.from_dict({**replacement, "added_later": 1}) == TraceSettings(graph="replacement",
                                                                                     replacement_score=0.5)


def test_effects_rows_fit_the_memory_budget():
    """Node-effects traces keep EFFECTS_ROWS rows where their activations fit EFFECTS_BYTES, fewer where not (and
    at least one)."""
    from types import SimpleNamespace

    from dictcircuits.circuit.config import EFFECT_FLOATS, EFFECTS_BYTES, EFFECTS_ROWS, effects_rows

    small = SimpleNamespace(n_layers=3, d_model=128)
    assert effects_rows(small, 15) == EFFECTS_ROWS
    gemma = SimpleNamespace(n_layers=18, d_model=640)
    rows = effects_rows(gemma, 16)
    assert 1 <= rows < EFFECTS_ROWS and rows * 16 * 18 * EFFECT_FLOATS * 640 * 4 <= EFFECTS_BYTES
    assert effects_rows(SimpleNamespace(n_layers=80, d_model=8192), 4096) == 1
