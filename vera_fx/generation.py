"""Text generation through the adapted graph, with a KV cache.

``generate(gm, input_ids, ...)`` runs a *decode graph*: the user's causal LM wrapped with a transformers
``StaticCache`` held as buffers, captured once with ``torch.export`` (non-strict) for a batch size and a cache
length (a power-of-two bucket), then matched and given the adapter nodes of the active adapters **over the
same adapter state as the training graph** (the decode graph registers the training graph's
``vera_fx_adapters`` container and reads its base weights). A training step, ``set_adapter``,
``disable_adapters``, ``merge`` or a new sampling switch therefore changes what ``generate`` produces
without re-capturing; only the adapter nodes are re-emitted when the set of live adapters changes.

The decode graph takes ``input_ids`` (B, q), a 2D ``attention_mask`` over the cache positions (B, L),
``position_ids`` (B, q) and ``cache_position`` (q,), with q dynamic in [1, L]: one graph serves the prefill
(the whole prompt in one call) and every decode step (q = 1). It writes keys and values in place
(``index_copy_`` into the cache buffers), so a decoded token costs its projections plus attention over the
cache, independent of how it got there. Left padding works because the mask is 2D over cache positions and
position ids follow transformers' rule (cumulative sum of the mask).

Which model is wrapped: ``capture`` keeps a reference to the model it captured in
``gm.meta["vera_fx_source_model"]`` (a ``SourceModel``; dropped when the graph is pickled, kept by
``copy.deepcopy``); ``generate(..., model=...)`` overrides it. Only the model's architecture is used: its
weights are replaced by the graph's (by parameter name), so ``merge_into`` or training never desynchronise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.logits_process import LogitsProcessorList

from .eager_generation import eager_reason, generate_eager, live_layout, model_inputs
from .state import adapter_container, modules_to_save_copy, reads_state, set_adapters_training
from .capture import SOURCE_MODEL_KEY, CaptureError, model_flags_kept
from .linear_like import linear_forwards
from .methods import CONTAINER
from .methods.pvera import pvera_record_kl
from .passes.infer import DEFAULT_FORM, INFERENCE_KEY
from .passes.inject import emit_adapter, remove_adapter_nodes
from .passes.match import MatchPass
from .sites import ADAPTER_KEY, MODEL_INFO_KEY, SITE_KEY, as_graph_module, model_info, read_sites

logger = logging.getLogger(__name__)

# Keyword arguments of ``generate`` beyond input_ids / attention_mask, named in the error for any other.
SUPPORTED_KWARGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                    "generator", "seed", "model", "compile")
_PREFIX = "model."  # the user's model sits at ``model`` inside the decode wrapper
_MIN_BUCKET = 64
# transformers' cache, config and generation modules are imported by the functions that use them (about 2.7 s
# on a first import): a model that is transformed and trained but never generates never loads them.


class _DecodeModule(nn.Module):
    """The user's causal LM with a ``StaticCache`` registered as buffers (the export recipe of transformers'
    ``TorchExportableModuleWithStaticCache``, plus a 2D mask and position ids so left padding works)."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_cache_len: int) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import DummyLayer, StaticLayer, StaticSlidingWindowLayer
        from transformers.configuration_utils import get_head_shapes

        super().__init__()
        self.model = model
        config = model.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_cache_len, config=config)
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer):
                window = getattr(config, "sliding_window", None)
                if window is not None and max_cache_len > window:
                    raise ValueError(f"prompt length + max_new_tokens needs a cache of {max_cache_len} positions, "
                                     f"beyond the model's sliding_window={window}: vera_fx.generate keeps every "
                                     f"position; use at most {window} positions in all")
                self.cache.layers[i] = StaticLayer(max_cache_len)  # exact while the window never slides
            elif isinstance(layer, DummyLayer):
                self.cache.layers[i] = StaticLayer(0)
        num_heads, head_dim = get_head_shapes(config)
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.cache.early_initialization(batch_size, num_heads, head_dim, weight.dtype, weight.device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            # Non-strict export swaps the module's buffers for traced ones: point the cache at them.
            layer.keys = getattr(self, f"key_cache_{i}")
            layer.values = getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits


def check_can_generate(model: nn.Module) -> None:
    """ValueError unless ``model`` is a decoder-only transformers causal LM vera_fx can generate with."""
    from transformers import PreTrainedModel
    from transformers.configuration_utils import get_head_shapes

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"generate needs a transformers causal LM (…ForCausalLM / …LMHeadModel), got {name}")
    cfg = model.config
    if not model.can_generate() or model.get_output_embeddings() is None:
        raise ValueError(f"{name} cannot generate text: it has no language-model head (it is an encoder or a "
                         "classifier). generate supports causal LMs (…ForCausalLM / …LMHeadModel, e.g. Llama, "
                         "GPT-2, Mistral) and encoder-decoder models (…ForConditionalGeneration: T5, BART, Whisper)")
    if getattr(cfg, "is_encoder_decoder", False):
        return
    try:
        get_head_shapes(cfg.get_text_config())
    except Exception as e:  # configs without attention head counts
        raise ValueError(f"{name}: cannot size a key/value cache from its config ({e}); generate supports "
                         "attention decoders such as Llama, GPT-2, OPT, Mistral, Qwen2") from e


