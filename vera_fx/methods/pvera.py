"""PVeRA, the probabilistic VeRA.

At a site: ``h = lambda_d * (A[:, :in] @ dropout(x))`` with 2r rows, split into ``mu = h[..., :r]`` and
``logvar = h[..., r:]``; the latent is ``z = mu + eps * exp(logvar / 2)`` when the graph is in training mode or
the site samples at inference, else ``z = mu``; the output is ``y + lambda_b * (B[:out] @ z)``.

Run-time state the graph reads (flipping it never re-captures; torch.compile recompiles once per value):

- ``sites.<site>.pvera_sample_at_inference``: a bool per site (``vera_fx.set_sample_at_inference``);
- ``sites.<site>.pvera_generator_state``: with ``generator_seed``, the CPU Mersenne-Twister state of the
  site's noise stream as a uint8 buffer (non-persistent). The noise is drawn on CPU by the custom op
  ``vera_fx::pvera_noise`` (which torch.compile traces as one opaque, state-mutating node, where a
  ``torch.Generator`` argument would graph-break) and moved to the activations' device, so moving the model
  between devices or dtypes never breaks it. Each site's stream is seeded from ``(generator_seed, site
  name)``, so the sites draw independent noise. (PEFT seeds every layer with ``generator_seed`` itself, so
  all its same-shaped layers draw the same noise, which correlates them; unseeded, both libraries agree.)
- ``pvera_noise_groups`` on the adapter: how many Monte Carlo samples the batch holds (1 outside
  ``vera_fx.monte_carlo``); with a seed, each sample's noise is drawn separately, so results do not depend on
  how the samples are chunked;
- ``pvera_kl``: the per-call KL scalars of the last forward, replaced at every forward (``kl_divergence``).
  A lean site (the lower pass's memory-lean path) records a ``LazyKL`` instead: the term is computed when
  ``kl_divergence`` first reads it, from the ``h`` the lean op keeps for backward anyway, so a forward whose
  loss has no KL term (PEFT's PVeRA has none) does not pay for one.
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
from ..sites import ADAPTER_KEY, Site
from .base import CONTAINER, AdapterState, AdapterView, Emitter, Method, emit_projection, finish_output
from .lean import pvera_kl

SAMPLE_SWITCH = "pvera_sample_at_inference"
GENERATOR_STATE = "pvera_generator_state"
NOISE_GROUPS = "pvera_noise_groups"
KL_RECORD = "pvera_kl"
BLOCK_KL_RECORDS = "pvera_kl_blocks"  # root state: block path -> that block's KLRecord


def site_seed(seed: int, site: str) -> int:
    """The seed of one site's noise stream: a stable 63-bit hash of ``(seed, site name)``."""
    digest = hashlib.sha256(f"{seed}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class KLRecord:
    """Per-call KL scalars of the last forward, keyed by ``"<site>#<call index>"``.

    Each key is overwritten at every forward, so memory does not grow. Copies and pickles start empty (the
    tensors carry an autograd graph that cannot be copied and should not be saved).
    """

    def __init__(self) -> None:
        self.values: dict[str, "Tensor | LazyKL"] = {}

    def get(self, key: str) -> Optional[Tensor]:
        """The KL scalar of call ``key`` (a lazy term is computed now), or None when none is recorded."""
        value = self.values.get(key)
        return value.value() if isinstance(value, LazyKL) else value

    def __deepcopy__(self, memo: dict) -> "KLRecord":
        return KLRecord()

    def __getstate__(self) -> dict:
        return {"values": {}}

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


def _noise(like: Tensor, generator_state: Optional[Tensor], groups: int) -> Tensor:
    """Standard normal noise of ``like``'s shape, dtype and device: the site's seeded stream, or torch's."""
    if generator_state is None:
        return torch.randn_like(like)
    return torch.ops.vera_fx.pvera_noise(generator_state, like.shape, groups, like.dtype).to(like.device)


def _halves_of(mu: Tensor, logvar: Tensor) -> Optional[Tensor]:
    """The tensor ``mu`` and ``logvar`` are the two halves of (its last dim, as the emitted slices make them) when
    the eager reparametrisation applies: gradients on, not traced, no autocast, plain tensors."""
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
    """``z = mu + es`` with ``es = eps * exp(logvar / 2)`` from ``hd = [mu, logvar]`` (the scaled latent): keeps
    ``es`` only (autograd's ops would keep ``exp(logvar / 2)`` and ``eps``) and returns ``d hd = [g, g * es / 2]``
    as one tensor, where the two slices' backward would each write a zero-filled copy of ``hd`` and add them."""

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
    """``pvera_reparametrize`` for a mixed-adapter batch: row ``i`` belongs to bank member ``index[i]`` (an
    index past the members is a row without one) and samples when training or that member's switch is on.

    With every member seeded, each row draws from its own adapter's stream (``vera_fx::pvera_bank_noise``),
    so a row equals that row run alone; otherwise the noise comes from torch's global generator.
    """
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
    """A lean site's KL term, computed on first read (``vera_fx::pvera_kl`` of ``h`` and ``lambda_d``).

    It holds ``h``, which the lean op keeps for backward anyway, and a copy of ``lambda_d`` (2r values: a
    sharded trainer may free the parameter's own storage after the forward). Once computed with gradients
    on, the value replaces them (a read under ``no_grad`` leaves them for a later differentiable read).
    """

    __slots__ = ("_h", "_lambda_d", "_r", "_value", "__weakref__")

    def __init__(self, h: Tensor, lambda_d: Tensor, r: int) -> None:
        self._h: Optional[Tensor] = h
        self._lambda_d: Optional[Tensor] = lambda_d
        self._r = r
        self._value: Optional[Tensor] = None

    def value(self) -> Tensor:
        if self._value is not None:
            return self._value
        h, lambda_d = self._h, self._lambda_d  # set until a value is kept
        value = pvera_kl(h, lambda_d, self._r)
        if torch.is_grad_enabled() or not (h.requires_grad or lambda_d.requires_grad):
            self._value, self._h, self._lambda_d = value, None, None
        return value

    def __repr__(self) -> str:
        return f"LazyKL({'computed' if self._value is not None else 'pending'})"


def _compute_kl_now() -> bool:
    """Whether a lean site's KL term is computed in the forward rather than on read: while torch.compile
    traces (it fuses into the graph), when autograd's saved tensors go through hooks (activation
    checkpointing, offloading: a lazy term would keep alive the ``h`` they meant to drop), or in a forward
    re-run inside backward (reentrant checkpointing's recompute, after which a lazy term would hold ``h``)."""
    if torch.compiler.is_compiling():
        return True
    return saved_tensors_hooks_active() or backward_running()


@has_side_effect
def pvera_record_kl(mu: Tensor, logvar: Tensor, record: KLRecord, key: str, lean_r: Optional[int] = None) -> None:
    """Store ``mean(-0.5 * (1 + logvar - mu^2 - exp(logvar)))`` (float32) for this call, replacing the last one.

    With ``lean_r`` (the lower pass's lean path) the arguments are ``h`` and ``lambda_d`` instead, with
    ``mu, logvar`` the halves of ``h * lambda_d``: the term is recorded as a ``LazyKL``, or computed now where
    holding ``h`` would cost (``_compute_kl_now``).
    """
    if lean_r is not None:
        if _compute_kl_now():
            record.values[key] = pvera_kl(mu, logvar, lean_r)
        else:
            record.values[key] = LazyKL(mu, logvar.clone(), lean_r)
        return
    mu, logvar = mu.float(), logvar.float()
    record.values[key] = -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())


