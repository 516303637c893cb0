"""The adapter-method interface (projections and their init, per-site parameters, the nodes it emits, its merge
delta, its checkpoint keys), the per-adapter state modules, the node emitter and the method registry."""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import nn
from torch.fx import Graph, Node

from ..config import AdapterConfig
from ..sites import ADAPTER_KEY, Site, relative_name
from ..versions import CONTAINER, AdapterFlags, GraphVersions, StateLock

aten = torch.ops.aten


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) drawn from ``generator``, bit-identical to
    torch.nn.init.kaiming_uniform_ (same float operations in the same order)."""
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class AdapterSet(nn.ModuleDict):
    """A graph's adapters by name (AdapterViews in a block), with the state lock, the run-time flags and the graph
    versions; every graph over these adapters holds this one object."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = StateLock()
        self.versions = GraphVersions()
        self.flags = AdapterFlags()


class SiteTree(nn.Module):
    """A node of an adapter's tree of per-site modules. Its *links* (``_links``) are site modules registered in a
    block's ``AdapterView`` that attribute lookup still finds (get_attr paths through the root state resolve),
    while ``named_parameters()`` / ``state_dict()`` / FSDP2 see each tensor once, where it is registered."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            links = self.__dict__.get("_links")
            if links is not None and name in links:
                return links[name]
            raise

    def subtree(self, parts: list[str], create: bool = True) -> nn.Module:
        """The module at path ``parts`` below this tree, links followed, SiteTrees created on the way when
        ``create`` (else KeyError)."""
        mod: nn.Module = self
        for part in parts:
            child = mod._modules.get(part)
            if child is None:
                child = (mod.__dict__.get("_links") or {}).get(part)
            if child is None:
                if not create:
                    raise KeyError(".".join(parts))
                child = SiteTree()
                mod.add_module(part, child)
            mod = child
        return mod

    def link(self, name: str, module: nn.Module) -> None:
        """Reach ``module`` as attribute ``name`` without registering it (it is registered elsewhere)."""
        self._modules.pop(name, None)
        self.__dict__.setdefault("_links", {})[name] = module

    def all_parameters(self) -> list[nn.Parameter]:
        """The parameters of this tree's sites, registered here or linked (held by a block's view), each once."""
        params: list[nn.Parameter] = []
        for child in [*self._modules.values(), *(self.__dict__.get("_links") or {}).values()]:
            params += child.all_parameters() if isinstance(child, SiteTree) else child.parameters()
        params += [p for p in self._parameters.values() if p is not None]
        return list({id(p): p for p in params}.values())


class AdapterState(nn.Module):
    """One adapter's state: ``<prefix>_A`` / ``<prefix>_B`` buffers and ``sites.<site path>.<prefix>_lambda_b|d``
    parameters (a PEFT key is a prefix rename). A site inside a block is registered in that block's
    ``AdapterView`` only; ``site_module`` and ``named_site_parameters`` reach every site wherever it is."""

    prefix = ""  # a view's block path (AdapterView)

    def __init__(self, config: AdapterConfig, method: "Method") -> None:
        super().__init__()
        self.config = config
        self.method_name = method.name
        self.sites = SiteTree()
        self.site_names: list[str] = []
        self.switches: dict[str, Any] = {}  # run-time switches the graph reads (e.g. sampling per site)
        self.__dict__["_site_index"] = {}  # site name -> its module (plain dict: registers nothing)

    @property
    def method(self) -> "Method":
        return method_by_name(self.method_name)

    def site_module(self, site: str, create: bool = False) -> nn.Module:
        """The module holding ``site``'s parameters (created, registered in ``sites``, when ``create``)."""
        index = self.__dict__.setdefault("_site_index", {})
        if site not in index:
            index[site] = self.sites.subtree(site.split(".") if site else ["_root"], create)
        return index[site]

    def unregister_site(self, site: str) -> None:
        """Keep ``site``'s module out of this state's registered tree (a block's view registers it); a link stays."""
        parts = site.split(".") if site else ["_root"]
        mod, parent = self.site_module(site), self.sites.subtree(parts[:-1], create=False)
        if isinstance(parent, SiteTree) and parent._modules.get(parts[-1]) is mod:
            parent.link(parts[-1], mod)

    def named_site_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(``<site>.<param>``, parameter) for every site, registered here or in a block's view."""
        for site in self.site_names:
            for pname, p in self.site_parameters(site).items():
                yield f"{site}.{pname}", p

    def lambda_parameters(self) -> list[nn.Parameter]:
        """Every site's parameters, each once."""
        return [p for _, p in self.named_site_parameters()]

    def site_parameters(self, site: str) -> dict[str, nn.Parameter]:
        return {k: v for k, v in self.site_module(site)._parameters.items() if v is not None}

    def site_target(self, adapter_name: str, site: str, param: str) -> str:
        return f"{CONTAINER}.{adapter_name}.sites.{self._relative(site) or '_root'}.{param}"

    def _relative(self, site: str) -> str:
        """A site's path inside the view's block (so every layer's code is the same)."""
        if site == self.prefix:
            return ""
        return site[len(self.prefix) + 1:] if site.startswith(self.prefix + ".") else site

    def projection(self, which: str) -> torch.Tensor:
        return getattr(self, f"{self.method.prefix}_{which}")

    def extra_repr(self) -> str:
        return f"method={self.method_name}, r={self.config.r}, sites={len(self.site_names)}"