def cache_bucket(length: int) -> int:
    """The cache length used for ``length`` positions: the next of 64, 96, 128, 192, 256, 384, ... (powers of
    two and 1.5x them), so at most a third of the cache is unused and few lengths need their own graph."""
    size = _MIN_BUCKET
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def capture_decode_graph(model: PreTrainedModel, batch_size: int, max_cache_len: int) -> GraphModule:
    """Export ``model`` with a static KV cache of ``batch_size`` x ``max_cache_len`` and tag its sites.

    The graph writes the cache in place; the query length is dynamic in [1, max_cache_len]. Site names are
    those of ``model`` (the wrapper's ``model.`` prefix removed), so the training graph's adapter state fits.
    The model's modes and ``requires_grad`` flags are left as they were.
    """
    check_can_generate(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: the decode graph is for decoder-only "
                         "causal LMs; vera_fx.generate runs transformers' loop with the adapters hooked for it")
    device = next(p.device for p in model.parameters())
    with model_flags_kept(model), linear_forwards(model):  # Falcon-style linears stay sites (linear_like)
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            wrapper = _DecodeModule(model, batch_size, max_cache_len)
            q = 2
            example = {"input_ids": torch.zeros(batch_size, q, dtype=torch.long, device=device),
                       "attention_mask": torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device),
                       "position_ids": torch.arange(q, device=device).expand(batch_size, q).clone(),
                       "cache_position": torch.arange(q, device=device)}
            qdim = Dim("q", min=1, max=max_cache_len)
            dynamic = {"input_ids": {1: qdim}, "attention_mask": None, "position_ids": {1: qdim},
                       "cache_position": {0: qdim}}
            ep = torch.export.export(wrapper, (), example, strict=False, dynamic_shapes=dynamic)
        except ValueError:
            raise
        except Exception as e:
            raise CaptureError(f"torch.export could not capture {type(model).__name__} with a static KV cache: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    decode = ep.module()
    decode.training = False  # the base model's dropout: generation is inference
    decode.validate_inputs = False  # generate builds the inputs itself; skips export's per-call shape checks
    _strip_checks(decode)
    MatchPass()(decode)
    for node in decode.graph.nodes:
        tag = node.meta.get(SITE_KEY)
        if tag is not None and tag["name"].startswith(_PREFIX):
            tag["name"] = tag["name"][len(_PREFIX):]
    decode.meta[MODEL_INFO_KEY] = {"class": type(model).__name__}
    decode.meta[INFERENCE_KEY] = DEFAULT_FORM  # adapters in the inference form (vera_fx/passes/infer.py)
    logger.info("captured the decode graph of %s: batch %d, cache %d, %d nodes", type(model).__name__, batch_size,
                max_cache_len, len(decode.graph.nodes))
    return decode


def _strip_checks(decode: GraphModule) -> None:
    """Remove export's run-time checks (the guard call, dtype / device assertions): ``generate`` builds every
    input itself, and at one token per call these nodes are a noticeable share of the step."""
    graph = decode.graph
    for node in list(graph.nodes):
        if node.users:
            continue
        if (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default):
            graph.erase_node(node)
    graph.lint()
    decode.recompile()


def _bind_weights(decode: GraphModule, gm: GraphModule, live: Sequence[str]) -> None:
    """Point every base parameter of ``decode`` at ``gm``'s parameter of the same name (merged weights and
    trained biases included), or at a live adapter's ``modules_to_save`` copy."""
    container = getattr(gm, CONTAINER, None)
    theirs = dict(gm.named_parameters(remove_duplicate=False))
    copies: dict[str, nn.Module] = {}
    for name in live:
        state = container[name]
        for path in getattr(state, "modules_to_save_paths", []):
            copies[path] = modules_to_save_copy(state, path)
    for mod_path, mod in decode.named_modules():
        if mod_path == CONTAINER or mod_path.startswith(CONTAINER + "."):
            continue
        for leaf, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mod_path}.{leaf}" if mod_path else leaf
            full = full[len(_PREFIX):] if full.startswith(_PREFIX) else full
            owner = next((c for c in copies if full.startswith(c + ".")), None)
            target = copies[owner].get_parameter(full[len(owner) + 1:]) if owner else theirs.get(full)
            if target is not None and target is not p:
                mod._parameters[leaf] = target


