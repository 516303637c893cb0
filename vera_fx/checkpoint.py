"""Adapter checkpoints in PEFT's layout (adapter_model.safetensors + adapter_config.json), and the model object's
adapter-only state dict (``vera_fx.<adapter>.<PEFT key>`` tensors, plus ``vera_fx_config.<adapter>``: the config as
JSON in a uint8 tensor). PEFT's keys are a rename of ours (``base_model.model.<site>.<p>``,
``base_model.<prefix>_A``). Loading checks every key, shape and value before it changes anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.fx import GraphModule

from .adapters import add_adapter, remove_adapter
from .checks import check_file_shapes, check_same_fields
from .compat import IncompatibleKeys
from .config import AdapterConfig, config_from_dict, config_to_dict
from .distributed import full_tensor, gathered, needs_gather, placed_like, save_role, unwrap_parallel
from .folder import open_folder, read_pickle, read_safetensors, serialise, write_folder
from .methods import CONTAINER, AdapterState
from .passes.match import peft_selection
from .passes.merge import like, merge, unmerge
from .quantized import set_slot
from .sites import as_graph_module, model_info, read_sites
from .state import (PEFT_ROOT, adapters_of, bias_targets, merged_adapters, modules_to_save_copy, mutation,
                    restore_active, state_lock)
from .versions import adapter_flags

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"  # PEFT's safe_serialization=False: read (torch's restricted unpickler), never written
STATE_KEY_PREFIX = "vera_fx."
CONFIG_KEY_PREFIX = "vera_fx_config."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for save_embedding_layers="auto"

PathLike = Union[str, os.PathLike]
Slot = tuple[nn.Module, str]  # (module, attribute) of a tensor
Plan = list[tuple[nn.Module, str, torch.Tensor, bool]]  # (module, attribute, value, replaces a base tensor)


def adapter_state(gm: GraphModule, adapter_name: str = "default") -> AdapterState:
    container = adapters_of(gm)
    if len(container) == 0:
        raise ValueError("this graph has no adapter: create one with vera_fx.transform(model, config)")
    if adapter_name not in container:
        raise ValueError(f"adapter_name={adapter_name!r} is not on this graph; adapters: {sorted(container)}")
    return container[adapter_name]


def state_dict_targets(gm: GraphModule, adapter_name: str = "default") -> dict[str, Slot]:
    """PEFT key -> (module, attribute) of every tensor the adapter's checkpoint holds, in PEFT's order."""
    gm = as_graph_module(gm, "state_dict_targets")
    state = adapter_state(gm, adapter_name)
    method = state.method
    targets: dict[str, Slot] = {}
    for site in state.site_names:
        mod = state.site_module(site)
        targets.update({method.peft_site_key(site, pname): (mod, pname) for pname in mod._parameters})
    targets.update(bias_targets(gm, state))
    if state.config.save_projection:
        targets.update({method.peft_projection_key(w): (state, f"{method.prefix}_{w}") for w in ("A", "B")})
    for path in getattr(state, "modules_to_save_paths", []):
        copy = modules_to_save_copy(state, path)
        for pname, _ in copy.named_parameters():
            sub, _, leaf = pname.rpartition(".")
            targets[f"{PEFT_ROOT}{path}.{pname}"] = (copy.get_submodule(sub) if sub else copy, leaf)
    return targets


def base_slot(gm: GraphModule, key: str) -> Optional[Slot]:
    """The base parameter or buffer ``base_model.model.<path>[.base_layer].<leaf>`` names, else None."""
    qualname = key.removeprefix(PEFT_ROOT).replace(".base_layer.", ".")
    if not key.startswith(PEFT_ROOT) or qualname.startswith(CONTAINER + "."):
        return None
    path, _, leaf = qualname.rpartition(".")
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return None
    value = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
    return (mod, leaf) if isinstance(value, torch.Tensor) else None


def adapter_state_dict(gm: GraphModule, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, FSDP2 shards gathered (a collective: call it on every rank)."""
    gm = as_graph_module(gm, "adapter_state_dict")
    state, info, targets = adapter_state(gm, adapter_name), model_info(gm), state_dict_targets(gm, adapter_name)
    # PEFT's save_embedding_layers='auto': the output head's base weights, when an embedding name is targeted
    head, names = info.get("output_head"), state.config.target_modules
    if isinstance(names, str):
        embedding = names.lower() != "all-linear" and any(
            re.fullmatch(names, k) for k in info.get("modules", {})
            if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    else:
        embedding = bool(names) and any(e in names for e in EMBEDDING_LAYER_NAMES)
    if head and head in state.site_names and embedding:
        for leaf in ("weight", "bias"):
            key = f"{PEFT_ROOT}{head}.base_layer.{leaf}"
            if key not in targets and (slot := base_slot(gm, key)) is not None:
                targets[key] = slot
    return {k: full_tensor(getattr(mod, attr).detach()) for k, (mod, attr) in targets.items()}


def _fmt_keys(keys: list[str]) -> str:
    return f"{keys[:5] or 'none'}{' ...' if len(keys) > 5 else ''} ({len(keys)})"


def _incoming(state_dict: dict[str, Any], adapter_name: str, projection_keys: dict[str, str]) -> dict[str, Any]:
    """``state_dict`` without PEFT's ``modules_to_save`` wrapper levels and in-memory adapter suffixes."""
    incoming: dict[str, Any] = {}
    for key, value in state_dict.items():
        if ".original_module." in str(key):
            continue
        norm = str(key).replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
        base, _, last = norm.rpartition(".")
        if last == adapter_name and base in projection_keys:  # PEFT's in-memory "base_model.vera_A.<adapter>"
            norm = base
        incoming[norm] = full_tensor(value) if isinstance(value, torch.Tensor) else value
    return incoming


def _check_values(incoming: dict[str, Any], targets: dict[str, Slot], shared: set[str], peers: list[str],
                  adapter_name: str, source: str) -> None:
    """ValueError naming values that do not fit what they replace, or that differ from the projections (keys
    ``shared``) the adapter shares with ``peers`` (checked, never written)."""
    bad, differ = [], []
    for key, value in incoming.items():
        mod, attr = targets[key]
        current = getattr(mod, attr)
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key}: not a tensor ({type(value).__name__})")
        elif key in shared and value.dim() == current.dim() and all(a <= b for a, b in zip(value.shape, current.shape)):
            # PEFT drew this adapter's own projections for its smaller layers: the shared ones' corner
            corner = current[tuple(slice(0, n) for n in value.shape)]
            if not torch.equal(value.to(device=corner.device, dtype=corner.dtype), corner):
                differ.append(key)
        elif tuple(value.shape) != tuple(current.shape):
            bad.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(current.shape)} on the graph")
        elif not value.is_floating_point():
            bad.append(f"{key}: dtype {value.dtype} is not a floating dtype")
    if bad:
        raise ValueError(f"{source}: does not fit adapter {adapter_name!r}: " + "; ".join(bad[:5]) +
                         (" ..." if len(bad) > 5 else "") + ". Check r and the model the adapter was trained on")
    if differ:
        raise ValueError(f"{source}: {differ[0]} differs from the projections adapter {adapter_name!r} shares with "
                         f"{peers}; loading it would change those adapters. Load this checkpoint into a graph of its "
                         "own (vera_fx.from_pretrained)")


