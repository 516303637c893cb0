"""The README and docs/ say what runs: every ```python block of README.md and docs/*.md runs on a tiny Llama
(saved to a folder with a small word-level tokenizer, so ``path``, ``model``, ``tok``, ``batch``, ``m``,
``train_ds`` and ``eval_ds`` are bound as the README says), the test command is the one .ci/run calls, and the
paths the documents name exist.

A block marked ``<!-- readme-test: skip, REASON -->`` on the line above it is skipped with REASON, which must
say it needs a GPU or torchrun (the only allowed reasons). A block marked ``<!-- readme-test: torchrun -->`` runs
in a subprocess with torchrun's environment for one process (RANK=0, WORLD_SIZE=1, a free MASTER_PORT), so
its process group lives and dies there; tests/test_distributed.py runs the real two-process cases.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vera_fx

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip,\s*(.+?)\s*-->")
TORCHRUN_MARK = re.compile(r"<!--\s*readme-test:\s*torchrun\b.*?-->")
WORDS = ("VeRA trains two small vectors per layer a prompt another third Once upon The adapter is plain to see "
         "the model learns to count one two three four five six seven eight").split()


@dataclass
class Block:
    """One fenced code block of a document."""

    document: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # the reason of a skip mark on the line above, if any
    torchrun: bool = False  # marked to run as one process with torchrun's environment

    @property
    def id(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def code_blocks(document: Path) -> list[Block]:
    """The fenced code blocks of ``document`` in order, with the skip mark (if any) on the line above each."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i] != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{document}:{start + 1}: code block without a closing fence")
        above = lines[start - 1] if start else ""
        mark = SKIP_MARK.search(above)
        blocks.append(Block(document, start + 1, fence.group(1), "\n".join(lines[start + 1:i]) + "\n",
                            mark.group(1) if mark else None, bool(TORCHRUN_MARK.search(above))))
        i += 1
    return blocks


