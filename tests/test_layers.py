"""Imports point one way: a module never imports one of a higher layer, lazily or not.

Every module under vlmtune/ is parsed (nothing is run), and every `import` in it is checked,
those inside functions included: a lazy import is still a dependency, it only shows up later.
The one exception is an `if __name__ == "__main__":` block, which runs only when the module is
the program (`torchrun -m vlmtune.train` hands over to the CLI there).

The order, lowest first, is `LAYERS`; modules of one layer may import each other (import cycles
are tests/test_imports.py's business). A new module needs a place in it, or this test fails.

Also here: no module outside `vlmtune/models/` names a model family. What a family can do is a field
of its `Family`, so adding a family touches `models/` only (the README's "Adding a family").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmtune"

# Lowest first. An entry names a module or a package (and so everything in it). Generation sits
# below training because training generates its validation predictions with it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("vlmtune", "vlmtune.errors", "vlmtune.fileio", "vlmtune.listen")),
    ("config", ("vlmtune.config",)),
    ("metrics", ("vlmtune.metrics",)),
    ("models", ("vlmtune.models",)),
    ("data", ("vlmtune.data",)),
    ("run setup", ("vlmtune.kernels", "vlmtune.checkpoints", "vlmtune.parts")),
    ("generation", ("vlmtune.scoring", "vlmtune.generation")),
    ("training parts", ("vlmtune.tuning", "vlmtune.vision_cache", "vlmtune.train_parts",
                        "vlmtune.runlock", "vlmtune.run_guard", "vlmtune.tracking", "vlmtune.callbacks",
                        "vlmtune.distributed")),
    ("training", ("vlmtune.train", "vlmtune.trainer", "vlmtune.rl")),
    ("commands", ("vlmtune.data_commands", "vlmtune.make_pairs", "vlmtune.evaluate", "vlmtune.infer", "vlmtune.serve", "vlmtune.merge", "vlmtune.report",
                  "vlmtune.plan", "vlmtune.demo", "vlmtune.ui")),
    ("cli", ("vlmtune.cli",)),
]


def layer_of(module: str) -> int | None:
    """Index in `LAYERS` of the longest entry that is `module` or a package holding it."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            # the package root holds every module, so it stands for its own __init__ only
            inside = entry != "vlmtune" and module.startswith(entry + ".")
            if (module == entry or inside) and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                    for c in test.comparators))


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported vlmtune module) for every import in `source`, at any depth but `__main__` blocks."""
    found = []

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:  # `from vlmtune.models import generic` imports a module
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if target in known else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return [(line, name) for line, name in found if name == "vlmtune" or name.startswith("vlmtune.")]


def upward_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """'module:line imports target (layer -> higher layer)' for each import that points up.

    Args:
        sources: module name -> (its source, whether it is a package's __init__).
    """
    known = set(sources)
    wrong = []
    for module, (source, is_package) in sources.items():
        low = layer_of(module)
        for line, target in imports_of(source, module, is_package, known):
            high = layer_of(target)
            if low is not None and high is not None and high > low:
                wrong.append(f"{module}:{line} imports {target} ({LAYERS[low][0]} -> {LAYERS[high][0]})")
    return wrong


def test_every_module_has_a_layer():
    missing = [m for m in all_modules() if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def test_no_module_imports_from_a_higher_layer():
    sources = {m: (p.read_text(encoding="utf-8"), p.name == "__init__.py") for m, p in all_modules().items()}
    wrong = upward_imports(sources)
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


# Literals that are a family's name but mean something else there.
NOT_A_FAMILY_RULE = {
    "vlmtune.demo": {"qwen2_vl"},  # the demo trains a tiny Qwen2-VL: a choice of model, not a rule about one
}


def family_names_outside_models(modules: dict[str, Path]) -> list[str]:
    from vlmtune.models import FAMILIES

    # FAMILIES leaves out the generic fallback, whose name "generic" is also an eval task's
    names = {name for name in FAMILIES} | {f.name for f in FAMILIES.values()}
    found = []
    for module, path in modules.items():
        if module == "vlmtune.models" or module.startswith("vlmtune.models."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Constant) and node.value in names
                    and node.value not in NOT_A_FAMILY_RULE.get(module, ())):
                found.append(f"{module}:{node.lineno} {node.value!r}")
    return found


def test_only_models_name_families(tmp_path):
    found = family_names_outside_models(all_modules())
    assert not found, "family names outside vlmtune/models/ (give Family a field instead):\n" + "\n".join(found)
    # the check itself: a family list in a data module is found
    listing = tmp_path / "packing.py"
    listing.write_text('PACKABLE = ("qwen2_vl", "qwen2_5_vl")\n')
    assert family_names_outside_models({"vlmtune.data.packing": listing}) == [
        "vlmtune.data.packing:1 'qwen2_vl'", "vlmtune.data.packing:1 'qwen2_5_vl'"]


def test_the_walk_finds_imports_at_every_depth():
    # the check itself: a lazy import deep inside a function is found and judged; a __main__ block is not
    data = """
import vlmtune.errors
from . import sample

def check():
    if True:
        from vlmtune.train import train
        from ..models import family_for

if __name__ == "__main__":
    from vlmtune.cli import main
"""
    known = {"vlmtune.data.check", "vlmtune.data.sample", "vlmtune.train", "vlmtune.models"}
    assert imports_of(data, "vlmtune.data.check", False, known) == [
        (2, "vlmtune.errors"), (3, "vlmtune.data.sample"), (7, "vlmtune.train"), (8, "vlmtune.models")]
    assert upward_imports({"vlmtune.data.check": (data, False)}) == [
        "vlmtune.data.check:7 imports vlmtune.train (data -> training)"]
    # and on the real tree it sees what train.py is built from
    train = all_modules()["vlmtune.train"]
    targets = {t for _, t in imports_of(train.read_text(), "vlmtune.train", False, set(all_modules()))}
    assert {"vlmtune.data.collate", "vlmtune.train_parts", "vlmtune.errors"} <= targets
