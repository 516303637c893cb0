"""``generate`` through a *decode graph*: the user's causal LM with a ``StaticCache`` as buffers, exported once per
batch size, cache bucket, dtype and device with the query length dynamic, rooted at the model so its tensors have
the training graph's names, which it reads per call (``graph_parameters``). What it cannot cover runs transformers'
loop instead, each live site module hooked to a *site graph* ``(x, y) -> y + adapter(x)`` over the same state."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.export import Dim
from torch.fx import Graph, GraphModule

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.logits_process import LogitsProcessorList

from .block_export import strip_metadata_asserts
from .capture import SOURCE_MODEL_KEY, CaptureError, model_flags_kept
from .quantized import QUANTIZED_KINDS, linear_forwards, no_cpu_packing
from .methods import CONTAINER
from .methods.pvera import KLRecord
from .variants import bind_tensors, emit_layout, live_layout, tensors_bound
from .passes.infer import DEFAULT_FORM, INFERENCE_KEY, bind_flat_reads
from .passes.match import MatchPass
from .state import (active_adapters, adapter_container, adapters_disabled, adapters_of, modules_to_save_copy,
                    modules_to_save_owners, reads_state, set_adapters_training)
from .sites import (MODEL_INFO_KEY, SITE_KEY, Site, as_graph_module, graph_modules, model_info,
                    read_sites)

logger = logging.getLogger(__name__)

_PREFIX = "model."  # the user's model sits at ``model`` inside the decode wrapper
_MIN_BUCKET = 64
_CACHE_TENSORS = ("keys", "values", "cumulative_length")  # of each cache layer, registered as buffers


class _DecodeModule(nn.Module):
    """The user's causal LM with a ``StaticCache`` as buffers, a 2D mask and position ids (left padding)."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_cache_len: int) -> None:
        from transformers import StaticCache  # transformers' cache: about 2.7 s on a first import
        from transformers.cache_utils import DummyLayer, StaticLayer, StaticSlidingWindowLayer
        from transformers.configuration_utils import get_head_shapes

        super().__init__()
        self.model = model
        config = model.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_cache_len, config=config)
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer):  # exact while the window never slides (eager_reason)
                self.cache.layers[i] = StaticLayer(max_cache_len)
            elif isinstance(layer, DummyLayer):
                self.cache.layers[i] = StaticLayer(0)
        num_heads, head_dim = get_head_shapes(config)
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.cache.early_initialization(batch_size, num_heads, head_dim, weight.dtype, weight.device)
        for i, layer in enumerate(self.cache.layers):
            for attr in _CACHE_TENSORS:
                self.register_buffer(f"{attr}_{i}", getattr(layer, attr), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            for attr in _CACHE_TENSORS:  # non-strict export swaps the buffers for traced ones: use those
                setattr(layer, attr, getattr(self, f"{attr}_{i}"))
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits


def _source_model(gm: GraphModule, model: Optional[nn.Module]) -> PreTrainedModel:
    """``model`` or the one ``gm`` was captured from; ValueError unless it is a transformers model that generates."""
    from transformers import PreTrainedModel
    from transformers.configuration_utils import get_head_shapes

    if model is None:
        ref = gm.meta.get(SOURCE_MODEL_KEY)
        model = ref.model if ref is not None else None
        if model is None:
            raise ValueError("this graph holds no reference to the model it was captured from (it was pickled, "
                             "or made by an older vera_fx): pass generate(..., model=<that model>)")
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"generate needs a transformers causal LM (…ForCausalLM / …LMHeadModel), got {name}")
    if not model.can_generate() or model.get_output_embeddings() is None:
        raise ValueError(f"{name} cannot generate text: it has no language-model head (it is an encoder or a "
                         "classifier). generate supports causal LMs (…ForCausalLM / …LMHeadModel, e.g. Llama, "
                         "GPT-2, Mistral) and encoder-decoder models (…ForConditionalGeneration: T5, BART, Whisper)")
    if getattr(model.config, "is_encoder_decoder", False):
        return model
    try:
        get_head_shapes(model.config.get_text_config())
    except Exception as e:  # configs without attention head counts
        raise ValueError(f"{name}: cannot size a key/value cache from its config ({e}); generate supports "
                         "attention decoders such as Llama, GPT-2, OPT, Mistral, Qwen2") from e
    return model


