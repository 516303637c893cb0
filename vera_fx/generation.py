"""Text generation through the adapted graph, with a KV cache.

``generate`` runs a *decode graph*: the user's causal LM with a transformers ``StaticCache`` held as buffers,
exported once per batch size and cache length (a bucket) with the query length dynamic (one graph serves the
prefill and every step; a 2D mask over the cache makes left padding work), rooted at the model so that its
tensors have the training graph's names. It gets the live adapters' nodes over the training graph's adapter
state and, for each ``generate``, the training graph's tensors (``bind_parameters``), so training or a switch is
seen without re-capturing. The model is the one ``capture`` recorded or ``generate(..., model=...)``; only its
architecture is used. Models the decode graph cannot cover run transformers' own loop (eager_generation.py).
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.logits_process import LogitsProcessorList

from .capture import SOURCE_MODEL_KEY, CaptureError, model_flags_kept
from .eager_generation import bind_parameters, eager_reason, generate_eager, kl_terms_kept, model_inputs
from .linear_like import linear_forwards
from .methods import CONTAINER
from .passes.attach import emit_layout, live_layout
from .passes.infer import DEFAULT_FORM, INFERENCE_KEY, bind_flat_reads
from .passes.match import MatchPass
from .state import adapter_container, reads_state, set_adapters_training
from .sites import MODEL_INFO_KEY, SITE_KEY, as_graph_module, model_info, read_sites

logger = logging.getLogger(__name__)

_PREFIX = "model."  # the user's model sits at ``model`` inside the decode wrapper
_MIN_BUCKET = 64
_CACHE_TENSORS = ("keys", "values", "cumulative_length")  # of each cache layer, registered as buffers
# transformers' cache and generation modules are imported where used (about 2.7 s on a first import)


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


def check_can_generate(model: nn.Module) -> None:
    """ValueError unless ``model`` is a decoder-only transformers causal LM vera_fx can generate with."""
    from transformers import PreTrainedModel
    from transformers.configuration_utils import get_head_shapes

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"generate needs a transformers causal LM (…ForCausalLM / …LMHeadModel), got {name}")
    if not model.can_generate() or model.get_output_embeddings() is None:
        raise ValueError(f"{name} cannot generate text: it has no language-model head (it is an encoder or a "
                         "classifier). generate supports causal LMs (…ForCausalLM / …LMHeadModel, e.g. Llama, "
                         "GPT-2, Mistral) and encoder-decoder models (…ForConditionalGeneration: T5, BART, Whisper)")
    if getattr(model.config, "is_encoder_decoder", False):
        return
    try:
        get_head_shapes(model.config.get_text_config())
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
    """Export ``model`` with a static KV cache of ``batch_size`` x ``max_cache_len``, its sites and tensors under the
    model's own names (the training graph's); the model's flags are left as they were."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: the decode graph is for decoder-only "
                         "causal LMs; vera_fx.generate runs transformers' loop with the adapters hooked for it")
    device = next(p.device for p in model.parameters())
    with model_flags_kept(model), linear_forwards(model):  # Falcon-style linears stay sites (linear_like)
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
        except ValueError:
            raise
        except Exception as e:
            raise CaptureError(f"torch.export could not capture {type(model).__name__} with a static KV cache: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    decode = ep.module()
    root = decode._modules["model"]  # the new root: the model's tensors get the names they have in training
    for node in list(decode.graph.nodes):
        # generate builds every input itself: no guard call, metadata assertions or input checks (a noticeable
        # share of a one-token step)
        if not node.users and ((node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default)):
            decode.graph.erase_node(node)
        elif node.op == "get_attr" and node.target.startswith(_PREFIX):
            node.target = node.target[len(_PREFIX):]
        elif node.op == "get_attr":  # the cache buffers
            setattr(root, node.target, getattr(decode, node.target))
    decode = GraphModule(root, decode.graph)  # a plain GraphModule: no input checks
    decode.training = False  # the base model's dropout: generation is inference
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
    """The decode graph of ``gm`` for ``batch_size`` x ``max_cache_len`` with the live adapters' nodes
    (``emit_layout``; a live layout seen before puts its built graph back), and its step (the graph, or
    with ``compile`` its compiled form), both kept by the adapter set. ``generate`` binds its tensors."""
    inner = as_graph_module(gm, "generate")
    source = _source_model(inner, model)
    container = adapter_container(inner)
    weight = next(p for p in source.parameters() if p.is_floating_point())
    kind = ("decode", batch_size, max_cache_len, weight.dtype, weight.device, id(source))
    decode = container.versions.derived(
        inner, kind, None, lambda: capture_decode_graph(source, batch_size, max_cache_len))
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
    derived = adapter_container(inner).versions.derived_of(inner)
    return [graph for kind, graph in derived.items() if isinstance(kind, tuple) and kind[0] == "decode"]


def _token_ids(value: Any, name: str) -> Optional[list[int]]:
    values = [] if value is None else [value] if isinstance(value, int) else list(
        value.tolist() if isinstance(value, torch.Tensor) else value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name}={value!r} is invalid: expected a token id or a list of token ids")
    return values or None  # an empty list: no stop token


@torch.no_grad()
@reads_state
def generate(gm: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             model: Optional[nn.Module] = None, compile: bool = False, **kwargs: Any) -> torch.Tensor:
    """Up to ``max_new_tokens`` tokens per sequence from the adapted graph ``gm`` with a KV cache, returned after
    the (possibly left-padded) prompt as transformers' ``generate`` does. Greedy, or ``do_sample`` with
    ``temperature`` / ``top_k`` / ``top_p`` (unset: the model's ``generation_config``) from ``generator``, a
    generator seeded with ``seed`` or torch's. Finished sequences (``eos_token_id``) get ``pad_token_id``.
    ``compile=True`` compiles the decode step. No dropout; PVeRA samples where ``sample_at_inference`` is on."""
    if kwargs:
        supported = [n for n in inspect.signature(generate).parameters if n not in ("gm", "kwargs")]
        raise TypeError(f"generate() got unsupported keyword arguments {sorted(kwargs)}; supported: "
                        f"{', '.join(supported)}. For beam search or other strategies, vera_fx.merge_into(model, gm) "
                        "and use model.generate")
    inner = as_graph_module(gm, "generate")
    source = _source_model(inner, model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an int >= 1")
    if seed is not None and generator is not None:
        raise ValueError("pass generator= or seed=, not both")
    gen_cfg = getattr(source, "generation_config", None)
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None),
                     "eos_token_id")
    processors = _warpers(temperature, top_k, top_p, gen_cfg) if do_sample else None
    inputs = model_inputs(source, input_ids, attention_mask)
    reason = eager_reason(source, inner, cache_bucket(inputs["input_ids"].shape[1] + max_new_tokens)
                          if "input_ids" in inputs else None)
    if reason is not None:
        if generator is not None or compile:
            raise ValueError(f"generate runs transformers' own loop for {type(source).__name__} ({reason}): "
                             f"{'generator=' if generator is not None else 'compile=True'} is not supported "
                             "there; pass seed= for reproducible sampling, and leave compile off")
        logger.info("generate: transformers' loop with the adapters hooked at their sites (%s)", reason)
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos, pad_token_id=pad_token_id)
        return generate_eager(inner, source, inputs, seed=seed, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              **{k: v for k, v in options.items() if v is not None})
    pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(int(seed))
    max_len = cache_bucket(input_ids.shape[1] + max_new_tokens)
    graph, step = decode_graph(inner, input_ids.shape[0], max_len, model=source, compile=compile)
    device = next(p.device for p in source.parameters())
    ids, mask = inputs["input_ids"].to(device=device, dtype=torch.long), inputs["attention_mask"].to(device)
    bind_parameters(graph, inner)  # kept bound: a generate in another thread may be running it
    with kl_terms_kept(inner):  # a step records PVeRA's KL terms: not kept
        return _decode_loop(graph, step, ids, mask, max_new_tokens, max_len, processors, generator, eos,
                            pad if pad is not None or eos is None else eos[0])


def _decode_loop(graph: GraphModule, step: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 max_len: int, processors: Optional[LogitsProcessorList], generator: Optional[torch.Generator],
                 eos: Optional[list[int]], pad: Optional[int]) -> torch.Tensor:
    """Prefill the prompt through ``graph``, then one token per ``step`` call (greedy, or sampled through
    ``processors``); finished sequences get ``pad``."""
    batch, prompt_len = ids.shape
    device = ids.device
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
    """transformers' sampling warpers in its order (temperature, top-k, top-p); unset values from the
    model's generation_config."""
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
