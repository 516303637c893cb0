"""Match pass: tag every linear-like call as a site (one recogniser per site kind, ``RECOGNISERS``: the seam the
quantized kinds plug into), and select the sites a config targets by PEFT's rules."""

from __future__ import annotations

import difflib
import logging
import re
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import DEFAULT_TARGET_MODULES, AdapterConfig
from .. import quantized
from ..block_export import EAGER_TOP
from ..sites import SITE_KEY, Candidate, Site, block_prefix, graph_modules, model_info, module_path, read_sites

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _attr_target(node: object) -> Optional[str]:
    return node.target if isinstance(node, Node) and node.op == "get_attr" else None


def _shape(node: object) -> Optional[tuple[int, ...]]:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _linear(node: Node) -> Optional[Candidate]:
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    w_shape = _shape(node.args[1])
    if w_shape is None or len(w_shape) != 2:
        return None
    owner, typ = module_path(node)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return Candidate(node, "linear", owner, typ, w_shape[1], w_shape[0], _attr_target(node.args[1]),
                     _attr_target(bias))


def _conv1d(node: Node) -> Optional[Candidate]:
    # transformers' Conv1D: view(x, [-1, in]) -> addmm(bias, ., weight[in, out]) -> view(., [..., out])
    if node.op != "call_function" or node.target is not aten.addmm.default:
        return None
    owner, typ = module_path(node)
    if typ != "Conv1D":
        return None
    flat, users, w_shape = node.args[1], list(node.users), _shape(node.args[2])
    if not (isinstance(flat, Node) and flat.target is aten.view.default and len(users) == 1
            and users[0].target is aten.view.default and w_shape is not None):
        return None
    return Candidate(node, "conv1d", owner, typ, w_shape[0], w_shape[1], _attr_target(node.args[2]),
                     _attr_target(node.args[0]))


# The seam for more site kinds: each recogniser maps a node to a Candidate or None.
RECOGNISERS: list[Callable[[Node], Optional[Candidate]]] = [_linear, _conv1d, quantized.recognise]


def _name_candidates(cands: list[Candidate]) -> dict[Node, str]:
    """Site names: a linear layer's module path; a functional call's owner path, plus the weight's attribute name
    when the owner calls several weights."""
    by_owner: dict[str, list[Candidate]] = {}
    for c in cands:
        by_owner.setdefault(c.owner, []).append(c)
    names: dict[Node, str] = {}
    for owner, group in by_owner.items():
        keys = [c.weight or f"<call {i}>" for i, c in enumerate(group)]
        weights = list(dict.fromkeys(keys))
        for c, key in zip(group, keys):
            if len(weights) == 1 and owner:
                names[c.node] = owner
                continue
            if c.weight and (not owner or c.weight.startswith(owner + ".")):
                rel = c.weight[len(owner) + 1:] if owner else c.weight
                rel = rel.removesuffix(".weight") if rel != ".weight" else rel
            else:
                rel = f"linear_{weights.index(key)}"
            names[c.node] = f"{owner}.{rel}" if owner else rel
    return names


class MatchPass(PassBase):
    """Tag every linear-like call with ``node.meta[SITE_KEY]`` (name, kind, shapes, weight, bias)."""

    def call(self, graph_module: GraphModule) -> PassResult:
        return PassResult(graph_module, any([self._match_graph(g) for g in graph_modules(graph_module)]))

    @staticmethod
    def _match_graph(graph_module: GraphModule) -> bool:
        prefix = block_prefix(graph_module)

        def full(name: Optional[str]) -> Optional[str]:
            return None if name is None else (f"{prefix}.{name}" if name else prefix) if prefix else name

        cands = []
        for node in graph_module.graph.nodes:
            c = None if SITE_KEY in node.meta else next(filter(None, (r(node) for r in RECOGNISERS)), None)
            if c is not None:
                c.owner, c.weight, c.bias = full(c.owner), full(c.weight), full(c.bias)
                cands.append(c)
        names = _name_candidates(cands)
        for c in cands:
            c.node.meta[SITE_KEY] = {"name": names[c.node], "kind": c.kind, "in_features": c.in_features,
                                     "out_features": c.out_features, "weight": c.weight, "bias": c.bias,
                                     "owner_type": c.owner_type}
        logger.debug("match: %d linear-like calls in %s", len(cands), prefix or "the top graph")
        return bool(cands)