def cache_bucket(length: int) -> int:
    """The cache length for ``length`` positions: the next of 64, 96, 128, 192, ... (at most a third unused)."""
    size = _MIN_BUCKET
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def capture_decode_graph(model: PreTrainedModel, batch_size: int, max_cache_len: int) -> GraphModule:
    """Export ``model`` (``eager_reason`` is None) with a static KV cache of ``batch_size`` x ``max_cache_len``."""
    device = next(p.device for p in model.parameters())
    with model_flags_kept(model), linear_forwards(model):  # Falcon-style linears stay sites (quantized)
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            example = {"input_ids": torch.zeros(batch_size, 2, dtype=torch.long, device=device),
                       "attention_mask": torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device),
                       "position_ids": torch.arange(2, device=device).expand(batch_size, 2).clone(),
                       "cache_position": torch.arange(2, device=device)}
            q = Dim("q", min=1, max=max_cache_len)
            dynamic = {"input_ids": {1: q}, "attention_mask": None, "position_ids": {1: q}, "cache_position": {0: q}}
            ep = torch.export.export(_DecodeModule(model, batch_size, max_cache_len), (), example, strict=False,
                                     dynamic_shapes=dynamic)
        except Exception as e:
            raise CaptureError(f"torch.export could not capture {type(model).__name__} with a static KV cache: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    decode = ep.module()
    root = decode._modules["model"]  # the new root: the model's tensors get the names they have in training
    strip_metadata_asserts(decode, guards=True)  # generate builds every input itself: checks cost a share of a step
    for node in decode.graph.nodes:
        if node.op == "get_attr" and node.target.startswith(_PREFIX):
            node.target = node.target[len(_PREFIX):]
        elif node.op == "get_attr":  # the cache buffers
            setattr(root, node.target, getattr(decode, node.target))
    decode = GraphModule(root, decode.graph)  # a plain GraphModule (no input checks), in eval mode
    decode.training = False
    MatchPass()(decode)
    for node in decode.graph.nodes:
        tag = node.meta.get(SITE_KEY)
        if tag is not None:
            tag["name"] = tag["name"].removeprefix(_PREFIX)
    decode.meta[MODEL_INFO_KEY] = {"class": type(model).__name__}
    decode.meta[INFERENCE_KEY] = DEFAULT_FORM  # adapters in the inference form (vera_fx/passes/infer.py)
    logger.info("captured the decode graph of %s: batch %d, cache %d, %d nodes", type(model).__name__, batch_size,
                max_cache_len, len(decode.graph.nodes))
    return decode


def decode_graph(inner: GraphModule, source: PreTrainedModel, batch_size: int, max_cache_len: int,
                 compile: bool = False) -> tuple[GraphModule, Any]:
    """The decode graph of ``source`` for ``batch_size`` x ``max_cache_len``, captured with ``inner``'s tensors
    bound in (their dtype and device) with the live layout's nodes, and its step (``compile``: compiled)."""
    container, named = adapter_container(inner), graph_parameters(inner)
    weight = next(p for n, p in named if not n.startswith(CONTAINER) and p.is_floating_point())
    kind = ("decode", batch_size, max_cache_len, weight.dtype, weight.device, id(source))

    def capture() -> GraphModule:
        with tensors_bound(source, named):
            return capture_decode_graph(source, batch_size, max_cache_len)

    decode = container.versions.derived(inner, kind, None, capture)
    layout = live_layout(inner)
    key = ("decode", tuple((name, id(container[name]), sites) for name, sites in layout))
    if container.versions.current(decode) != key:
        have = {s.name for s in read_sites(decode)}
        for name, sites in layout:
            missing = sorted(set(sites) - have)
            if missing:
                raise ValueError(f"adapter {name!r}: sites {missing[:5]} are not in the decode graph of "
                                 f"{model_info(decode)['class']}; pass model= the model the graph was "
                                 "transformed from")
        decode._modules[CONTAINER] = container  # the training graph's AdapterState objects and parameters
        container.versions.switch(decode, [decode], None, key,
                                  lambda: (emit_layout(decode, layout), set_adapters_training(decode, False)))
        bind_flat_reads(decode)
        logger.debug("decode graph bound to adapters %s", [name for name, _ in layout])
    if not compile:
        return decode, decode
    return decode, container.versions.derived(inner, ("compiled", *kind), key,
                                              lambda: torch.compile(decode, fullgraph=True, dynamic=False))


def decode_graphs(gm: nn.Module) -> list[GraphModule]:
    """The decode graphs ``gm`` holds now, one per decode shape."""
    inner = as_graph_module(gm, "generate")
    return [g for kind, g in adapter_container(inner).versions.derived_of(inner).items() if kind[0] == "decode"]


def _token_ids(value: Any, name: str) -> Optional[list[int]]:
    values = [] if value is None else [value] if isinstance(value, int) else list(
        value.tolist() if isinstance(value, torch.Tensor) else value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name}={value!r} is invalid: expected a token id or a list of token ids")
    return values or None  # an empty list: no stop token


@torch.no_grad()
@reads_state
def generate(gm: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
             temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             model: Optional[nn.Module] = None, compile: bool = False, **kwargs: Any) -> torch.Tensor:
    """The (left-padded) prompt and up to ``max_new_tokens`` tokens per sequence, as transformers' ``generate``
    returns them, greedy or sampled (unset options: the model's ``generation_config``). Any other keyword of
    transformers' ``generate`` runs its own loop with the adapters hooked. No dropout; PVeRA samples where
    ``sample_at_inference`` is on."""
    inner = as_graph_module(gm, "generate")
    source = _source_model(inner, model)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an int >= 1")
    if seed is not None and generator is not None:
        raise ValueError("pass generator= or seed=, not both")
    gen_cfg = getattr(source, "generation_config", None)
    asked_sample = do_sample
    if do_sample is None:
        do_sample = bool(getattr(gen_cfg, "do_sample", False))
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None),
                     "eos_token_id")
    processors = _warpers(temperature, top_k, top_p, gen_cfg) if do_sample else None
    inputs = model_inputs(source, input_ids, attention_mask)
    prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else None  # None: an encoder's features
    new_tokens = None if kwargs or prompt is None else _new_tokens(max_new_tokens, gen_cfg, source, prompt)
    if kwargs:
        reason: Optional[str] = f"keywords the decode graph's loop does not take: {', '.join(sorted(kwargs))}"
    elif prompt is not None and new_tokens is None:
        reason = "the prompt reaches the generation_config's max_length or the model's max_position_embeddings"
    else:
        reason = eager_reason(source, inner, cache_bucket(prompt + new_tokens) if new_tokens else None)
    if reason is not None:
        if generator is not None or compile:
            raise ValueError(f"generate runs transformers' own loop for {type(source).__name__} ({reason}): "
                             f"{'generator=' if generator is not None else 'compile=True'} is not supported "
                             "there; pass seed= for reproducible sampling, and leave compile off")
        logger.info("generate: transformers' loop with the adapters hooked at their sites (%s)", reason)
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=pad_token_id,
                     eos_token_id=eos if eos_token_id is not None else None, max_new_tokens=max_new_tokens,
                     do_sample=asked_sample)  # as the user set them: the rest is transformers' to fill
        return generate_eager(inner, source, inputs, seed=seed, **{k: v for k, v in given.items() if v is not None},
                              **kwargs)
    pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    max_len = cache_bucket(input_ids.shape[1] + new_tokens)
    graph, step = decode_graph(inner, source, input_ids.shape[0], max_len, compile=compile)
    device = next(graph.parameters()).device
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    ids, mask = inputs["input_ids"].to(device=device, dtype=torch.long), inputs["attention_mask"].to(device)
    with one_at_a_time(graph), kl_terms_kept(inner):  # its KV cache is the graph's buffers; KL terms: not kept
        bind_tensors(graph, graph_parameters(inner))  # kept bound after: nothing else holds these names
        return _decode_loop(graph, step, ids, mask, new_tokens, max_len, processors, generator, eos,
                            pad if pad is not None or eos is None else eos[0])


