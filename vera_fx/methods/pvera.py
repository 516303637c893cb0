"""PVeRA, the probabilistic VeRA: ``h = lambda_d * (A[:, :in] @ dropout(x))`` has 2r rows, halves ``mu, logvar``;
the latent is ``mu + eps * exp(logvar / 2)`` in training mode or where the site samples at inference, else ``mu``.
Per site a seeded noise stream (a uint8 buffer for ``vera_fx::pvera_noise``, where a ``torch.Generator`` would
graph-break; PEFT gives same-shaped layers the same noise) and the last forward's KL terms, never saved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.fx import Node
from torch.fx.node import has_side_effect

from ..compat import backward_running, saved_tensors_hooks_active
from ..config import PveraConfig
from ..runtime import pvera_bank_noise, pvera_noise  # noqa: F401  (the ops the graph calls)
from ..sites import ADAPTER_KEY
from .base import CONTAINER, AdapterState, AdapterView, Emitter, Method
from .lean import kl_term, pvera_kl

SAMPLE_SWITCH = "pvera_sample_at_inference"
GENERATOR_STATE = "pvera_generator_state"
NOISE_GROUPS = "pvera_noise_groups"
KL_RECORD = "pvera_kl"
BLOCK_KL_RECORDS = "pvera_kl_blocks"  # root state: block path -> that block's KLRecord


def _stream_state(seed: int, site: str) -> Tensor:
    """The start of one site's noise stream: a CPU generator seeded with a stable 63-bit hash of ``(seed, site)``."""
    digest = hashlib.sha256(f"{seed}:{site}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1).get_state()


class KLRecord:
    """The last forward's KL scalars by ``"<site>#<call index>"``; copies start empty (the tensors hold a graph)."""

    def __init__(self) -> None:
        self.values: dict[str, "Tensor | LazyKL"] = {}

    def get(self, key: str) -> Optional[Tensor]:
        """The KL scalar of call ``key`` (a lazy term is computed now), or None when none is recorded."""
        value = self.values.get(key)
        return value.value() if isinstance(value, LazyKL) else value

    def __reduce__(self) -> tuple:  # a copy (deepcopy, pickle) starts empty
        return (KLRecord, ())

    def __repr__(self) -> str:
        return f"KLRecord({len(self.values)} calls)"


@has_side_effect
def pvera_reparametrize(mu: Tensor, logvar: Tensor, training: bool, sample: bool,
                        generator_state: Optional[Tensor], groups: int) -> Tensor:
    """``mu + eps * exp(logvar / 2)`` in training mode or when the site samples at inference, else ``mu``."""
    if not (training or sample):
        return mu
    base = _halves_of(mu, logvar)
    if base is not None:  # an eager differentiable call: one node, es kept, d (mu, logvar) as one tensor
        return _Reparametrize.apply(base, _noise(logvar, generator_state, groups))  # no autocast: std is as logvar
    std = torch.exp(0.5 * logvar)
    return mu + _noise(std, generator_state, groups) * std


def _noise(like: Tensor, generator_state: Optional[Tensor], groups: int, shape: Optional[tuple] = None) -> Tensor:
    """Standard normal noise like ``like`` (of ``shape``): the site's seeded stream, or torch's."""
    shape = like.shape if shape is None else shape
    if generator_state is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return torch.ops.vera_fx.pvera_noise(generator_state, shape, groups, like.dtype).to(like.device)


@has_side_effect
def pvera_lean_noise(h: Tensor, r: int, training: bool, sample: bool, generator_state: Optional[Tensor],
                     groups: int) -> Optional[Tensor]:
    """The noise ``pvera_reparametrize`` would draw at a lean site, or None where it uses the mean."""
    return _noise(h, generator_state, groups, (*h.shape[:-1], r)) if training or sample else None


def _halves_of(mu: Tensor, logvar: Tensor) -> Optional[Tensor]:
    """The tensor whose last-dim halves are ``mu`` and ``logvar``, where the eager reparametrisation applies
    (gradients on, not traced, no autocast, plain tensors); else None."""
    base = mu._base
    if (base is None or logvar._base is not base or not torch.is_grad_enabled() or not base.requires_grad
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(base.device.type)
            or type(base) is not Tensor or not base.is_contiguous()):
        return None
    r = mu.shape[-1]
    if (base.shape[-1] != 2 * r or mu.shape != logvar.shape or mu.shape[:-1] != base.shape[:-1]
            or mu.data_ptr() != base.data_ptr() or logvar.data_ptr() != base.data_ptr() + r * base.element_size()):
        return None
    return base


class _Reparametrize(torch.autograd.Function):
    """``z = mu + es``, ``es = eps * exp(logvar / 2)``, from ``hd = [mu, logvar]``: keeps only ``es`` and returns
    ``d hd = [g, g * es / 2]`` as one tensor (the slices' backward would write and add two zero-filled copies)."""

    @staticmethod
    def forward(ctx, hd: Tensor, eps: Tensor) -> Tensor:  # noqa: ANN001
        r = eps.shape[-1]
        es = torch.exp(0.5 * hd[..., r:]).mul_(eps)  # the plain chain's values: exp(0.5 * logvar) * eps
        ctx.save_for_backward(es)
        return hd[..., :r] + es

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        (es,) = ctx.saved_tensors
        r = es.shape[-1]
        d_hd = torch.empty((*grad.shape[:-1], 2 * r), dtype=grad.dtype, device=grad.device)
        d_hd[..., :r] = grad
        torch.mul(grad, es, out=d_hd[..., r:]).mul_(0.5)
        return d_hd, None


@has_side_effect
def pvera_bank_reparametrize(mu: Tensor, logvar: Tensor, training: bool, samples: Sequence[bool],
                             generator_states: Optional[Sequence[Optional[Tensor]]], groups: int, *,
                             index: Tensor) -> Tensor:
    """``pvera_reparametrize`` for a mixed batch: row ``i`` is member ``index[i]``'s (past the members: none); with
    every member seeded each row draws from its adapter's stream (as if run alone), else from torch's."""
    flags = [bool(training or s) for s in samples]
    if not any(flags):
        return mu
    std = torch.exp(0.5 * logvar)
    if generator_states is not None and all(g is not None for g in generator_states):
        eps = torch.ops.vera_fx.pvera_bank_noise(list(generator_states), index, flags, std.shape,
                                                 std.dtype).to(std.device)
    else:
        eps = torch.randn_like(std)
    mask = torch.tensor(flags + [False], device=mu.device)[index].view(-1, *([1] * (mu.dim() - 1)))
    return torch.where(mask, mu + eps * std, mu)


class LazyKL:
    """A lean site's KL term, computed on first read from ``h`` (kept for backward anyway; at inference ``h = x @
    a.T`` then) and a copy of ``lambda_d`` (a sharded trainer may free its storage). Only a value computed with
    gradients on is kept (a ``no_grad`` read leaves the inputs for a later differentiable one)."""

    __slots__ = ("_h", "_lambda_d", "_r", "_value", "_x", "_a", "__weakref__")

    def __init__(self, h: Optional[Tensor], lambda_d: Tensor, r: int, x: Optional[Tensor] = None,
                 a: Optional[Tensor] = None) -> None:
        self._h, self._x, self._a = h, x, a
        self._lambda_d: Optional[Tensor] = lambda_d
        self._r, self._value = r, None

    def value(self) -> Tensor:
        if self._value is not None:
            return self._value
        if self._h is None:
            self._h = torch.nn.functional.linear(self._x, self._a)
            self._x = self._a = None
        h, lambda_d = self._h, self._lambda_d  # set until a value is kept
        value = pvera_kl(h, lambda_d, self._r)
        if torch.is_grad_enabled() or not (h.requires_grad or lambda_d.requires_grad):
            self._value, self._h, self._lambda_d = value, None, None
        return value

    def __repr__(self) -> str:
        return f"LazyKL({'computed' if self._value is not None else 'pending'})"


@has_side_effect
def pvera_record_kl(mu: Tensor, logvar: Tensor, record: KLRecord, key: str, lean_r: Optional[int] = None) -> None:
    """Record this call's KL term (float32). With ``lean_r`` (lean and fused sites) the arguments are ``h`` and
    ``lambda_d`` and the term a ``LazyKL``, except while compiling, under saved-tensor hooks (a lazy term would
    keep the ``h`` they drop) or in backward."""
    if lean_r is not None:
        now = torch.compiler.is_compiling() or saved_tensors_hooks_active() or backward_running()
        record.values[key] = pvera_kl(mu, logvar, lean_r) if now else LazyKL(mu, logvar.clone(), lean_r)
        return
    record.values[key] = kl_term(mu.float(), logvar.float())


class PveraMethod(Method):
    name = "pvera"
    prefix = "pvera"
    config_type = PveraConfig
    probabilistic = True

    def latent_rows(self, config: PveraConfig) -> int:  # type: ignore[override]
        return 2 * config.r

    def emit_latent(self, em: Emitter, state: AdapterState, hd: Node, training: Node) -> Node:
        """``mu + eps * exp(logvar / 2)`` (or ``mu``) from the halves of ``hd``, and the KL record node."""
        aten = torch.ops.aten
        site, adapter, r = em.site, em.adapter, state.config.r
        mu = em.call(aten.slice.Tensor, (hd, -1, 0, r), "sampling", "mu")
        logvar = em.call(aten.slice.Tensor, (hd, -1, r, 2 * r), "sampling", "logvar")
        sample = em.get_attr(state.site_target(adapter, site.name, SAMPLE_SWITCH), "sampling", "sample_switch")
        gen: Optional[Node] = None
        if GENERATOR_STATE in state.site_module(site.name)._buffers:
            gen = em.get_attr(state.site_target(adapter, site.name, GENERATOR_STATE), "sampling", "generator")
        groups = em.get_attr(f"{CONTAINER}.{adapter}.{NOISE_GROUPS}", "sampling", "noise_groups")
        z = em.call(pvera_reparametrize, (mu, logvar, training, sample, gen, groups), "sampling", "sample")
        # a slot per call of the site (a shared layer), keyed by its path inside the block (init_view: a record
        # per block) and the call's index (re-emission reuses the slots)
        calls = sum(1 for n in em.graph.find_nodes(op="call_function", target=pvera_record_kl)
                    if (n.meta.get(ADAPTER_KEY) or {}).get("adapter") == adapter
                    and n.meta[ADAPTER_KEY]["site"] == site.name)
        record = em.get_attr(f"{CONTAINER}.{adapter}.{KL_RECORD}", "sampling", "kl_record")
        em.call(pvera_record_kl, (mu, logvar, record, f"{em.relative_site or '_root'}#{calls}"), "sampling", "kl")
        return z

    def init_switches(self, state: AdapterState) -> None:
        """Per-site sampling switches and generator states, the noise-group count and the KL record."""
        cfg: PveraConfig = state.config
        wanted = cfg.sample_at_inference
        if isinstance(wanted, dict):
            unknown = sorted(set(wanted) - set(state.site_names))
            if unknown:
                raise ValueError(f"sample_at_inference names unknown sites {unknown}; the adapted sites are "
                                 f"{state.site_names}")
        switches = state.switches["sample_at_inference"] = {}
        for site in state.site_names:
            mod = state.site_module(site)
            switches[site] = wanted.get(site, False) if isinstance(wanted, dict) else bool(wanted)
            setattr(mod, SAMPLE_SWITCH, switches[site])
            if cfg.generator_seed is not None:
                mod.register_buffer(GENERATOR_STATE, _stream_state(cfg.generator_seed, site), persistent=False)
        setattr(state, NOISE_GROUPS, 1)
        setattr(state, KL_RECORD, KLRecord())

    def init_view(self, view: AdapterView, root: AdapterState) -> None:
        """The block's KL record, one per block path on the root state (what ``kl_divergence`` reads)."""
        records = root.__dict__.setdefault(BLOCK_KL_RECORDS, {})
        setattr(view, KL_RECORD, records.setdefault(view.prefix, KLRecord()))

    def sampling_sites(self, state: AdapterState) -> tuple[str, ...]:
        return tuple(s for s in state.site_names if getattr(state.site_module(s), SAMPLE_SWITCH, False))

    def per_row_function(self, fn):  # type: ignore[no-untyped-def]
        """Mixed batches sample per row and record no KL term."""
        if fn is pvera_record_kl:
            return None
        return pvera_bank_reparametrize if fn is pvera_reparametrize else fn


def reseed_state(state: AdapterState, seed: int) -> None:
    """Restart every site's noise stream of a seeded adapter from ``seed``."""
    for site in state.site_names:
        mod: nn.Module = state.site_module(site)
        if GENERATOR_STATE in mod._buffers:
            mod._buffers[GENERATOR_STATE].copy_(_stream_state(seed, site))


def pvera_group_h(x: Tensor, a: Tensor, r: int, training: bool, *samples: bool) -> Tensor:
    """``h`` of the PVeRA sites reading one ``x``: the mean's r rows only when none of them samples, else 2r."""
    return torch.nn.functional.linear(x, a if training or any(samples) else a[:r])


def pvera_latent(h: Tensor, lambda_d: Tensor, r: int, training: bool, sample: bool, generator_state: Optional[Tensor],
                 groups: int, record: Optional[KLRecord], key: str, x: Tensor, a: Tensor) -> Tensor:
    """One PVeRA site's latent at inference from its group's ``h`` (the mean where ``h`` has r rows, its KL term then
    a ``LazyKL`` of ``x``); no KL term with ``record=None`` (generation)."""
    if h.shape[-1] == r:
        if record is not None:
            record.values[key] = LazyKL(None, lambda_d.clone(), r, x, a)
        return h * lambda_d[:r]
    hd = h * lambda_d
    mu, logvar = hd[..., :r], hd[..., r:]
    z = pvera_reparametrize(mu, logvar, training, sample, generator_state, groups)
    if record is not None:
        pvera_record_kl(mu, logvar, record, key)
    return z