PYTHON_BLOCKS = [b for d in DOCUMENTS for b in code_blocks(d) if b.language == "python"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *dict.fromkeys(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding the tiny model + tokenizer (``path``) and two saved adapters the serving block loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("readme")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    for name in ("user_a", "user_b"):
        torch.manual_seed(len(name) + ord(name[-1]))
        m = vera_fx.transform(model, vera_fx.VeraConfig(r=256))
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_()
        m.save_pretrained(root / "out" / name)
    return root


def _names(workdir: Path) -> dict:
    """What the README's snippets are given: ``path`` and what its quick start makes of it, datasets too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(workdir / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["VeRA trains two small vectors per layer"], return_tensors="pt")
    rows = tok(["the model learns to count one two three four"] * 8, return_tensors="pt")
    data = [{"input_ids": i, "attention_mask": a, "labels": i.clone()}
            for i, a in zip(rows["input_ids"], rows["attention_mask"])]
    m = vera_fx.transform(model, vera_fx.VeraConfig(r=256))
    return {"torch": torch, "vera_fx": vera_fx, "path": path, "model": model, "tok": tok, "batch": batch,
            "train_ds": data[:6], "eval_ds": data[6:], "m": m}


def test_documents_have_python_blocks():
    readme = [b for b in PYTHON_BLOCKS if b.document.name == "README.md"]
    assert len(readme) >= 8, [b.id for b in readme]
    assert all(b.skip is None or re.search(r"\b(GPU|torchrun)\b", b.skip) for b in PYTHON_BLOCKS), \
        [(b.id, b.skip) for b in PYTHON_BLOCKS if b.skip]


# Runs one block in a fresh interpreter: argv = tests folder, workdir, block id.
_DRIVER = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_readme
import torch.distributed as dist
block = next(b for b in test_readme.PYTHON_BLOCKS if b.id == sys.argv[3])
os.chdir(sys.argv[2])
try:
    exec(compile(block.code, block.id, "exec"), test_readme._names(Path(sys.argv[2])))
finally:
    if dist.is_initialized():
        dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as_torchrun(block: Block, workdir: Path) -> None:
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(ROOT / "tests"), str(workdir), block.id], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.id} under torchrun's environment:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(block: Block, workdir: Path, monkeypatch) -> None:
    if block.skip:
        pytest.skip(block.skip)
    if block.torchrun:
        _run_as_torchrun(block, workdir)
        return
    # A snippet runs as a fresh program would: without the compiled frames earlier snippets left.
    torch.compiler.reset()
    monkeypatch.chdir(workdir)
    namespace = _names(workdir)
    exec(compile(block.code, block.id, "exec"), namespace)  # noqa: S102 - the documents' own code


def test_code_blocks_parse_fences(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- readme-test: skip, needs a GPU -->\n```python\nx = 1\n```\n```bash\nls\n```\n"
                   "<!-- readme-test: torchrun -->\n```python\ny = 2\n```\n")
    blocks = code_blocks(doc)
    assert [(b.line, b.language, b.code, b.skip, b.torchrun) for b in blocks] == [
        (3, "python", "x = 1\n", "needs a GPU", False), (6, "bash", "ls\n", None, False),
        (10, "python", "y = 2\n", None, True)]
    doc.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="without a closing fence"):
        code_blocks(doc)


def test_ci_runs_the_readme_test_command() -> None:
    commands = [b.code.strip() for b in code_blocks(ROOT / "README.md") if b.language == "bash"]
    test_command = [c for c in commands if "pytest" in c]
    assert test_command == ["pip install -e '.[dev]' && python -m pytest -q -n 2 --dist loadfile"], commands
    assert "pip install -e '.[demo]' && vera-fx demo" in commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command[0] in ci, "the README's test command is not the one .ci/run calls"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.index("pip install torch") < readme.index("```bash"), "the torch note comes before the commands"


def _anchors(document: Path) -> set[str]:
    """GitHub's anchors of ``document``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", document.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_named_paths_exist() -> None:
    """Every repository path the documents name (examples/, benchmarks/, docs/, scripts/, tests/, vera_fx/
    files and relative links) exists, and every link's #anchor is a heading of its target."""
    missing = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        named = re.findall(r"(?<![\w/.])((?:examples|benchmarks|docs|scripts|tests|vera_fx)/[\w./-]*\w)", text)
        missing += [f"{document.name}: {n}" for n in named if not (ROOT / n).exists()]
        for link in re.findall(r"\]\(([^)]+)\)", text):
            if re.match(r"\w+:", link):
                continue
            target, _, anchor = link.partition("#")
            path = (document.parent / target).resolve() if target else document
            if not path.exists():
                missing.append(f"{document.name}: link {link}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                missing.append(f"{document.name}: link {link} (no such heading)")
    assert not missing, missing


def test_anchors_follow_github() -> None:
    doc = ROOT / "docs" / "architecture.md"
    assert "lowering-how-each-site-group-is-computed" in _anchors(doc)
    assert "layers-who-may-import-whom" in _anchors(doc)


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md has a line for every module of vera_fx (the map stays complete)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "vera_fx").rglob("*.py"))]
    packages = {"vera_fx/methods/__init__.py", "vera_fx/passes/__init__.py"}  # package markers, no code of their own
    missing = [m for m in modules if m not in packages and m not in text and f"`{Path(m).name}`" not in text]
    assert not missing, f"modules without a line in docs/architecture.md: {missing}"



def _diagram_layers(text: str) -> dict[int, str]:
    """Layer number -> the module names on its lines of the Layers diagram (the left column, comments dropped)."""
    section = text[text.index("## Layers"):]
    diagram = section[section.index("```\n") + 4:]
    diagram = diagram[:diagram.index("```")]
    layers: dict[int, str] = {}
    current = None
    for line in diagram.splitlines():
        head = re.match(r"^(\d+)\s+", line)
        if head:
            current = int(head.group(1))
        if not line.strip() or re.match(r"^\s{20,}", line):  # a comment-only line of the right column
            continue
        left = re.split(r"\s{3,}", line.strip())[0]
        if current is not None:
            layers[current] = layers.get(current, "") + " " + re.sub(r"^\d+\s+", "", left)
    return layers


def test_architecture_layers_match_the_layering_test() -> None:
    """The Layers diagram of docs/architecture.md puts every module where tests/test_layering.py's LAYERS does."""
    from test_layering import LAYERS

    diagram = _diagram_layers((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    wrong = []
    for module, layer in LAYERS.items():
        name = module.rstrip(".").split(".")[-1]
        if not re.search(rf"\b{re.escape(name)}\b", diagram.get(layer, "")):
            wrong.append(f"{module}: layer {layer} in LAYERS, not on that layer's line: {diagram.get(layer, '')!r}")
    assert not wrong, "\n".join(wrong)
