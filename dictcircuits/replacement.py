"""The replacement model and its attribution graph, for one prompt.

Every MLP is replaced by transcoder features plus an error term per (layer, position) that makes its output exact;
attention patterns and norm scales are frozen at the prompt's values (frozen.py). What is left between the nodes is
linear, so each edge is exact: source value × the linear map from the source to the target. Nodes, in this order:
active transcoder features (layer, position, feature), error terms (layer, position), token embeddings (position)
and target logits. A feature row's target is its pre-activation (its activation where it fires); a logit row's is
the logit minus the mean logit over the vocabulary (before any final softcap). Each row of the adjacency plus its
`constant` (biases, and positions passed through unreplaced) equals its target's value: nothing is left out.

Pruning, influence and the replacement / completeness scores follow circuit-tracer's definitions
(docs/replacement.md); circuit/replacement_circuit.py checks circuits of these graphs by patching the real model,
attention free, with the Patcher every circuit uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from tqdm.auto import tqdm

from .dictionary import Dictionary
from .errors import DictCircuitsError
from .frozen import FrozenRecord
from .models import Model, Tokens
from .positions import skip_mask
from .splice import SpliceResult, check_tokens, splice
from .transcoder import targets

KINDS = ("feature", "error", "embed", "logit")
QUEUE_ROWS = 128  # feature rows computed between two updates of the influence order (max_feature_nodes)


@dataclass(frozen=True)
class GraphNode:
    """One node: a feature (layer, pos, index = feature id), an error term (layer, pos), a token embedding (pos,
    index = token id) or a target logit (pos = last, index = token id). `value`: the feature's activation, the
    logit minus the mean logit, else 0."""

    kind: str
    layer: int  # -1 for embeddings, n_layers for logits
    pos: int
    index: int
    value: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "feature":
            return f"L{self.layer}/p{self.pos}/f{self.index}"
        if self.kind == "error":
            return f"err/L{self.layer}/p{self.pos}"
        return f"{self.kind}/p{self.pos}/t{self.index}"


@dataclass
class Pruned:
    """What pruning keeps: node_mask [n], edge_mask [n, n] (rows targets), each node's cumulative influence [n]."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative: torch.Tensor