def bind_adapter_state(decode: GraphModule, gm: GraphModule) -> bool:
    """Make ``decode`` compute what ``gm`` computes: the same adapter set (``gm``'s ``vera_fx_adapters``
    registered on ``decode``), the same base weights, and the nodes of ``gm``'s live adapters.

    The decode graph is a version tree of the adapter set's ``GraphVersions`` like any other graph: a live
    layout (active adapters, disabled flag, merged sites) seen before puts its built graph back, a new one is
    emitted once. PVeRA's KL records are not emitted (generation has no loss). Returns whether the graph
    changed.
    """
    container = adapter_container(gm)
    layout = live_layout(gm)
    live = [name for name, _ in layout]
    _bind_weights(decode, gm, live)
    key = ("decode", tuple((name, id(container[name]), sites) for name, sites in layout))
    versions = container.versions
    if versions.current(decode) == key:
        return False
    have = {s.name for s in read_sites(decode)}
    for name, sites in layout:
        missing = sorted(set(sites) - have)
        if missing:
            raise ValueError(f"adapter {name!r}: sites {missing[:5]} are not in the decode graph of "
                             f"{model_info(decode)['class']}; pass model= the model the graph was "
                             "transformed from")
    decode._modules[CONTAINER] = container  # the training graph's AdapterState objects and parameters
    versions.switch(decode, [decode], None, key, lambda: _emit_live(decode, layout))
    logger.debug("decode graph bound to adapters %s", live)
    return True


def _emit_live(decode: GraphModule, layout: Sequence[tuple[str, Any]]) -> None:
    """Emit the nodes of ``layout``'s adapters into ``decode`` (emitted ones removed first), for inference."""
    emitted = {(n.meta.get(ADAPTER_KEY) or {}).get("adapter") for n in decode.graph.nodes} - {None}
    for name in sorted(emitted):
        remove_adapter_nodes(decode, name)
    for name, sites in layout:
        emit_adapter(decode, name, set(sites))
    set_adapters_training(decode, False)  # generation is inference: no adapter dropout or sampling
    _drop_kl_records(decode)


def _drop_kl_records(decode: GraphModule) -> None:
    graph = decode.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is pvera_record_kl]:
        record = node.args[2]
        graph.erase_node(node)
        if not record.users:
            graph.erase_node(record)
    graph.lint()
    decode.recompile()


@dataclass
class _Entry:
    """A decode graph (kept by the adapter set's ``GraphVersions`` per training graph and decode shape; a copy
    or an unpickled model captures its own) and its ``torch.compile`` wrapper."""

    graph: GraphModule
    compiled: Optional[Any] = None