class PveraMethod(Method):
    name = "pvera"
    prefix = "pvera"
    config_type = PveraConfig
    probabilistic = True

    def latent_rows(self, config: PveraConfig) -> int:  # type: ignore[override]
        return 2 * config.r

    def emit(self, em: Emitter, state: AdapterState, x: Node, y: Node, training: Node) -> Node:
        aten = torch.ops.aten
        site, adapter, r = em.site, em.adapter, state.config.r
        h, lam_d, lam_b, b = emit_projection(self, em, state, x, training)
        h = em.call(aten.mul.Tensor, (h, lam_d), "adapter", "scale_d")
        mu = em.call(aten.slice.Tensor, (h, -1, 0, r), "sampling", "mu")
        logvar = em.call(aten.slice.Tensor, (h, -1, r, 2 * r), "sampling", "logvar")
        sample = em.get_attr(state.site_target(adapter, site.name, SAMPLE_SWITCH), "sampling", "sample_switch")
        gen: Optional[Node] = None
        if GENERATOR_STATE in state.site_module(site.name)._buffers:
            gen = em.get_attr(state.site_target(adapter, site.name, GENERATOR_STATE), "sampling", "generator")
        groups = em.get_attr(f"{CONTAINER}.{adapter}.{NOISE_GROUPS}", "sampling", "noise_groups")
        z = em.call(pvera_reparametrize, (mu, logvar, training, sample, gen, groups), "sampling", "sample")
        # One record slot per call of the site (a shared layer is called several times), keyed by the call's
        # index so that re-emitting the adapter (adapter switches) reuses the same slots.
        calls = sum(1 for n in em.graph.nodes if n.op == "call_function" and n.target is pvera_record_kl
                    and (n.meta.get(ADAPTER_KEY) or {}).get("adapter") == adapter
                    and n.meta[ADAPTER_KEY].get("site") == site.name)
        record = em.get_attr(f"{CONTAINER}.{adapter}.{KL_RECORD}", "sampling", "kl_record")
        # keyed by the site's path inside its block: every layer's block runs the same code (regional compile
        # compiles once) and writes its own record (init_view)
        em.call(pvera_record_kl, (mu, logvar, record, f"{em.relative_site or '_root'}#{calls}"), "sampling", "kl")
        u = em.call(aten.linear.default, (z, b), "adapter", "xAB")
        u = em.call(aten.mul.Tensor, (u, lam_b), "adapter", "scale_b")
        return finish_output(em, y, u, state.site_parameters(site.name)["pvera_lambda_d"].dtype)

    def delta_weight(self, state: AdapterState, site: Site) -> torch.Tensor:
        """The mean path's update: ``(lambda_b * B[:out]) @ (lambda_d[:r] * A[:r, :in])`` in float32."""
        r = state.config.r
        params = state.site_parameters(site.name)
        lam_b, lam_d = params["pvera_lambda_b"], params["pvera_lambda_d"][:r]
        a = state.projection("A")[:r, : site.in_features]
        b = state.projection("B")[: site.out_features]
        return (lam_b.float()[:, None] * b.float()) @ (lam_d.float()[:, None] * a.float())

    def init_switches(self, state: AdapterState) -> None:
        """Per-site sampling switches and generator states, the noise-group count and the KL record."""
        cfg: PveraConfig = state.config
        wanted = cfg.sample_at_inference
        if isinstance(wanted, dict):
            unknown = sorted(set(wanted) - set(state.site_names))
            if unknown:
                raise ValueError(f"sample_at_inference names unknown sites {unknown}; the adapted sites are "
                                 f"{state.site_names}")
        for site in state.site_names:
            mod = state.site_module(site)
            on = wanted.get(site, False) if isinstance(wanted, dict) else bool(wanted)
            setattr(mod, SAMPLE_SWITCH, on)
            if cfg.generator_seed is not None:
                seed_state = torch.Generator(device="cpu").manual_seed(site_seed(cfg.generator_seed, site))
                mod.register_buffer(GENERATOR_STATE, seed_state.get_state(), persistent=False)
        setattr(state, NOISE_GROUPS, 1)
        setattr(state, KL_RECORD, KLRecord())
        state.switches["sample_at_inference"] = {s: getattr(state.site_module(s), SAMPLE_SWITCH)
                                                 for s in state.site_names}

    def init_view(self, view: AdapterView, root: AdapterState) -> None:
        """A block's KL record: one per block path, kept by the root state, so that every graph capturing
        that block (one per call signature) writes the record ``kl_divergence`` reads."""
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
            fresh = torch.Generator(device="cpu").manual_seed(site_seed(seed, site)).get_state()
            mod._buffers[GENERATOR_STATE].copy_(fresh)