@dataclass
class AttributionGraph:
    """The replacement model's graph of one prompt: nodes in the order features, errors, embeddings, logits;
    adjacency [n, n] with rows = targets and columns = sources (direct effects); row sum + constant = target."""

    model: str
    tokens: list[str]  # the prompt's tokens as text
    nodes: list[GraphNode]
    adjacency: torch.Tensor  # [n, n]
    constant: torch.Tensor  # [n]: each row's part carried by no node (zero for rows that are only sources)
    logit_probs: torch.Tensor  # [n_logits]: the model's probabilities of the target logits
    computed: torch.Tensor | None = None  # [n] bool: rows whose inputs were computed (max_feature_nodes)

    def count(self, kind: str) -> int:
        return sum(node.kind == kind for node in self.nodes)

    def slice(self, kind: str) -> slice:
        start = sum(self.count(k) for k in KINDS[:KINDS.index(kind)])
        return slice(start, start + self.count(kind))

    @property
    def logit_weights(self) -> torch.Tensor:  # [n]: the target logits' probabilities, 0 elsewhere
        w = torch.zeros(len(self.nodes), dtype=self.adjacency.dtype)
        w[self.slice("logit")] = self.logit_probs.to(w.dtype)
        return w

    def influence(self, adjacency: torch.Tensor | None = None) -> torch.Tensor:
        """Each node's indirect influence on the targets [n]: logit_weights @ (Â + Â² + ...), Â the adjacency with
        rows normalised by their absolute sums (circuit-tracer's node influence)."""
        return influence(normalise_rows(self.adjacency if adjacency is None else adjacency), self.logit_weights)

    def scores(self) -> "GraphScores":
        """circuit-tracer's replacement score (embedding influence ÷ embedding + error influence) and completeness
        score (each node's non-error input fraction, weighted by its influence plus its logit weight)."""
        norm = normalise_rows(self.adjacency)
        w = self.logit_weights
        infl = influence(norm, w)
        errors, embeds = self.slice("error"), self.slice("embed")
        tokens, error = infl[embeds].sum(), infl[errors].sum()
        if float(tokens + error) == 0:
            raise DictCircuitsError("no influence reaches the targets from the embeddings or error terms; the graph "
                                    "has no path to score")
        replacement = float(tokens / (tokens + error))
        weight = infl + w
        completeness = float(((1 - norm[:, errors].sum(1)) * weight).sum() / weight.sum())
        return GraphScores(replacement=replacement, completeness=completeness)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        """Keep the most influential nodes carrying `node_threshold` of the influence (embeddings and logits always
        kept), then the edges carrying `edge_threshold` of the edge influence among them; then drop features and
        errors left without an outgoing edge, and features without an incoming one (circuit-tracer's rule)."""
        for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= t <= 1.0:
                raise DictCircuitsError(f"{name}={t}: give a fraction of the influence between 0 and 1")
        w = self.logit_weights
        infl = influence(normalise_rows(self.adjacency), w)
        keep = infl >= threshold_for(infl, node_threshold)
        always = torch.zeros_like(keep)
        always[self.slice("embed")] = True
        always[self.slice("logit")] = True
        keep |= always
        pruned = self.adjacency * keep[:, None] * keep[None, :]
        norm = normalise_rows(pruned)
        edge_score = norm * (influence(norm, w) + w)[:, None]
        edges = edge_score >= threshold_for(edge_score.flatten(), edge_threshold)
        edges &= pruned != 0
        sources, features = ~always, self.slice("feature")
        while True:
            before = keep.clone()
            edges &= keep[:, None] & keep[None, :]
            keep[sources] &= edges[:, sources].any(0)
            keep[features] &= edges[features].any(1)
            if torch.equal(keep, before):
                break
        order = torch.argsort(infl, descending=True)
        cumulative = torch.zeros_like(infl)
        total = infl.sum()
        cumulative[order] = torch.cumsum(infl[order], 0) / (total if total > 0 else 1)
        return Pruned(node_mask=keep, edge_mask=edges, cumulative=cumulative)


@dataclass(frozen=True)
class GraphScores:
    replacement: float
    completeness: float


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    """|matrix| with each row divided by its sum (rows that sum to 0 stay 0)."""
    a = matrix.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(norm: torch.Tensor, weights: torch.Tensor, max_steps: int = 1000) -> torch.Tensor:
    """weights @ (A + A² + ...) for a row-normalised adjacency A of a graph without cycles (the series ends)."""
    step = weights @ norm
    total = step.clone()
    for _ in range(max_steps):
        if not step.any():
            return total
        step = step @ norm
        total += step
    raise DictCircuitsError("influence did not converge: the graph has a cycle (a node feeds itself)")