def _training_graph(gm: nn.Module) -> GraphModule:
    return as_graph_module(gm, "generate")


def _source_model(gm: GraphModule, model: Optional[nn.Module]) -> PreTrainedModel:
    if model is None:
        ref = gm.meta.get(SOURCE_MODEL_KEY)
        model = ref.model if ref is not None else None
        if model is None:
            raise ValueError("this graph holds no reference to the model it was captured from (it was pickled, "
                             "or made by an older vera_fx): pass generate(..., model=<that model>)")
    check_can_generate(model)
    return model


def decode_graph(gm: nn.Module, batch_size: int, max_cache_len: int, model: Optional[nn.Module] = None,
                 compile: bool = False) -> tuple[GraphModule, Any]:
    """The decode graph of ``gm`` for ``batch_size`` sequences and ``max_cache_len`` cache positions, bound to
    ``gm``'s adapter state; captured on first use and kept by ``gm``'s adapter set. Returns (graph,
    decode-step callable): the callable is the graph, or its ``torch.compile`` wrapper when ``compile``."""
    inner = _training_graph(gm)
    source = _source_model(inner, model)
    weight = next(p for p in source.parameters() if p.is_floating_point())
    kind = ("decode", batch_size, max_cache_len, weight.dtype, weight.device, id(source))
    entry = adapter_container(inner).versions.derived(
        inner, kind, None, lambda: _Entry(capture_decode_graph(source, batch_size, max_cache_len)))
    changed = bind_adapter_state(entry.graph, inner)
    if compile and (entry.compiled is None or changed):
        entry.compiled = torch.compile(entry.graph, fullgraph=True, dynamic=False)
    return entry.graph, (entry.compiled if compile else entry.graph)


def decode_graphs(gm: nn.Module) -> list[GraphModule]:
    """The decode graphs ``gm`` (a model object or its graph) holds now, one per decode shape."""
    inner = _training_graph(gm)
    derived = adapter_container(inner).versions.derived_of(inner)
    return [entry.graph for kind, entry in derived.items() if isinstance(kind, tuple) and kind[0] == "decode"]


def _token_ids(value: Any, name: str) -> Optional[list[int]]:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value.tolist() if isinstance(value, torch.Tensor) else value)
    if not values:  # an empty list: no stop token
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name}={value!r} is invalid: expected a token id or a list of token ids")
    return values