def plan_load(gm: GraphModule, state_dict: dict[str, Any], adapter_name: str, source: str) -> tuple[Plan, list[str]]:
    """The copies to make and the projection keys ``state_dict`` lacks; ValueError naming every problem."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    state = adapter_state(gm, adapter_name)
    targets = state_dict_targets(gm, adapter_name)
    projection_keys = {state.method.peft_projection_key(w): f"{state.method.prefix}_{w}" for w in ("A", "B")}
    incoming = _incoming(state_dict, adapter_name, projection_keys)
    for key, attr in projection_keys.items():
        if key in incoming:  # save_projection=False but the file has them: use them, as PEFT does
            targets[key] = (state, attr)
    # Base weights PEFT saves beside the adapter (save_embedding_layers): they apply to the graph only.
    base_keys = {k: slot for k in incoming if k not in targets and (slot := base_slot(gm, k)) is not None}
    targets.update(base_keys)
    missing = [k for k in targets if k not in incoming and k not in projection_keys]
    unexpected = [k for k in incoming if k not in targets]
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit adapter {adapter_name!r} of this graph; missing keys: "
                         f"{_fmt_keys(missing)}, unexpected keys: {_fmt_keys(unexpected)}. Check target_modules, "
                         "modules_to_save, bias and the model")
    peers = [n for n, s in adapters_of(gm).items() if n != adapter_name and s.method_name == state.method_name]
    shared = set(projection_keys) if peers else set()
    _check_values(incoming, targets, shared, peers, adapter_name, source)
    merged = sorted(adapter_flags(gm).merged)
    if base_keys and merged:
        raise ValueError(f"{source}: holds base weights ({_fmt_keys(sorted(base_keys))}) but sites {merged[:3]} are "
                         "merged; vera_fx.unmerge(gm) first, then load")
    plan = [(*targets[k], v, k in base_keys) for k, v in incoming.items() if k not in shared]
    return plan, [k for k in projection_keys if k not in incoming]


@mutation
def apply_plan(gm: GraphModule, plan: Plan, adapter_names: Sequence[str] = ()) -> None:
    """Copy adapter tensors in place; base weights become new tensors in every slot holding the old one (tied
    weights stay tied). A merged adapter of ``adapter_names`` is unmerged first and merged again after."""
    merged = merged_adapters(gm)
    remerge = sorted(merged) if merged & set(adapter_names) else []
    if remerge:
        logger.info("adapters %s are merged: unmerging, loading, merging again", remerge)
        unmerge(gm)
    try:
        sharded = [a for mod, a, _, replace in plan if replace and hasattr(getattr(mod, a), "device_mesh")]
        if sharded:
            raise ValueError(f"the checkpoint replaces base weights ({sharded[:3]}) of a graph sharded with FSDP2: "
                             "load it before vera_fx.distributed.shard(...)")
        slots: dict[int, list[Slot]] = {}
        modules = gm.named_modules(remove_duplicate=False) if any(replace for *_, replace in plan) else ()
        for path, mod in modules:
            for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]:
                if t is not None and path.split(".")[0] != CONTAINER:
                    slots.setdefault(id(t), []).append((mod, leaf))
        with torch.no_grad():
            for mod, attr, value, replace in plan:
                current = getattr(mod, attr)
                data = value.detach().to(device=current.device, dtype=current.dtype).clone()
                if not replace:
                    current.copy_(placed_like(data, current))  # an FSDP2-sharded lambda gets this rank's shard
                    continue
                new = like(current, data)
                for owner, leaf in slots.get(id(current), [(mod, attr)]):
                    set_slot(owner, leaf, new)
    finally:
        if remerge:
            merge(gm, remerge)


@mutation
def load_adapter_state_dict(gm: GraphModule, state_dict: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> None:
    """Copy ``state_dict`` (PEFT's keys) into the adapter, every key and shape checked first."""
    gm = as_graph_module(gm, "load_adapter_state_dict")
    load_checked(gm, adapter_name, adapter_state(gm, adapter_name).config, state_dict, "state dict", file=False)


def load_checked(gm: GraphModule, adapter_name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                 source: str, file: bool = True) -> None:
    """Check then copy ``tensors`` into the adapter; a state dict (``file=False``) may lack the projections."""
    plan, missing_proj = plan_load(gm, tensors, adapter_name, source)
    if missing_proj and config.save_projection:
        if file:
            raise ValueError(f"{source}: save_projection=True but the file has no {missing_proj}; the checkpoint "
                             "is incomplete: save it again")
        logger.warning("adapter %r: the state dict has no %s; keeping the projections regenerated from "
                       "projection_prng_key=%d", adapter_name, missing_proj, config.projection_prng_key)
    if missing_proj:
        why = "" if config.save_projection else " (save_projection=False)"
        warnings.warn(f"{source} has no projections{why}: adapter {adapter_name!r} uses those "
                      f"regenerated from projection_prng_key={config.projection_prng_key}, which may differ across "
                      "platforms", UserWarning, stacklevel=3)
        if _standalone_projections_differ(gm, adapter_state(gm, adapter_name)):
            warnings.warn(f"adapter {adapter_name!r} shares projections with a larger adapter of this graph, which "
                          "differ from those its checkpoint was trained with; load it into a graph of its own "
                          "(vera_fx.from_pretrained)", UserWarning, stacklevel=3)
    apply_plan(gm, plan, [adapter_name])


@mutation
def load_adapter(gm: GraphModule, directory: PathLike, adapter_name: str = "default") -> None:
    """Load the adapter saved in ``directory`` (by vera_fx or PEFT) into ``adapter_name``, added from the saved
    config when missing; on any error the graph is left as it was."""
    gm = as_graph_module(gm, "load_adapter")
    config, tensors, source = read_folder(directory)
    have = dict(adapters_of(gm)).get(adapter_name)
    old_active = adapter_flags(gm).active
    if have is None:
        add_adapter(gm, adapter_name, config)
    elif type(have.config) is not type(config):
        raise ValueError(f"{directory}: peft_type={config.peft_type!r}, but adapter {adapter_name!r} on this "
                         f"graph is {have.config.peft_type!r}: load it under another adapter_name")
    else:
        check_same_fields(have.config, config, str(Path(directory) / CONFIG_NAME), adapter_name,
                          have.method.peft_projection_key("A") in tensors)
    try:
        load_checked(gm, adapter_name, config, tensors, source)
    except Exception:
        if have is None:  # the adapter this load added goes again
            remove_adapter(gm, adapter_name)
            restore_active(gm, old_active)
        raise
    logger.info("loaded adapter %r from %s", adapter_name, directory)


def peft_config_dict(gm: GraphModule, adapter_name: str = "default") -> dict[str, Any]:
    """adapter_config.json's content for ``adapter_name``, with PEFT's keys (no others)."""
    state = adapter_state(gm, adapter_name)
    cfg, info, sites = state.config, model_info(gm), set(state.site_names)
    data = config_to_dict(cfg)
    data.pop("vera_fx_version", None)
    # target_modules that PEFT resolves to exactly the adapter's sites: the config's own, else the adapted paths
    targets = sorted({s.rpartition(".")[2] for s in sites}) if cfg.target_modules is None else cfg.target_modules
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    own = not all_linear and (not info.get("modules") or peft_selection(info, targets, cfg) == sites)
    data["target_modules"] = targets if own else sorted(sites)
    kinds = {s.fan_in_fan_out for s in read_sites(gm) if s.name in sites}
    if len(kinds) == 1:  # what the sites store, as PEFT writes it after correcting the config
        data["fan_in_fan_out"] = kinds.pop()
    # As PEFT's save_pretrained: inference_mode true, the model's name_or_path and (without a task type) class
    # unless the config has them; peft_version stays the config's (vera_fx claims no PEFT version).
    auto = cfg.auto_mapping if cfg.task_type is not None else (
        {"base_model_class": info["class"], "parent_library": info.get("module")} if info.get("class") else None)
    data.update(peft_type=cfg.peft_type, inference_mode=True, auto_mapping=auto,
                base_model_name_or_path=cfg.base_model_name_or_path or info.get("name_or_path"))
    return dict(sorted(data.items()))


def _standalone_projections_differ(gm: GraphModule, state: AdapterState) -> bool:
    """True when the adapter's projections are not what its PRNG key alone gives (it shares a larger one's)."""
    sites = [s for s in read_sites(gm) if s.name in set(state.site_names)]
    if not sites:
        return False
    in_max, out_max = max(s.in_features for s in sites), max(s.out_features for s in sites)
    a, b = state.method.init_projections(state.config, in_max, out_max)
    cur_a, cur_b = state.projection("A"), state.projection("B")
    if cur_a.shape[0] != a.shape[0] or cur_b.shape[1] != b.shape[1]:
        return True
    return not (torch.equal(cur_a[:, :in_max].cpu().float(), a.float().to(cur_a.dtype).float())
                and torch.equal(cur_b[:out_max].cpu().float(), b.float().to(cur_b.dtype).float()))


def save_adapter(gm: GraphModule, directory: PathLike, adapter_name: str = "default", *,
                 is_main_process: Optional[bool] = None) -> None:
    """Write ``adapter_name`` to ``directory`` as PEFT does, both files at once. A sharded graph gathers its
    tensors, a collective: call it on every rank with ``is_main_process=(rank == 0)``."""
    wrapper, gm = gm, as_graph_module(unwrap_parallel(gm), "save_adapter")  # a DDP / FSDP1 wrapper first
    state = adapter_state(gm, adapter_name)
    targets = [getattr(mod, attr) for mod, attr in state_dict_targets(gm, adapter_name).values()]
    gather = needs_gather(wrapper, targets)
    writes = save_role(gather, is_main_process, "save_adapter")
    if not gather and not writes:
        return
    if not state.config.save_projection and _standalone_projections_differ(gm, state):
        warnings.warn(f"adapter {adapter_name!r} uses projections shared with a larger adapter of this graph, and "
                      "save_projection=False leaves them out: loading this checkpoint on its own (PEFT or "
                      "vera_fx.from_pretrained) regenerates other projections. Save with save_projection=True, or "
                      "from a graph where it is the first adapter", UserWarning, stacklevel=2)
    with gathered(wrapper):  # FSDP1: full parameters; FSDP2: full_tensor() gathers each shard
        tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(gm, adapter_name).items()}
    if writes:
        config = (json.dumps(peft_config_dict(gm, adapter_name), indent=2, sort_keys=True) + "\n").encode()
        write_folder(directory, {WEIGHTS_NAME: serialise(tensors), CONFIG_NAME: config})
        logger.info("saved adapter %r to %s: %d tensors", adapter_name, directory, len(tensors))


