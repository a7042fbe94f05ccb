"""Single-prompt attribution: a target on one prompt (the model's top token, an --answer, or a logit difference)
and node effects to the prompt from an ablation baseline that needs no corrupt prompt (the kinds ablation.py
registers for "prompt": each dictionary's mean feature and error values over a corpus sample, or zero).

The target is a TaskBatch whose corrupt side is the prompt itself (nothing in it is ever run as a corrupt prompt):
- --answer A alone (and the default, A = the model's top token): log p(A) = logit(A) - logsumexp(all logits),
  written as a logit difference against the whole vocabulary as the "wrong" set, so it is invariant to a shift of
  every logit and bounded above by 0;
- --answer A --wrong W: logit(A) - logit(W); --wrong W alone: logit(top) - logit(W).

Mean ablation sets every feature and error term to its mean over the corpus sample at the positions the dictionary
reads (its position rule), so the fully ablated site holds the mean activation (decode is affine); zero ablation sets
them to 0. Positions the rule skips (BOS) keep their clean values, as in every splice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..ablation import Baseline
from ..dictionary import Dictionary
from ..errors import DictCircuitsError
from ..models import Model, context_length
from ..positions import skip_mask
from ..splice import splice
from ..tasks import TaskBatch, _token_id
from .node_effects import NodeEffects, SiteData, linear_effects, run_capture, site_grads


@dataclass
class Target:
    """What a single-prompt trace measures."""

    prompt: str
    answer_id: int
    answer: str  # the answer token's text
    wrong_id: int | None
    wrong: str | None
    metric: str  # readable: "log p(' Paris')" or "logit(' Paris') - logit(' London')"
    answer_prob: float  # the model's probability of the answer on the prompt
    top: bool  # the answer is the model's top token (no --answer given)


def _one_token(model: Model, word: str, prompt: str, flag: str) -> int:
    found = _token_id(model.tokenizer, word, prompt)
    if found is None:
        count = len(model.tokenizer(word, add_special_tokens=False)["input_ids"])
        raise DictCircuitsError(f"--{flag} {word!r} is {count} tokens for {model.name}'s tokenizer; give a single "
                                "token (mind the leading space: ' Paris')")
    return found


def prompt_target(model: Model, prompt: str, answer: str | None = None, wrong: str | None = None
                  ) -> tuple[TaskBatch, Target]:
    """The batch of one prompt and its target (see the module docstring); refuses prompts longer than the model's
    context and answers of several tokens, after one forward pass at most."""
    tokens = model.tokenize([prompt])
    limit = context_length(model)
    if limit is not None and tokens.input_ids.shape[1] > limit:
        raise DictCircuitsError(f"the prompt is {tokens.input_ids.shape[1]} tokens but {model.name} reads at most "
                                f"{limit}; shorten it")
    a_id = None if answer is None else _one_token(model, answer, prompt, "answer")
    w_id = None if wrong is None else _one_token(model, wrong, prompt, "wrong")
    with torch.no_grad():
        logits = model.run(tokens, last_only=True)[0].float().cpu()  # [vocab]
    top = a_id is None
    if top:
        a_id = int(logits.argmax())
        if w_id == a_id:
            raise DictCircuitsError(f"--wrong {wrong!r} is the model's top token on this prompt, so the logit "
                                    "difference would be 0; give --answer too, or another --wrong")
    text = lambda i: model.tokenizer.decode([i])  # noqa: E731
    vocab = logits.shape[0]
    ids = torch.tensor([a_id])
    if w_id is None:
        batch = TaskBatch(tokens, tokens, ids, ids.clone(), "logit_diff",
                          wrong_sets=torch.ones(1, vocab, dtype=torch.bool))
        metric = f"log p({text(a_id)!r})"
    else:
        batch = TaskBatch(tokens, tokens, ids, torch.tensor([w_id]), "logit_diff")
        metric = f"logit({text(a_id)!r}) - logit({text(w_id)!r})"
    prob = float(torch.softmax(logits, -1)[a_id])
    return batch, Target(prompt, a_id, text(a_id), w_id, None if w_id is None else text(w_id), metric, prob, top)


def ablated_metric(model: Model, dictionaries: Mapping[str, Dictionary], batch: TaskBatch, baseline: Baseline
                   ) -> torch.Tensor:
    """The metric [batch] with every node of every site at its baseline value (m(∅))."""
    P = batch.clean.input_ids.shape[1]
    values = {s: baseline.values(s, P) for s in dictionaries}

    def edit(site, f, err):
        bf, be = values[site]
        return bf.to(f).expand_as(f), be.to(err).expand_as(err)

    with torch.no_grad():
        return batch.metric(splice(model, batch.clean, dictionaries, edit=edit, last_only=True).logits)


def baseline_effects(model: Model, dictionaries: Mapping[str, Dictionary], batch: TaskBatch, baseline: Baseline,
                     method: str = "ig", steps: int = 10, batch_size: int | None = None) -> NodeEffects:
    """Node effects from the baseline to the prompt(s), in attribute.node_effects' layout and sign convention:
    effect ~ m(prompt) - m(prompt with the node at its baseline value). method ig (the site's activation
    interpolated from its baseline value to the prompt's, `steps` midpoints) or attrib (gradient at the prompt).
    metric_corrupt holds m(∅), every node at its baseline."""
    if method not in ("ig", "attrib"):
        raise DictCircuitsError(f"method {method!r} is not available for a single prompt; use ig or attrib")
    sites = [s.name for s in model.resolve_sites(list(dictionaries))]
    logits, acts = run_capture(model, batch.clean, sites, last_only=True)  # [batch, vocab], site -> [b, pos, d]
    m_clean = batch.metric(logits)
    real = batch.clean.attention_mask.to(logits.device).bool()  # [batch, pos]
    P = batch.clean.input_ids.shape[1]
    data: dict[str, SiteData] = {}
    with torch.no_grad():
        for s in sites:
            dic, xc = dictionaries[s], acts[s]
            fc = dic.encode(xc)
            ec = xc - dic.decode(fc)
            fb, eb = (v.to(xc.device, xc.dtype) for v in baseline.values(s, P))  # [1|b, pos, F], [1|b, pos, d]
            keep = (real & ~skip_mask(dic, model, batch.clean.input_ids, xc).to(real.device))[..., None]  # [b, pos, 1]
            xb = torch.where(keep, (dic.decode(fb) + eb).to(xc.dtype), xc)  # [b, pos, d]
            data[s] = SiteData(xc, xb, (fc - fb) * keep, (ec - eb) * keep)
    grads = site_grads(model, batch, data, sites, method, steps, batch_size)
    features, errors = linear_effects(dictionaries, data, grads)
    m_empty = ablated_metric(model, dictionaries, batch, baseline)
    return NodeEffects(method, features, errors, grads, {s: data[s].delta_f for s in sites},
                       {s: data[s].delta_err for s in sites}, m_clean.detach(), m_empty.detach())
