"""hfquant/ref.py (the pure-torch twins) serves the tests and the explicit ``ref`` backend only:
no module of the package imports it but hfquant/ops.py, and ops.py only inside a function
(when that backend is selected). What production needs of the kernel layouts lives in
hfquant/formats/kernel_layouts.py, so a normal process never loads hfquant.ref."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hfquant"
REF = "hfquant.ref"
ALLOWED = "hfquant.ops"  # routes HFQUANT_BACKEND=ref to the twins, with a lazy import


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer if is_package else importer.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{module}" if module else base


def ref_imports(path: Path, root: Path = ROOT) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of hfquant.ref in a module, including
    ``importlib.import_module("hfquant.ref")`` and imports inside functions."""
    name = _module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    # nodes that run only when a function is called; the rest runs at import
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Import):
            hit = any(a.name == REF or a.name.startswith(REF + ".") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path.name == "__init__.py", node.level, node.module)
            hit = target == REF or (target == "hfquant" and any(a.name == "ref" for a in node.names))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            hit = func.endswith("import_module") and node.args[0].value in (REF, ".ref")
        if hit:
            found.append((node.lineno, id(node) not in lazy))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _module_name(p) != REF)


def test_the_scan_finds_every_form_of_import(tmp_path):
    # the checker itself: each of these forms is found, at module level or in a function
    pkg = tmp_path / "hfquant" / "nn"
    pkg.mkdir(parents=True)
    forms = ["from .. import ref", "from ..ref import qlinear_ref", "import hfquant.ref",
             "from hfquant import ops, ref", "from hfquant.ref import NR",
             "importlib.import_module('hfquant.ref')"]
    for i, form in enumerate(forms):
        f = pkg / f"m{i}.py"
        f.write_text(f"{form}\n\ndef g():\n    {form}\n")
        assert ref_imports(f, tmp_path) == [(1, True), (4, False)], form
    clean = pkg / "clean.py"
    clean.write_text("from .. import ops\nfrom ..formats import kernel_layouts\nfrom .ref import x\nref = 1\n")
    assert ref_imports(clean, tmp_path) == []  # .ref here is hfquant.nn.ref, another module


def test_no_production_module_imports_ref():
    assert len(MODULES) > 20
    offenders = [f"{_module_name(p)} (line {line})" for p in MODULES if _module_name(p) != ALLOWED
                 for line, _ in ref_imports(p)]
    assert not offenders, "production modules import hfquant.ref: " + ", ".join(offenders)


def test_ops_imports_ref_only_lazily():
    found = ref_imports(PACKAGE / "ops.py")
    assert found, "hfquant/ops.py no longer routes HFQUANT_BACKEND=ref to the twins"
    assert not [line for line, top in found if top], "hfquant/ops.py imports hfquant.ref at module level"


_SCRIPT = r"""
import sys
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
import hfquant
from hfquant.nn import Int8Linear, LutLinear, QuantEmbedding, QuantLinear

x = torch.randn(3, 64)
for bits, group_size, symmetric in [(4, 32, True), (8, -1, False), (3, 32, False)]:
    lin = torch.nn.Linear(64, 40)
    q = QuantLinear.from_float(lin, bits, group_size, symmetric)
    qweight = q.qweight.clone()
    xg = x.clone().requires_grad_()
    y = q(xg)
    y.square().sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    sd = q.state_dict()
    assert torch.equal(sd["qweight"], qweight), bits
    assert (q.to_linear()(x) - y.detach()).abs().max() < 1e-4, bits
i8 = Int8Linear.from_float(torch.nn.Linear(64, 40), threshold=6.0)
qweight = i8.qweight.clone()
y = i8(x * 4)
assert y.shape == (3, 40)
assert torch.equal(i8.state_dict()["qweight"], qweight)
assert i8.to_linear().weight.shape == (40, 64)
lut = LutLinear.from_float(torch.nn.Linear(64, 40), 3, 32)
qweight = lut.qweight.clone()
y = lut(x)
assert torch.equal(lut.state_dict()["qweight"], qweight)
assert (lut.to_linear()(x) - y).abs().max() < 1e-4
emb = QuantEmbedding.from_embedding(torch.nn.Embedding(50, 64), 4, 32, True)
qweight = emb.qweight.clone()
e = emb(torch.tensor([[1, 49, 0]]))
assert torch.equal(emb.state_dict()["qweight"], qweight)
assert torch.equal(emb.to_embedding()(torch.tensor([[1, 49, 0]])), e)
print("loaded" if "hfquant.ref" in sys.modules else "not loaded")
"""


def _run(backend: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "HFQUANT_BACKEND"}
    if backend:
        env["HFQUANT_BACKEND"] = backend
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def test_a_normal_process_never_loads_ref():
    out = _run(None)
    assert out == "not loaded"


def test_the_ref_backend_loads_the_twins():
    out = _run("ref")
    assert out == "loaded"
