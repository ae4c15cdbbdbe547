"""The house's layers, computed from the source: imports only look down, and finegrain modules are imported at
the top of a file (an import inside a function hides a dependency, and cycles hide behind them)."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import finegrain
import finegrain.config
from finegrain.config import TrainConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"

#: bottom to top; a unit may import units in its own layer or below, never above
LAYERS = [
    ["__init__"],  # the package root: __version__, and its public names looked up lazily (_LAZY, checked below)
    ["errors", "escape", "extras"],
    ["atomic", "run_layout"],
    ["env", "torchfile", "losses", "progress", "cpu_load"],
    ["config", "addon_options", "option_values"],
    ["data"],
    ["models"],
    ["checkpoint"],
    ["engine"],
    ["labels"],
    ["export"],
    ["compress"],
    ["predict"],
    ["explain"],
    ["report"],
    ["serve"],
    ["api"],  # finegrain.load / finegrain.train
    ["commands"],  # what each command does
    ["cli", "cli_flags", "__main__"],
]
MAX_FUNCTION_LEVEL_IMPORTS = 0


def _unit(path: Path) -> str:
    """The subpackage a file belongs to, or the root module's name."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports() -> list[tuple[str, str, bool, str]]:
    """(importing unit, imported unit, at module level?, where) for every finegrain import."""
    found = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}  # module level, guarded optional imports (try: ... except ImportError) too
        top |= {id(n) for t in tree.body if isinstance(t, ast.Try) for n in t.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finegrain":
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "finegrain"]
            else:
                continue
            for name in names:
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else "__init__"
                if parts == ["finegrain"] or target not in {u for layer in LAYERS for u in layer}:
                    target = "__init__"
                found.append((_unit(path), target, id(node) in top, f"{path.relative_to(SRC)}:{node.lineno}"))
    return found


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in SRC.rglob("*.py")}
    assert units == {u for layer in LAYERS for u in layer}


def test_imports_only_look_down():
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    upward = [f"{where}: {src} imports {dst}" for src, dst, _, where in _imports() if level[dst] > level[src]]
    assert not upward, "\n".join(upward)


def test_no_function_level_imports_of_finegrain_modules():
    inner = [where for _, _, at_top, where in _imports() if not at_top]
    assert len(inner) <= MAX_FUNCTION_LEVEL_IMPORTS, inner


def test_option_names_are_unique_and_documented():
    names = [f.name for _, f in TrainConfig.options()]
    groups = {g for g, _ in TrainConfig.options()}
    assert len(names) == len(set(names)) and not groups & set(names) - {"dataset"}
    assert all(f.metadata["help"] for _, f in TrainConfig.options())
    assert finegrain.config.__doc__


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_the_package_root_imports_nothing_and_names_its_lazy_modules():
    """The root's only dependencies are the modules its lazy names point to: none at import time."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("finegrain")]
    for name, module in finegrain._LAZY.items():
        assert module.split(".")[1] in {u for layer in LAYERS for u in layer}
        assert getattr(finegrain, name) is getattr(importlib.import_module(module), name)


def _handlers(parser) -> list[str]:
    """The handler name every (sub-)command dispatches to."""
    names = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for command in action.choices.values():
            names += _handlers(command) if command._subparsers else [command.get_default("func")]
    return names


def test_the_command_line_imports_nothing_heavy_and_names_real_handlers():
    """`finegrain --help` took 13 s when the parser's module imported the handlers (PyTorch, timm, FastAPI): now
    the handlers are looked up by name in ``cli.HANDLERS`` once a command runs, so every name must exist there
    and that module must sit below the command line."""
    code = "import sys, finegrain.cli; print(' '.join(m for m in ('torch', 'timm', 'fastapi', 'onnxruntime', " \
           "'sklearn', 'numpy', 'PIL') if m in sys.modules))"  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
    import finegrain.cli as cli  # noqa: PLC0415

    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    assert level[cli.HANDLERS.split(".")[1]] < level["cli"]
    handlers = importlib.import_module(cli.HANDLERS)
    names = _handlers(cli.build_parser())
    assert len(names) >= 20 and all(callable(getattr(handlers, n, None)) for n in names), names