class AdapterView(AdapterState):
    """A block's window on the root's AdapterState: it registers the block's site modules under block-relative
    paths (so ``fully_shard(block)`` shards that layer's lambdas with its weights and get_attr nodes resolve in
    the block); everything else is read from the root state, so it exists once and follows ``.to()``."""

    def __init__(self, root: AdapterState, site_names: list[str], prefix: str) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_root_state", root)  # a plain reference, not a submodule
        self.config = root.config
        self.method_name = root.method_name
        self.switches = root.switches
        self.prefix = prefix
        self.sites = SiteTree()
        self.site_names = [s for s in root.site_names if s in set(site_names)]
        for site in self.site_names:
            *path, leaf = (self._relative(site) or "_root").split(".")
            self.sites.subtree(path).add_module(leaf, root.site_module(site))
        root.method.init_view(self, root)

    def site_module(self, site: str, create: bool = False) -> nn.Module:
        return self._root_state.site_module(site, create)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            root = self.__dict__.get("_root_state")
            if root is None:
                raise
            return getattr(root, name)


class Emitter:
    """Creates adapter nodes after a point in the graph, tagged with their site, adapter and role."""

    def __init__(self, graph: Graph, after: Node, site: Site, adapter: str) -> None:
        self.graph = graph
        self.cursor = after
        self.site = site
        self.adapter = adapter
        # the site's path inside its block: node names every layer's generated code shares
        rel = relative_name(graph.owning_module, site.name) if graph.owning_module is not None else site.name
        self.relative_site = rel
        self.ident = f"{rel.replace('.', '_').replace('-', '_') or 'root'}_{adapter}"
        self.nodes: dict[str, Node] = {}  # the nodes emitted, by name: what the lower pass rewrites

    def get_attr(self, target: str, role: str, name: str) -> Node:
        return self._create("get_attr", target, (), {}, role, name)

    def call(self, fn: Callable[..., Any], args: tuple, role: str, name: str,
             kwargs: Optional[dict[str, Any]] = None) -> Node:
        return self._create("call_function", fn, args, kwargs or {}, role, name)

    def _create(self, op: str, target: Any, args: tuple, kwargs: dict[str, Any], role: str, name: str) -> Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.create_node(op, target, args, kwargs, name=f"{self.ident}_{name}")
        node.meta[ADAPTER_KEY] = {"site": self.site.name, "adapter": self.adapter, "role": role,
                                  "base": self.site.base.name, "name": name}
        self.cursor = self.nodes[name] = node
        return node