_RUNNING: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()


def one_at_a_time(owner: nn.Module) -> threading.Lock:
    """The lock that runs one generation at a time through ``owner`` (a decode graph's KV cache is its buffers)."""
    return _RUNNING.setdefault(owner, threading.Lock())


def _new_tokens(max_new_tokens: Optional[int], gen_cfg: Any, source: nn.Module, prompt_len: int) -> Optional[int]:
    """The most tokens transformers' ``generate`` adds (None: none, its loop warns)."""
    given = max_new_tokens if max_new_tokens is not None else getattr(gen_cfg, "max_new_tokens", None)
    if given is not None:
        return int(given)
    limit = getattr(gen_cfg, "max_length", None) or min(
        prompt_len + 20, getattr(source.config.get_text_config(), "max_position_embeddings", None) or 1 << 62)
    return int(limit) - prompt_len if int(limit) > prompt_len else None


def _decode_loop(graph: GraphModule, step: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 max_len: int, processors: Optional[LogitsProcessorList], generator: Optional[torch.Generator],
                 eos: Optional[list[int]], pad: Optional[int]) -> torch.Tensor:
    """Prefill through ``graph``, then a token per ``step`` call (greedy, or sampled through ``processors``)."""
    (batch, prompt_len), device = ids.shape, ids.device
    cache_mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
    cache_mask[:, :prompt_len] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' rule (left padding)
    feed, slots = ids, torch.arange(prompt_len, device=device)
    eos_t = torch.tensor(eos, device=device) if eos is not None else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    out = [ids]
    for t in range(max_new_tokens):
        logits = (step if t else graph)(input_ids=feed, attention_mask=cache_mask, position_ids=positions,
                                        cache_position=slots)
        scores = logits[:, -1, :].float()
        if processors is None:
            token = scores.argmax(-1)
        else:
            probs = torch.softmax(processors(torch.cat(out, 1), scores), dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        if eos_t is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            unfinished &= ~torch.isin(token, eos_t)
        out.append(token[:, None])
        if eos_t is not None and not bool(unfinished.any()):
            break
        cache_mask[:, prompt_len + t] = 1
        feed, positions = token[:, None], positions[:, -1:] + 1
        slots = torch.tensor([prompt_len + t], device=device)
    return torch.cat(out, dim=1)


def _warpers(temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
             gen_cfg: Any) -> LogitsProcessorList:
    """transformers' sampling warpers in its order; unset values from the model's generation_config."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

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
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return processors


# ------------------------------------------------------------------- transformers' loop with hooked sites

def site_base(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A site graph's site call: the module's output ``y`` (``x``: its input)."""
    return y


@contextlib.contextmanager
def kl_terms_kept(gm: GraphModule) -> Iterator[None]:
    """The PVeRA KL terms of ``gm``'s tree put back on exit (tracing and generation keep the last forward's)."""
    records = {id(v): (v, dict(v.values)) for g in graph_modules(gm) for state in adapters_of(g).values()
               for v in vars(state).values() if isinstance(v, KLRecord)}
    try:
        yield
    finally:
        for record, values in records.values():
            record.values = values


def graph_parameters(gm: GraphModule) -> list[tuple[str, nn.Parameter]]:
    """``gm``'s parameters by name, a live adapter's ``modules_to_save`` copy's under the copied module's path:
    what the eager model or a decode graph binds to compute as ``gm`` does."""
    container = adapters_of(gm)
    theirs = dict(gm.named_parameters(remove_duplicate=False))
    live = [] if adapters_disabled(gm) else active_adapters(gm)  # merged ones too: the graphs route their copies
    for path, name in modules_to_save_owners(gm, live).items():
        copy = modules_to_save_copy(container[name], path)
        theirs.update((f"{path}.{n}", p) for n, p in copy.named_parameters(remove_duplicate=False))
    return list(theirs.items())


def site_graph(container: nn.Module, site: Site, adapters: Sequence[str], x_dtype: torch.dtype,
               y_dtype: torch.dtype) -> GraphModule:
    """``(x, y) -> y + sum of the adapters at site``, reading ``container``'s state."""
    graph = Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    x.meta["val"] = torch.empty(1, site.in_features, dtype=x_dtype, device="meta")
    y.meta["val"] = torch.empty(1, site.out_features, dtype=y_dtype, device="meta")
    base = graph.call_function(site_base, (x, y))
    base.meta["val"] = y.meta["val"]
    base.meta[SITE_KEY] = {"name": site.name, "kind": "linear", "in_features": site.in_features,
                           "out_features": site.out_features, "weight": None, "bias": None, "owner_type": "module"}
    graph.output(base)
    gm = GraphModule(nn.Module(), graph, class_name="SiteGraph")
    gm.meta[INFERENCE_KEY] = DEFAULT_FORM
    gm._modules[CONTAINER] = container  # the training graph's own adapter states (registered, not copied)
    emit_layout(gm, [(name, (site.name,)) for name in adapters])
    set_adapters_training(gm, False)
    return gm


def _site_module(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
        what = "no module" if module is None else f"a {type(module).__name__}, not a linear layer"
        raise ValueError(f"site {name!r} is {what} of {type(model).__name__} (a functional linear call inside "
                         "a module): generate adds adapters at linear layers' outputs for this model; leave "
                         "that site out of target_modules, or merge it first (vera_fx.merge)")
    return module


@contextlib.contextmanager
def adapter_hooks(gm: GraphModule, model: nn.Module) -> Iterator[int]:
    """Hook every live adapter site of ``gm`` onto its module in ``model`` while inside, adding the adapters to its
    output through a site graph per dtype pair; yields their number."""
    per_site: dict[str, list[str]] = {}
    for name, sites in live_layout(gm):
        for s in sites:
            per_site.setdefault(s, []).append(name)

    def hook(site: Site, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError(f"site {site.name!r}: {type(module).__name__} takes or returns something other "
                            f"than one tensor ({type(x).__name__} -> {type(output).__name__}); generate adds "
                            "adapters to linear-like modules only")
        key = (site.name, x.dtype, output.dtype)
        if key not in graphs:
            graphs[key] = site_graph(adapters_of(gm), site, per_site[site.name], x.dtype, output.dtype)
        return graphs[key](x, output)

    graphs: dict[tuple[str, torch.dtype, torch.dtype], GraphModule] = {}
    sites = list({s.name: s for s in read_sites(gm) if s.name in per_site}.values())
    modules = [_site_module(model, s.name) for s in sites]
    handles = [m.register_forward_hook(functools.partial(hook, s), with_kwargs=True) for s, m in zip(sites, modules)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def model_inputs(source: nn.Module, input_ids: Any, attention_mask: Any) -> dict[str, torch.Tensor]:
    """The model's inputs from generate's first two arguments (a mask of ones when None; Whisper: its features)."""
    main = getattr(source, "main_input_name", "input_ids")
    if main != "input_ids":
        if not isinstance(input_ids, torch.Tensor) or not input_ids.is_floating_point() or input_ids.dim() != 3:
            raise ValueError(f"{type(source).__name__} generates from {main} (batch, channels, frames), a float "
                             f"tensor given as the first argument; got {type(input_ids).__name__}"
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        return {main: input_ids, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.long, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got "
                         f"{type(input_ids).__name__}{tuple(getattr(input_ids, 'shape', ()))}")
    if 0 in input_ids.shape:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: give at least one token per sequence")
    if attention_mask is None:
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids, dtype=torch.long)}
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    return {"input_ids": input_ids, "attention_mask": attention_mask.to(dtype=torch.long)}


def eager_reason(source: nn.Module, gm: GraphModule, cache_length: Optional[int]) -> Optional[str]:
    """Why ``generate`` runs transformers' loop (a static cache cannot slide, for instance), or None."""
    cfg = source.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    quantized = sorted({s.kind for s in read_sites(gm) if s.kind in QUANTIZED_KINDS})
    if quantized:
        return f"bitsandbytes {'/'.join(quantized)} layers"
    window = getattr(cfg.get_text_config(), "sliding_window", None)
    if cache_length is not None and isinstance(window, int) and window > 0 and cache_length > window:
        return f"sliding_window={window} is shorter than the cache of {cache_length} positions"
    return None


def generate_eager(gm: GraphModule, model: nn.Module, inputs: dict[str, torch.Tensor], *,
                   seed: Optional[int] = None, **generate_kwargs: Any) -> torch.Tensor:
    """``model.generate`` in eval mode with ``gm``'s live adapters hooked and weights bound (``seed``: in fork_rng)."""
    device = next(p.device for p in model.parameters())
    with one_at_a_time(model), model_flags_kept(model), tensors_bound(model, graph_parameters(gm)), \
            adapter_hooks(gm, model) as hooked, no_cpu_packing(model), kl_terms_kept(gm), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        model.eval()
        if seed is not None:
            torch.manual_seed(int(seed))
        logger.debug("generate through %s.generate with %d hooked sites", type(model).__name__, hooked)
        return model.generate(**inputs, **generate_kwargs)
