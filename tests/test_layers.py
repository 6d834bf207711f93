"""The package's layers: imports point down only, and there is no import cycle.

Walks every module's imports (function-level ones too: a lazy import is still an
arrow) from the source, without importing anything.
"""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "alexnet_jax"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS = {
    "core": ("alexnet_jax.model", "alexnet_jax.optim", "alexnet_jax.parallel",
             "alexnet_jax.steps", "alexnet_jax.checkpoint", "alexnet_jax.lock",
             "alexnet_jax.config_checks", "alexnet_jax.config_files", "alexnet_jax.data",
             "alexnet_jax.fileio", "alexnet_jax.memory", "alexnet_jax.kernels"),
    "run setup": ("alexnet_jax.run.setup",),
    "run": ("alexnet_jax.run.train", "alexnet_jax.run.evaluate"),
    # data.prepare (the TFDS build command) is data's own: sources share its names.
    "tools": ("alexnet_jax.tools", "alexnet_jax.data.holdout"),
    "entry": ("alexnet_jax.cli",),
}
ORDER = list(LAYERS)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
  """The layer of the longest prefix that names `module` (data.holdout is a tool)."""
  best, layer = "", None
  for name, prefixes in LAYERS.items():
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
        best, layer = prefix, name
  if layer is None and module in ("alexnet_jax", "alexnet_jax.run"):
    return "core" if module == "alexnet_jax" else "run"
  assert layer is not None, f"{module} is in no layer: add it to LAYERS (and the README)"
  return layer


def _imports(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
  """alexnet_jax modules that `path` imports anywhere in its body."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    found |= {n for n in names if n.startswith("alexnet_jax")}
  return found - {module}


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {m: _imports(p, m, set(files)) for m, p in files.items()}


def test_imports_point_down_only():
  upward = []
  for module, imported in _graph().items():
    for target in imported:
      if ORDER.index(_layer(target)) > ORDER.index(_layer(module)):
        upward.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
  assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
  graph = _graph()
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if target not in graph:
        continue
      if state.get(target) == "open":
        cycle = stack[stack.index(target):] + [target]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if target not in state:
        visit(target)
    stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
  """The two tests above can fail: a core module importing the run layer is both."""
  fake = tmp_path / "alexnet_jax"
  (fake / "run").mkdir(parents=True)
  (fake / "__init__.py").write_text("")
  (fake / "run" / "__init__.py").write_text("")
  (fake / "steps.py").write_text("def f():\n  from alexnet_jax.run import train\n")
  (fake / "run" / "train.py").write_text("from alexnet_jax import steps\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  with pytest.raises(AssertionError, match="alexnet_jax.steps \\(core\\) imports "
                     "alexnet_jax.run.train \\(run\\)"):
    test_imports_point_down_only()
  with pytest.raises(pytest.fail.Exception, match="import cycle"):
    test_no_import_cycle()
