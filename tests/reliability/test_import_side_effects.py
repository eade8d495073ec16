"""``import hfquant`` changes no other package. In a fresh interpreter the state that other
packages see is recorded before and after the import and compared: sys.meta_path and
sys.path_hooks, the attributes of every imported module of torch, transformers and peft (and
builtins, sys, warnings, copyreg), the attributes of every class those modules define, the
contents of their plain dict/list/set globals, and the dispatcher's kernels by dispatch key.
What may differ: new modules (and their names bound in parent packages, or a lazy package's
own exports loaded), transformers' quantization registries gaining "hfquant" (transformers'
own registration hook), and registrations in the "hfquant" namespace of torch.library."""
import json
import subprocess
import sys

import pytest

SCRIPT = r'''
import builtins, copyreg, json, sys, types, warnings

MODE = sys.argv[1]
import torch
import transformers
import transformers.modeling_utils
import transformers.quantizers.auto
if MODE != "peft_later":
    import peft
    import peft.tuners.lora.model

TOPS = ("torch", "transformers", "peft")
EXTRA = {"builtins": builtins, "sys": sys, "warnings": warnings, "copyreg": copyreg}
SKIP_CONTENT = {("sys", "modules"), ("sys", "path_importer_cache")}


def desc(x):
    if x is None or type(x) in (str, int, float, bool):
        return repr(x)
    if type(x) is tuple:
        return "(" + ", ".join(desc(e) for e in x) + ")"
    if isinstance(x, types.ModuleType):
        return "module " + x.__name__
    if isinstance(x, type):
        return "class %s.%s" % (x.__module__, x.__qualname__)
    if type(x).__name__ == "Library":
        return "Library " + str(x.ns)
    if callable(x) and hasattr(x, "__qualname__"):
        return "%s.%s" % (getattr(x, "__module__", "?"), x.__qualname__)
    return "%s.%s object" % (type(x).__module__, type(x).__qualname__)


def modules():
    out = {n: m for n, m in list(sys.modules.items())
           if isinstance(m, types.ModuleType) and n.split(".")[0] in TOPS}
    out.update(EXTRA)
    return out


def dispatcher():
    pairs = set()
    for key in torch._C.DispatchKey.__members__:
        try:
            ops = torch._C._dispatch_get_registrations_for_dispatch_key(key)
        except RuntimeError:  # a range marker, not a key
            continue
        pairs.update((key, op) for op in ops)
    return pairs


def snapshot():
    snap = {"modules": set(sys.modules), "attrs": {}, "content": {}, "lazy_dir": {},
            "dispatcher": dispatcher()}
    for name, mod in modules().items():
        d = dict(vars(mod))
        snap["attrs"][name] = {k: (id(v), v) for k, v in d.items()}
        if type(mod).__name__ == "_LazyModule":
            snap["lazy_dir"][name] = set(dir(mod))
        for k, v in d.items():
            where = name + "." + k
            if issubclass(type(v), type) and v.__dict__.get("__module__") == name:
                snap["attrs"][where] = {a: (id(b), b) for a, b in dict(vars(v)).items()}
            elif type(v) in (dict, list, set) and (name, k) not in SKIP_CONTENT:
                items = list(v.items()) if type(v) is dict else [(None, x) for x in list(v)]
                snap["content"][where] = {(id(a), id(b)): (a, b) for a, b in items}
    return snap


def allowed_content(where, key, value):
    if where in ("transformers.quantizers.auto.AUTO_QUANTIZATION_CONFIG_MAPPING",
                 "transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING"):
        return key == "hfquant"
    if where in ("torch.library._defs", "torch.library._impls"):
        return isinstance(value, str) and value.startswith(("hfquant::", "hfquant/"))
    if where == "torch.library._keep_alive":
        return type(value).__name__ == "Library" and value.ns == "hfquant"
    if where == "torch.jit._builtins._builtin_table":
        return isinstance(value, str) and value.startswith("hfquant::")
    if where == "torch.ops._dir":
        return value == "hfquant"
    return False


def allowed_attr(before, name, key, value):
    if isinstance(value, types.ModuleType) and value.__name__ not in before["modules"]:
        return True  # a submodule imported now, bound in its package
    if name in before["lazy_dir"] and key in before["lazy_dir"][name]:
        return True  # a lazy package's own export, loaded on first use
    return name == "torch.ops" and key == "hfquant"


def compare(before, after):
    diffs = []
    for where, old in before["attrs"].items():
        new = after["attrs"].get(where)
        if new is None:
            diffs.append(where + ": gone")
            continue
        is_module = where in before["modules"] or where in EXTRA
        for k, (i, _) in old.items():
            if k not in new:
                diffs.append("%s.%s: removed" % (where, k))
            elif new[k][0] != i:
                diffs.append("%s.%s: replaced by %s" % (where, k, desc(new[k][1])))
        for k in new.keys() - old.keys():
            if not (is_module and allowed_attr(before, where, k, new[k][1])):
                diffs.append("%s.%s: added %s" % (where, k, desc(new[k][1])))
    for where, old in before["content"].items():
        new = after["content"].get(where, {})
        entry = lambda k, v: desc(v) if k is None else "%s: %s" % (desc(k), desc(v))
        for key in old.keys() - new.keys():
            diffs.append("%s: lost %s" % (where, entry(*old[key])))
        for key in new.keys() - old.keys():
            if not allowed_content(where, *new[key]):
                diffs.append("%s: gained %s" % (where, entry(*new[key])))
    for key, op in sorted(after["dispatcher"] - before["dispatcher"]):
        if not op.startswith("hfquant::"):
            diffs.append("dispatcher: %s gained a %s kernel" % (op, key))
    for key, op in sorted(before["dispatcher"] - after["dispatcher"]):
        diffs.append("dispatcher: %s lost its %s kernel" % (op, key))
    return diffs


before = snapshot()
import hfquant
if MODE == "patched":  # what the check must catch
    import peft.tuners.lora.model
    class Finder:
        def find_spec(self, *args):
            return None
    sys.meta_path.insert(0, Finder())
    peft.tuners.lora.model.LoraModel._create_new_module = staticmethod(lambda *a, **k: None)
    torch.nn.Linear.extra_attribute = 1
    transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING["other"] = object
    warnings.filterwarnings("ignore", message="some message")
    torch.library.define("otherlib::f", "(Tensor x) -> Tensor")
    torch.library.impl("otherlib::f", "CPU")(lambda x: x)
    torch.library.impl("aten::sin", "PrivateUse3")(lambda x: x)  # a kernel on an existing op
diffs = compare(before, snapshot())
if MODE == "peft_later":  # peft imported after hfquant: its LoRA model is peft's own
    import peft.tuners.lora.model
    for k, v in vars(peft.tuners.lora.model.LoraModel).items():
        f = getattr(v, "__func__", v)
        if callable(f) and not getattr(f, "__module__", "peft").startswith("peft"):
            diffs.append("peft.tuners.lora.model.LoraModel.%s: from %s" % (k, f.__module__))
print(json.dumps(sorted(set(diffs))))
'''


def _diffs(mode: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["peft_first", "peft_later"])
def test_import_hfquant_changes_no_other_package(mode):
    assert _diffs(mode) == []


def test_the_check_sees_patches():
    assert _diffs("patched") == [
        "dispatcher: aten::sin gained a PrivateUse3 kernel",
        "dispatcher: otherlib::f gained a CPU kernel",
        "peft.tuners.lora.model.LoraModel._create_new_module: replaced by __main__.<lambda>",
        "sys.meta_path: gained __main__.Finder object",
        "torch.library._defs: gained 'otherlib::f'",
        "torch.library._impls: gained 'aten/sin/PrivateUse3'",
        "torch.library._impls: gained 'otherlib/f/CPU'",
        "torch.library._keep_alive: gained Library aten",
        "torch.library._keep_alive: gained Library otherlib",
        "torch.nn.modules.linear.Linear.extra_attribute: added 1",
        "torch.ops._dir: gained 'otherlib'",
        "transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING: gained 'other': class builtins.object",
        "warnings.filters: gained ('ignore', re.Pattern object, class builtins.Warning, None, 0)",
    ]