class Method:
    """Base of adapter methods: VeRA-style shared projections with per-site lambda vectors."""

    name: ClassVar[str]
    prefix: ClassVar[str]
    config_type: ClassVar[type]
    #: True when the latent is sampled (``mu`` / ``logvar`` halves of ``h``, PVeRA): never folded in training.
    probabilistic: ClassVar[bool] = False

    def latent_rows(self, config: AdapterConfig) -> int:
        """Rows of the shared A (r for VeRA, 2r for PVeRA)."""
        return config.r

    def init_projections(self, config: AdapterConfig, in_max: int, out_max: int) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        """A (latent_rows x in_max) then B (out_max x r), drawn from one generator seeded with the key."""
        gen = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        return kaiming_uniform((self.latent_rows(config), in_max), gen), kaiming_uniform((out_max, config.r), gen)

    def init_site(self, config: AdapterConfig, site: Site, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The per-site trainable vectors: lambda_b (out) and lambda_d (latent rows)."""
        if config.init_weights:
            lam_b = torch.zeros(site.out_features)
            lam_d = torch.full((self.latent_rows(config),), float(config.d_initial))
        else:
            lam_b = torch.ones(site.out_features)
            lam_d = torch.randn(self.latent_rows(config))
        return {f"{self.prefix}_lambda_b": lam_b.to(dtype), f"{self.prefix}_lambda_d": lam_d.to(dtype)}

    def emit(self, em: Emitter, state: AdapterState, x: Node, y: Node, training: Node) -> Node:
        """Emit the site's plain nodes after ``y`` and return the one holding ``y + delta``."""
        site, p = em.site, self.prefix
        lam_d = em.get_attr(state.site_target(em.adapter, site.name, f"{p}_lambda_d"), "lambda", "lambda_d")
        lam_b = em.get_attr(state.site_target(em.adapter, site.name, f"{p}_lambda_b"), "lambda", "lambda_b")
        a = em.get_attr(f"{CONTAINER}.{em.adapter}.{p}_A", "projection", "A")
        b = em.get_attr(f"{CONTAINER}.{em.adapter}.{p}_B", "projection", "B")
        if site.in_features < state.projection("A").shape[1]:
            a = em.call(aten.slice.Tensor, (a, 1, 0, site.in_features), "projection", "A_slice")
        if site.out_features < state.projection("B").shape[0]:
            b = em.call(aten.slice.Tensor, (b, 0, 0, site.out_features), "projection", "B_slice")
        lam_dtype = state.site_parameters(site.name)[f"{p}_lambda_d"].dtype
        x_val = x.meta.get("val")
        if isinstance(x_val, torch.Tensor) and x_val.dtype != lam_dtype:
            x = em.call(aten._to_copy.default, (x,), "adapter", "x_cast", {"dtype": lam_dtype})
        if state.config.dropout > 0.0:
            x = em.call(aten.dropout.default, (x, state.config.dropout, training), "adapter", "dropout")
        h = em.call(aten.linear.default, (x, a), "projection", "xA")
        z = self.emit_latent(em, state, em.call(aten.mul.Tensor, (h, lam_d), "adapter", "scale_d"), training)
        u = em.call(aten.linear.default, (z, b), "adapter", "xAB")
        u = em.call(aten.mul.Tensor, (u, lam_b), "adapter", "scale_b")
        out = em.call(aten.add.Tensor, (y, u), "adapter", "add")
        y_val = y.meta.get("val")
        if isinstance(y_val, torch.Tensor) and y_val.dtype != lam_dtype:
            out = em.call(aten._to_copy.default, (out,), "adapter", "out_cast", {"dtype": y_val.dtype})
        out.meta[ADAPTER_KEY]["role"] = "output"
        return out

    def emit_latent(self, em: Emitter, state: AdapterState, hd: Node, training: Node) -> Node:
        """The latent ``B`` multiplies, from ``hd = h * lambda_d``: ``hd`` itself (VeRA)."""
        return hd

    def delta_weight(self, state: AdapterState, site: Site) -> torch.Tensor:
        """The (out, in) update ``(lambda_b * B[:out]) @ (lambda_d[:r] * A[:r, :in])`` in float32 (PVeRA: the mean)."""
        r = state.config.r
        params = state.site_parameters(site.name)
        lam_b, lam_d = params[f"{self.prefix}_lambda_b"], params[f"{self.prefix}_lambda_d"][:r]
        a = state.projection("A")[:r, : site.in_features]
        b = state.projection("B")[: site.out_features]
        return (lam_b.float()[:, None] * b.float()) @ (lam_d.float()[:, None] * a.float())

    def peft_site_key(self, site: str, param: str) -> str:
        return f"base_model.model.{site}.{param}"

    def peft_projection_key(self, which: str) -> str:
        return f"base_model.{self.prefix}_{which}"

    def init_switches(self, state: AdapterState) -> None:
        """Set the run-time switches the emitted nodes read (none for deterministic methods)."""

    def init_view(self, view: "AdapterView", root: AdapterState) -> None:
        """Give a block's view the run-time objects of its own that its nodes read (none by default)."""

    def sampling_sites(self, state: AdapterState) -> tuple[str, ...]:
        """Sites whose adapter samples at inference (those cannot be merged)."""
        return ()

    def per_row_function(self, fn: Callable[..., Any]) -> Optional[Callable[..., Any]]:
        """For mixed-adapter batches: the per-row version of a function ``emit`` calls (it gets lists of the members'
        values and ``index=``), None to leave the call out, or ``fn`` itself."""
        return fn


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Register a method instance (by name, for its config type)."""
    _METHODS[method.name] = method
    return method


def method_for(config: AdapterConfig) -> Method:
    """The method registered for ``config``'s type; TypeError for any other object."""
    method = next((m for m in _METHODS.values() if type(config) is m.config_type), None)
    if method is None:
        raise TypeError(f"config must be a vera_fx.VeraConfig or vera_fx.PveraConfig, got "
                        f"{type(config).__module__}.{type(config).__name__}; a PEFT config is converted by "
                        "vera_fx.transform / add_adapter, or by vera_fx.config.as_config(config)")
    return method


def method_by_name(name: str) -> Method:
    """The method registered under ``name`` ('vera', 'pvera')."""
    return _METHODS[name]