_DEFAULT_ALTERNATIVES = (["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["c_attn"])


def _named(key: str, target: str) -> bool:
    """Whether module path ``key`` is ``target`` or ends with ``.<target>`` (a list entry's rule)."""
    return key == target or key.endswith("." + target)


def _saved(key: str, config: AdapterConfig) -> bool:
    """Whether ``key`` is, or is inside, a module of ``modules_to_save`` (never adapted)."""
    return bool(config.modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", key)
                                                for m in config.modules_to_save)


def _targets(config: AdapterConfig, info: dict, names: list[str]) -> object:
    """The config's target_modules, or the architecture's default: the first naming of the attention projections
    the model has (releases rename them: ViT's query/value became q_proj/v_proj)."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = info.get("model_type")
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"target_modules=None but model_type={model_type!r} has no default targets; pass "
                         f"target_modules (module-name suffixes, a regex or 'all-linear'). Defaults exist for: "
                         f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}")
    targets = list(DEFAULT_TARGET_MODULES[model_type])
    for option in [targets, *_DEFAULT_ALTERNATIVES]:
        if all(any(_named(n, t) for n in names) for t in option):
            if option is not targets:
                logger.info("default targets %s not in this model; using %s", targets, option)
            return option
    return targets


def layer_index(key: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    """The layer number PEFT reads from a module path: the first integer component after a layers_pattern
    name, or with no pattern the first integer component after at least two others (PEFT's regexes)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = match or re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
    return int(match.group("idx")) if match else None


def _layer_filter(config: AdapterConfig) -> Optional[set[int]]:
    """The layer indices ``layers_to_transform`` keeps, or None for no filter (None or [], as in PEFT)."""
    ltt = config.layers_to_transform
    if isinstance(ltt, int):
        return {ltt}
    return set(ltt) if ltt else None


def _selected(keys: Iterable[str], targets: object, config: AdapterConfig) -> set[str]:
    """The ``keys`` PEFT's rules select for ``targets``: a regex fully matched; of a list, an exact name whatever
    the layer filter says, a suffix match in the layers ``layers_to_transform`` keeps."""
    if isinstance(targets, str):
        return {k for k in keys if re.fullmatch(targets, k)}
    layers = _layer_filter(config)
    return {k for k in keys if k in targets or (any(_named(k, t) for t in targets) and (
        layers is None or layer_index(k, config.layers_pattern) in layers))}


def peft_selection(info: dict, targets: object, config: AdapterConfig) -> set[str]:
    """The module paths PEFT's own rules (no extension) select for ``targets`` (a list or a regex)."""
    return _selected([k for k in info.get("modules", {}) if not _saved(k, config)], targets, config)


def select_sites(graph_module: GraphModule, config: AdapterConfig) -> list[Site]:
    """The sites of ``graph_module`` that ``config`` targets, in graph order (one per site name): PEFT's rules,
    plus a name or regex matching a module that holds linear layers (which PEFT refuses) adapts those."""
    info = model_info(graph_module)
    _check_eager_modules_to_save(graph_module, info, config)
    all_sites = read_sites(graph_module)
    names = [n for n in dict.fromkeys(s.name for s in all_sites) if not _saved(n, config)]
    targets = _targets(config, info, names)
    if isinstance(targets, str) and _layer_filter(config) is not None:
        warnings.warn(f"layers_to_transform={config.layers_to_transform!r} has no effect with "
                      f"target_modules={targets!r} (a string), as in PEFT: give a list of module names to "
                      "filter by layer, or put the layer indices in the regex", UserWarning, stacklevel=4)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        picked = _all_linear(info, names, config)
    else:
        targets = targets if isinstance(targets, str) else list(targets)
        picked = _pick(info, names, targets, config)
    _refuse_non_linear(info, picked, targets)
    chosen = [n for n in names if n in picked]
    if not chosen:
        raise ValueError(f"target_modules={targets!r} matched no linear layer in {info.get('class', 'the model')}")
    first = {s.name: s for s in reversed(all_sites)}
    return [first[n] for n in chosen]


def _pick(info: dict, names: list[str], targets: Union[str, list], config: AdapterConfig) -> set[str]:
    """The site names a regex or a list selects (containers too); a list entry matching nothing warns or raises."""
    containers: dict[str, list[str]] = {}
    sites = set(names)
    for path in info.get("modules", {}):
        inside = [n for n in names if n.startswith(path + ".")]
        if inside and path not in sites and not _saved(path, config):
            containers[path] = inside
    picked = _selected(names, targets, config) | {n for path in _selected(containers, targets, config)
                                                 for n in containers[path]}
    if isinstance(targets, str):
        if not picked:
            raise ValueError(f"target_modules={targets!r} (a regex, matched against full module paths) "
                             f"matched no linear layer; linear layers are, e.g.: {', '.join(names[:6])}")
        return picked
    pool = set(names) | set(containers)
    unmatched = [t for t in targets if not any(_named(k, t) for k in pool)]
    refused = [t for t in unmatched if any(_named(k, t) for k in info.get("modules", {}))]
    if refused:  # PEFT refuses a target that names a module it cannot adapt (no linear layer inside)
        raise ValueError(_unmatched_message(refused[0], targets, names, info))
    if len(unmatched) == len(targets):
        raise ValueError(_unmatched_message(unmatched[0], targets, names, info))
    for t in unmatched:
        warnings.warn(_unmatched_message(t, targets, names, info) + "; the other entries are adapted (as in "
                      "PEFT)", UserWarning, stacklevel=5)
    if not picked:
        raise ValueError(f"layers_to_transform={config.layers_to_transform!r} (layers_pattern="
                         f"{config.layers_pattern!r}) left no site of target_modules={targets!r}; check the "
                         "layer indices and the pattern")
    return picked


def _refuse_non_linear(info: dict, picked: set[str], targets: object) -> None:
    """On a transformers model, refuse a selected site PEFT cannot adapt (a MoE router calls ``F.linear`` but is
    no ``nn.Linear``), so every folder loads into PEFT; plain models keep functional calls as sites."""
    linear = info.get("linear_modules")
    if linear is None or not str(info.get("module", "")).startswith("transformers."):
        return
    modules: dict[str, str] = info.get("modules", {})
    odd = sorted(n for n in picked if n in modules and n not in set(linear))
    if odd:
        raise ValueError(
            f"target_modules={targets!r} selects {odd[0]!r}{f' (and {len(odd) - 1} more)' if len(odd) > 1 else ''}, "
            f"a {modules[odd[0]]}, not an nn.Linear or Conv1D: PEFT refuses it (\"Target module "
            f"{modules[odd[0]]}() is not supported\"), so its folder would not load into PEFT. Target the linear "
            "layers instead (attention / MLP projections, or 'all-linear', which leaves routers out); MoE experts "
            "held as fused 3-D parameters are adapted by neither PEFT's VeRA nor vera_fx")


def _check_eager_modules_to_save(gm: GraphModule, info: dict, config: AdapterConfig) -> None:
    """Refuse ``modules_to_save`` naming a module of an eager top level: the graph reads copies only in blocks."""
    reason = gm.meta.get(EAGER_TOP)
    if reason is None or not config.modules_to_save:
        return
    blocks = [block_prefix(g) for g in graph_modules(gm)[1:]]
    outside = [k for k in info.get("modules", {})
               if _saved(k, config) and not any(k == b or k.startswith(b + ".") for b in blocks)]
    if outside:
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r} (task_type={config.task_type!r}) names {outside[0]!r}, which "
            f"runs in the model's eager top level: torch.export could not capture the code around the layers "
            f"({reason}), so no trainable copy of it can be swapped in. Capture with inputs export can follow (e.g. "
            "without labels, computing the loss outside the model, or with config.problem_type set), or drop it "
            "from modules_to_save / task_type")


def _all_linear(info: dict, names: list[str], config: AdapterConfig) -> set[str]:
    """PEFT's "all-linear": the ``nn.Linear`` / ``Conv1D`` sites but the output head (every site but the head of a
    graph captured without the module list)."""
    head = info.get("output_head")
    linear = info.get("linear_modules")
    allowed = set(linear) if linear is not None else set(names)
    missing = [p for p in linear or () if p != head and p not in names and not _saved(p, config)]
    if missing:
        warnings.warn(f"target_modules='all-linear': {len(missing)} linear module(s) that PEFT adapts make no linear "
                      f"call vera_fx can adapt and are left out (e.g. {', '.join(missing[:3])}): they are not called "
                      "with these inputs, compute something else than weight @ x + bias, or run in the model's "
                      "eager top level (vera_fx.capture logs when it falls back to one)", UserWarning, stacklevel=5)
    return {n for n in names if n != head and n in allowed}


def _unmatched_message(target: str, targets: list, names: list[str], info: dict) -> str:
    named = [(n, t) for n, t in info.get("modules", {}).items() if _named(n, target)]
    msg = f"target_modules={targets!r}: {target!r} matched no linear layer"
    path, kind = named[0] if named else ("", "")
    what = f"{path!r} is {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"
    if named and path in set(info.get("linear_modules") or ()):
        msg += (f" ({what}, a linear layer PEFT adapts, but the captured forward makes no linear call "
                "of it vera_fx can adapt: it is not called with these inputs, or its own forward is not "
                "weight @ x + bias; drop it from target_modules)")
    elif named:
        msg += (f" ({what}, not a linear layer, and holds none; PEFT refuses it too: "
                "drop it or target linear layers instead)")
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    close = difflib.get_close_matches(target, sorted(leaves | set(names)), n=5, cutoff=0.5)
    if close:
        return msg + f"; close names: {', '.join(close)}"
    return msg + f"; linear layers are named, e.g.: {', '.join(sorted(leaves)[:8])}"