def _read_config(data: bytes, source: str) -> AdapterConfig:
    """The config of adapter_config.json's bytes; ValueError naming ``source`` for bad UTF-8, JSON or fields."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e}); write it again with vera_fx.save_adapter") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    try:
        return config_from_dict(parsed)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def read_checkpoint(directory: PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of one version of an adapter folder, checked; ValueError naming any problem."""
    return read_folder(directory)[:2]


def read_folder(directory: PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """``read_checkpoint``, and the weights file it read (safetensors, else PEFT's .bin)."""
    path = Path(directory)
    with open_folder(path, (CONFIG_NAME, WEIGHTS_NAME, BIN_NAME), {CONFIG_NAME, WEIGHTS_NAME}) as files:
        if files[CONFIG_NAME] is None:
            inner = sorted(f.parent.name for f in path.glob(f"*/{CONFIG_NAME}"))  # PEFT's named adapters
            hint = f"; it holds the adapter folders {inner}: give one of them" if inner else ""
            raise ValueError(f"{path} has no {CONFIG_NAME}: not an adapter folder (write one with "
                             f"vera_fx.save_adapter or PEFT's save_pretrained){hint}")
        if files[WEIGHTS_NAME] is None and files[BIN_NAME] is None:
            raise ValueError(f"{path} has no {WEIGHTS_NAME} (nor PEFT's {BIN_NAME}): the adapter's weights are missing")
        config = _read_config(files[CONFIG_NAME].read(), str(path / CONFIG_NAME))
        name = WEIGHTS_NAME if files[WEIGHTS_NAME] is not None else BIN_NAME  # safetensors first, as PEFT
        tensors = (read_safetensors if name == WEIGHTS_NAME else read_pickle)(files[name], str(path / name))
    check_file_shapes(config, tensors, str(path / name))
    return config, tensors, str(path / name)


def adapters_state_dict(source: GraphModule, destination: Optional[dict] = None, prefix: str = "",
                        keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter's tensors under PEFT's keys (cloned: safetensors refuses shared storage) and its config."""
    out: dict[str, torch.Tensor] = OrderedDict() if destination is None else destination
    for name in adapters_of(source):
        for key, t in adapter_state_dict(source, name).items():
            out[f"{prefix}{STATE_KEY_PREFIX}{name}.{key}"] = t if keep_vars else t.detach().clone()
        data = json.dumps(peft_config_dict(source, name), sort_keys=True).encode()
        out[f"{prefix}{CONFIG_KEY_PREFIX}{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def load_adapters_state_dict(source: GraphModule, state_dict: Any, strict: bool = True) -> IncompatibleKeys:
    """Load what ``adapters_state_dict`` gives (every adapter checked before anything changes)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"load_state_dict: state_dict={state_dict!r:.60} is a {type(state_dict).__name__}; "
                        "give the dict m.state_dict() returns (a folder loads with vera_fx.load_adapter)")
    names = list(adapters_of(source))
    per_adapter: dict[str, dict[str, Any]] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        adapter, _, rest = key.removeprefix(STATE_KEY_PREFIX).partition(".")
        if key.startswith(STATE_KEY_PREFIX) and adapter in names and rest:
            per_adapter.setdefault(adapter, {})[rest] = value
        elif not (key.startswith(CONFIG_KEY_PREFIX) and key.removeprefix(CONFIG_KEY_PREFIX) in names):
            unexpected.append(key)
    missing = [f"{STATE_KEY_PREFIX}{n}.*" for n in names if n not in per_adapter]
    if strict and (missing or unexpected):
        raise ValueError(f"load_state_dict: the state dict does not fit this model's adapters {names}; missing: "
                         f"{missing or 'none'}, unexpected: {unexpected[:5] or 'none'}. Give it what "
                         "state_dict() returns (or load a PEFT folder with vera_fx.load_adapter)")
    plans = [(name, plan_load(source, sd, name, f"state dict of adapter {name!r}")[0])
             for name, sd in per_adapter.items()]
    with state_lock(source).write():
        for name, plan in plans:
            apply_plan(source, plan, [name])
    return IncompatibleKeys(missing, unexpected)


def read_trainer_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, AdapterConfig]]:
    """``path/model.safetensors`` of a Trainer checkpoint: its tensors and each adapter's config."""
    try:
        with open(path / "model.safetensors", "rb") as f:
            state = read_safetensors(f, str(path / "model.safetensors"))
    except FileNotFoundError as e:
        raise ValueError(f"{path / 'model.safetensors'} does not exist") from e
    configs = {k.removeprefix(CONFIG_KEY_PREFIX): v for k, v in state.items() if k.startswith(CONFIG_KEY_PREFIX)}
    if not configs:
        raise ValueError(f"{path}/model.safetensors holds no vera_fx adapter (no {CONFIG_KEY_PREFIX}* entry): "
                         "give an adapter folder (adapter_config.json + adapter_model.safetensors) or a Trainer "
                         "checkpoint of a vera_fx model")
    return state, {name: _read_config(bytes(blob.tolist()), f"{path}/model.safetensors: the config of adapter "
                                                             f"{name!r}") for name, blob in configs.items()}
