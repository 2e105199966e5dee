"""The shape of the codebase: no import cycles, entry points imported by no library module,
models that know nothing of data or training."""

import ast
import os

from conftest import ROOT


def _modules() -> dict[str, str]:
  """'llm.model.gpt' -> its source file, for every module of the package."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "llm")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        modules[dotted.removesuffix(".__init__")] = path
  return modules


def _imports(path: str, modules) -> set[str]:
  """The package's modules that `path` imports, at the top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm"):
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        found.add(child if child in modules else node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in modules}
  return found


def _is_entry_point(path: str) -> bool:
  return '__name__ == "__main__"' in open(path).read()


def test_no_import_cycles_and_no_library_module_imports_an_entry_point():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  entry_points = {m for m, p in modules.items() if _is_entry_point(p)}
  assert {"llm.train", "llm.generate", "llm.convert", "llm.evaluate"} <= entry_points
  for module, imported in graph.items():
    if module not in entry_points:
      assert not imported & entry_points, f"{module} imports {imported & entry_points}"

  def cycle_from(start, node, path):
    for nxt in graph[node]:
      if nxt == start:
        return path + [nxt]
      if nxt not in path:
        found = cycle_from(start, nxt, path + [nxt])
        if found:
          return found
    return None

  for module in graph:
    cycle = cycle_from(module, module, [module])
    assert cycle is None, " -> ".join(cycle)


def test_models_know_nothing_of_data_or_training():
  modules = _modules()
  for module, path in modules.items():
    if module.startswith("llm.model"):
      outside = {m for m in _imports(path, modules) if not m.startswith("llm.model")}
      assert outside == set(), f"{module} imports {outside}"