@torch.no_grad()
@reads_state
def generate(gm: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             model: Optional[nn.Module] = None, compile: bool = False, **kwargs: Any) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens per sequence with the adapted graph ``gm`` and a KV cache.

    Returns the sequences (prompt followed by the new tokens), as transformers' ``generate`` does. Prompts
    may be left-padded (``attention_mask`` zeros on the left). Greedy by default; ``do_sample=True`` samples
    with ``temperature`` / ``top_k`` / ``top_p`` (unset ones come from the model's ``generation_config``, as
    in transformers) from ``generator`` or a generator seeded with ``seed`` (else torch's global one). A
    sequence that produced ``eos_token_id`` (default: the model's) is filled with ``pad_token_id`` (default:
    the model's, else the eos token) and generation stops when all have finished. ``compile=True`` runs the
    decode steps through ``torch.compile``. The computation is the graph's in inference mode: no dropout, and
    PVeRA samples only where ``sample_at_inference`` is on (each sequence draws its own noise).
    """
    if kwargs:
        raise TypeError(f"generate() got unsupported keyword arguments {sorted(kwargs)}; supported: input_ids, "
                        f"attention_mask, {', '.join(SUPPORTED_KWARGS)}. For beam search or other strategies, "
                        "vera_fx.merge_into(model, gm) and use model.generate")
    inner = _training_graph(gm)
    source = _source_model(inner, model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an int >= 1")
    if seed is not None and generator is not None:
        raise ValueError("pass generator= or seed=, not both")
    gen_cfg = getattr(source, "generation_config", None)
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None),
                     "eos_token_id")
    processors = _warpers(do_sample, temperature, top_k, top_p, gen_cfg)
    inputs = model_inputs(source, input_ids, attention_mask)
    reason = eager_reason(source, inner, inputs["input_ids"].shape[1] + max_new_tokens
                          if "input_ids" in inputs else None, cache_bucket)
    if reason is not None:
        if generator is not None or compile:
            raise ValueError(f"generate runs transformers' own loop for {type(source).__name__} ({reason}): "
                             f"{'generator=' if generator is not None else 'compile=True'} is not supported "
                             "there; pass seed= for reproducible sampling, and leave compile off")
        logger.info("generate: transformers' loop with the adapters hooked at their sites (%s)", reason)
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_token_id=eos, pad_token_id=pad_token_id)
        return generate_eager(inner, source, inputs, seed=seed,
                              **{k: v for k, v in options.items() if v is not None})
    pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    if pad is None and eos is not None:
        pad = eos[0]
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(int(seed))
    batch, prompt_len = input_ids.shape
    max_len = cache_bucket(prompt_len + max_new_tokens)
    graph, step = decode_graph(inner, batch, max_len, model=source, compile=compile)
    sampler = _Sampler(do_sample, processors, generator, eos, pad)
    return _decode_loop(graph, step, inputs["input_ids"], inputs["attention_mask"], max_new_tokens, max_len,
                        sampler, next(p.device for p in source.parameters()))


@dataclass
class _Sampler:
    """Picks each next token: greedy, or sampled through the warpers; finished sequences get ``pad``."""

    do_sample: bool
    processors: LogitsProcessorList
    generator: Optional[torch.Generator]
    eos: Optional[list[int]]
    pad: Optional[int]

    def pick(self, scores: torch.Tensor, so_far: list[torch.Tensor]) -> torch.Tensor:
        if not self.do_sample:
            return scores.argmax(-1)
        scores = self.processors(torch.cat(so_far, 1), scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


def _decode_loop(graph: GraphModule, step: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 max_len: int, sampler: _Sampler, device: torch.device) -> torch.Tensor:
    """Prefill the prompt through ``graph``, then decode one token per ``step`` call."""
    batch, prompt_len = ids.shape
    ids = ids.to(device=device, dtype=torch.long)
    mask = mask.to(device)
    cache_mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
    cache_mask[:, :prompt_len] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' rule (left padding)
    logits = graph(input_ids=ids, attention_mask=cache_mask, position_ids=positions,
                   cache_position=torch.arange(prompt_len, device=device))
    eos_t = torch.tensor(sampler.eos, device=device) if sampler.eos is not None else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    out = [ids]
    last_pos = positions[:, -1:]
    for t in range(max_new_tokens):
        token = sampler.pick(logits[:, -1, :].float(), out)
        if eos_t is not None:
            token = torch.where(unfinished, token, torch.full_like(token, sampler.pad))
        out.append(token[:, None])
        if eos_t is not None:
            unfinished &= ~torch.isin(token, eos_t)
            if not bool(unfinished.any()):
                break
        if t == max_new_tokens - 1:
            break
        slot = prompt_len + t
        cache_mask[:, slot] = 1
        last_pos = last_pos + 1
        logits = step(input_ids=token[:, None], attention_mask=cache_mask, position_ids=last_pos,
                      cache_position=torch.tensor([slot], device=device))
    return torch.cat(out, dim=1)


def _warpers(do_sample: bool, temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
             gen_cfg: Any) -> LogitsProcessorList:
    """transformers' sampling warpers in its order (temperature, top-k, top-p); unset values from the
    model's generation_config."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if not do_sample:
        return processors
    temperature = temperature if temperature is not None else getattr(gen_cfg, "temperature", None) or 1.0
    top_k = top_k if top_k is not None else getattr(gen_cfg, "top_k", None)
    top_p = top_p if top_p is not None else getattr(gen_cfg, "top_p", None)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a float > 0 (do_sample=False for "
                         "greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} is invalid: expected an int >= 0 (0 or None: no top-k filtering)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} is invalid: expected a float in (0, 1]")
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return processors