def threshold_for(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the highest scores sum to `fraction` of the total."""
    ranked = torch.sort(scores, descending=True).values
    total = ranked.sum()
    if total <= 0:
        return ranked[0]
    cumulative = torch.cumsum(ranked, 0) / total
    at = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ranked) - 1)
    return ranked[at]


# --- building the graph -------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """The frozen, spliced run of one prompt with every source a leaf."""

    result: SpliceResult
    hidden: torch.Tensor  # [1, pos, d] the unembedding's input (connected to the leaves)
    coders: dict[str, Dictionary]  # read site -> transcoder, in forward order
    writes: dict[str, tuple[str, ...]]  # read site -> its write sites
    error_at: dict[str, str]  # write site -> the read site whose state holds that site's error leaf
    skipped: dict[str, torch.Tensor]  # read site -> [pos] bool, positions it passes through


def check_replacement(model: Model, transcoders: Mapping[str, Dictionary]) -> dict[str, tuple[str, ...]]:
    """Every MLP output must be written by a transcoder (what is not replaced would stay nonlinear); returns the
    write sites of each."""
    if not isinstance(transcoders, Mapping) or not transcoders:
        raise DictCircuitsError("the replacement model needs transcoders: pass {mlp_in.L: transcoder} for every layer "
                                "(train them with `dictcircuits train --arch transcoder`)")
    writes = {}
    for site, dic in transcoders.items():
        if not getattr(dic, "is_transcoder", False):
            raise DictCircuitsError(f"the dictionary at {site} is not a transcoder: the replacement model replaces "
                                    "MLPs with transcoders (arch transcoder, skip-transcoder or clt)")
        writes[site] = targets(model, site, dic)
    covered = {w for ws in writes.values() for w in ws}
    missing = [f"mlp.{layer}" for layer in range(model.n_layers) if f"mlp.{layer}" not in covered]
    if missing:
        raise DictCircuitsError(f"no transcoder writes {', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}: "
                                "the replacement model replaces every MLP; give a transcoder set for all layers")
    return writes


def _frozen_run(model: Model, tokens: Tokens, transcoders: Mapping[str, Dictionary], record: FrozenRecord,
                edit=None) -> _Run:
    writes = check_replacement(model, transcoders)
    coders = dict(sorted(transcoders.items(), key=lambda kv: model.site(kv[0]).order))
    with torch.enable_grad():
        result = splice(model, tokens, coders, leaves=True, embed_leaf=True, hidden=True, frozen=record, edit=edit)
    error_at = {ws[0]: site for site, ws in writes.items()}
    skipped = {site: skip_mask(dic, model, tokens.input_ids, result.states[site].x)[0] for site, dic in coders.items()}
    return _Run(result, result.logits, coders, writes, error_at, skipped)


def _logit_targets(model: Model, final: torch.Tensor, max_logits: int, probability: float,
                   tokens: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [k], their probabilities [k], demeaned unembedding rows [k, d]) of the targets: the given tokens,
    or the most likely ones until their cumulative probability reaches `probability` (at most `max_logits`)."""
    logits = model.logits_at(final, 0, model.vocab_size).float()  # [vocab]
    probs = torch.softmax(logits, -1)
    if tokens is None:
        top_p, top = torch.topk(probs, min(max_logits, probs.numel()))
        k = min(int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(probability))) + 1, len(top))
        ids = top[:k]
    else:
        ids = torch.tensor(tokens, dtype=torch.long)
    head = model.hf.get_submodule(model.family.unembed).weight  # [vocab, d]
    rows = head[ids] - head.mean(0, keepdim=True)  # [k, d]
    return ids, probs[ids], rows


def metric_direction(model: Model, batch, row: int = 0) -> torch.Tensor:
    """The gradient [d] of a task metric (batch.metric, prompt `row`) w.r.t. the final hidden state at the last
    position: the direction whose dot product with that state is the metric's linear part (exactly the metric for
    a plain logit difference without softcap; for log p(A), logit(A) minus the softmax-weighted mean logit)."""
    if batch.metric_name == "kl":
        raise DictCircuitsError("the kl metric has zero gradient at the clean run, so it gives no direction to "
                                "attribute; use a task with a logit_diff or prob_diff metric")
    one = batch[[row]]
    with torch.no_grad():
        final = model.run(one.clean, hidden=True)[0, int(one.clean.last[0])]  # [d]
    with torch.enable_grad():
        h = final.clone().requires_grad_(True)
        logits = model.logits_at(h, 0, model.vocab_size)[None]  # [1, vocab]
        (direction,) = torch.autograd.grad(one.metric(logits).sum(), h)
    return direction.detach()


def attribute(model: Model, prompt: str | Tokens, transcoders: Mapping[str, Dictionary], *, max_logits: int = 10,
              logit_probability: float = 0.95, target_tokens: list[int] | None = None,
              direction: torch.Tensor | None = None, direction_token: int | None = None,
              max_feature_nodes: int | None = None, batch_size: int = 32) -> AttributionGraph:
    """The attribution graph of one prompt: every active feature, error term, embedding and target logit, with
    every direct edge between them (one batched backward per chunk of target rows). Targets: the most likely
    tokens (or `target_tokens`), each as its logit minus the mean logit; or one `direction` [d] of the final hidden
    state (a task metric's, `metric_direction`), shown as token `direction_token`. max_feature_nodes: compute the
    rows of that many features only, the most influential first (the others stay sources without inputs)."""
    tokens = model.tokenize([prompt]) if isinstance(prompt, str) else prompt
    check_tokens(model, tokens)
    if len(tokens) != 1:
        raise DictCircuitsError(f"attribute takes one prompt, not {len(tokens)}; build one graph per prompt")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DictCircuitsError(f"batch_size={batch_size!r}: give a positive number of rows per backward pass")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or max_feature_nodes < 0):
        raise DictCircuitsError(f"max_feature_nodes={max_feature_nodes!r}: give a number of feature rows, or None "
                                "for all")
    P = tokens.input_ids.shape[1]
    record = FrozenRecord()
    run = _frozen_run(model, tokens, transcoders, record)
    states = run.result.states
    hidden = run.hidden[0, -1]  # [d]
    if direction is None:
        ids, probs, logit_rows = _logit_targets(model, hidden.detach(), max_logits, logit_probability, target_tokens)
    else:
        ids, probs = torch.tensor([int(direction_token or 0)]), torch.ones(1)
        logit_rows = direction.reshape(1, -1).to(hidden.dtype)

    # nodes
    features: list[GraphNode] = []
    for site, dic in run.coders.items():
        layer = model.site(site).layer
        f = states[site].f.detach()[0]  # [pos, F]
        f = torch.where(run.skipped[site][:, None], torch.zeros_like(f), f)
        for pos, idx in torch.nonzero(f).tolist():
            features.append(GraphNode("feature", layer, pos, idx, float(f[pos, idx])))
    errors = [GraphNode("error", model.site(w).layer, pos, -1)
              for w, site in run.error_at.items() for pos in range(P) if not run.skipped[site][pos]]
    embeds = [GraphNode("embed", -1, pos, int(tokens.input_ids[0, pos])) for pos in range(P)]
    logit_values = (logit_rows @ hidden.detach()).tolist()
    logits = [GraphNode("logit", model.n_layers, P - 1, int(t), v) for t, v in zip(ids.tolist(), logit_values)]
    nodes = features + errors + embeds + logits
    n, nf, ne = len(nodes), len(features), len(errors)

    # the sources: gradients are taken w.r.t. the error leaves (= w.r.t. each write site's output) and the embedding
    write_sites = list(run.error_at)
    err_leaves = [states[run.error_at[w]].err for w in write_sites]  # each [1, pos, d]
    sources = [run.result.embed, *err_leaves]
    err_values = [e.detach()[0] for e in err_leaves]  # [pos, d]
    embed_value = run.result.embed.detach()[0]  # [pos, d]
    # feature columns: feature j adds f_j · direction(j, out) to each site it writes
    feat_cols = {}
    for j, node in enumerate(features):
        site = model.site(f"mlp_in.{node.layer}").name
        feat_cols.setdefault(site, []).append(j)
    err_cols: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (positions, columns) of its error nodes
    for i, node in enumerate(errors):
        err_cols.setdefault(node.layer, ([], []))
        err_cols[node.layer][0].append(node.pos)
        err_cols[node.layer][1].append(nf + i)
    err_cols = {layer: (torch.tensor(p), torch.tensor(c)) for layer, (p, c) in err_cols.items()}

    adjacency = torch.zeros(n, n)
    constant = torch.zeros(n)

    def fill(rows: list[int], grads: list[torch.Tensor | None]) -> None:
        """Write the edges of target rows from the gradients [m, 1, pos, d] at the embedding and each write site."""
        r = torch.tensor(rows)
        g_embed = grads[0]
        if g_embed is not None:
            adjacency[r, nf + ne:nf + ne + P] = (g_embed[:, 0] * embed_value).sum(-1)
        g_site = {w: g for w, g in zip(write_sites, grads[1:])}
        for w, g in g_site.items():
            if g is None:
                continue
            positions, cols = err_cols.get(model.site(w).layer, (None, None))
            if positions is not None:
                per_pos = (g[:, 0] * err_values[write_sites.index(w)]).sum(-1)  # [m, pos]
                adjacency[r[:, None], cols[None, :]] = per_pos[:, positions]
        for site, cols in feat_cols.items():
            dic = run.coders[site]
            for out, w in enumerate(run.writes[site]):
                g = g_site.get(w)
                if g is None:
                    continue
                idx = torch.tensor([features[j].index for j in cols])
                pos = torch.tensor([features[j].pos for j in cols])
                vals = torch.tensor([features[j].value for j in cols])
                dirs = dic.direction(idx, out=out).detach()  # [k, d]
                adjacency[r[:, None], torch.tensor(cols)[None, :]] += (g[:, 0, pos] * dirs).sum(-1) * vals

    # logit rows: seed the final hidden state at the last position with the demeaned unembedding rows
    seeds = torch.zeros(len(logits), 1, P, hidden.shape[-1])
    seeds[:, 0, -1] = logit_rows.detach()
    grads = torch.autograd.grad(run.hidden, sources, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                allow_unused=True)
    fill(list(range(n - len(logits), n)), list(grads))
    # feature rows: seed each feature's read-site input with its encoder direction at its position. Rows are
    # computed in order of the features' influence on the targets so far (circuit-tracer's order), all of them or
    # the max_feature_nodes most influential; a feature whose row is not computed stays a source without inputs
    limit = nf if max_feature_nodes is None else min(nf, max_feature_nodes)
    computed = torch.zeros(n, dtype=torch.bool)
    computed[n - len(logits):] = True
    weights = torch.zeros(n)
    weights[n - len(logits):] = probs.float()
    bar = tqdm(total=limit, desc="attribution: feature rows", unit="row", disable=limit < 2 * batch_size)
    while int(computed[:nf].sum()) < limit:
        infl = influence(normalise_rows(adjacency), weights)[:nf] if limit < nf else torch.zeros(nf)
        order = [int(j) for j in torch.argsort(torch.where(computed[:nf], torch.tensor(-1.0), infl), descending=True,
                                               stable=True) if not computed[j]]
        queue = order[:min(limit - int(computed[:nf].sum()), QUEUE_ROWS if limit < nf else nf)]
        for site in dict.fromkeys(f"mlp_in.{features[j].layer}" for j in queue):
            dic, x = run.coders[site], states[site].x  # x [1, pos, d], connected to the sources below it
            rows = [j for j in queue if f"mlp_in.{features[j].layer}" == site]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                idx = torch.tensor([features[j].index for j in chunk])
                seeds = torch.zeros(len(chunk), 1, P, x.shape[-1])
                seeds[torch.arange(len(chunk)), 0, torch.tensor([features[j].pos for j in chunk])] = \
                    dic.encoder_direction(idx).detach().to(seeds.dtype)
                grads = torch.autograd.grad(x, sources, grad_outputs=seeds, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
                fill(chunk, list(grads))
                bar.update(len(chunk))
        computed[queue] = True
    bar.close()
    by_site: dict[str, list[int]] = {}
    for j, node in enumerate(features):
        if computed[j]:
            by_site.setdefault(f"mlp_in.{node.layer}", []).append(j)
    # constants: each target with every source set to 0 in the same frozen world (biases, passed-through positions)
    zero = _frozen_run(model, tokens, transcoders, record,
                       edit=lambda site, f, err: (torch.zeros_like(f), torch.zeros_like(err)))
    with torch.no_grad():
        constant[n - len(logits):] = logit_rows @ zero.hidden[0, -1]
        for site, rows in by_site.items():
            dic = run.coders[site]
            x, x0 = states[site].x.detach()[0], zero.result.states[site].x.detach()[0]  # [pos, d]
            for j in rows:
                node = features[j]
                u = dic.encoder_direction(node.index).detach()  # [d]
                constant[j] = node.value - u @ (x[node.pos] - x0[node.pos])
    return AttributionGraph(model=model.name, tokens=[model.tokenizer.decode([t]) for t in tokens.input_ids[0].tolist()],
                            nodes=nodes, adjacency=adjacency, constant=constant, logit_probs=probs.detach().float(),
                            computed=computed)
