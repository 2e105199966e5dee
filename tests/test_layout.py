"""The shape of the codebase: no import cycles, entry points imported by no library module,
packages that build on each other in one order, models that know nothing of data or training,
kinds compared only where their registry lives, short modules, one list of dependencies, and a
time limit on every process a test waits for."""

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


# The packages in the order they build on each other: each imports only from those before it
# (and from the modules that import nothing of the project: errors, files).
LAYERS = ("llm.model", "llm.text", "llm.data", "llm.training", "llm.inference", "llm.evals",
          "llm.tasks", "llm.config", "llm.runs", "llm.cli", "llm.bench")


def _layer(module: str) -> int | None:
  return next((i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")),
              None)


def test_each_package_imports_only_the_packages_below_it():
  modules = _modules()
  for module, path in modules.items():
    own = _layer(module)
    if own is None:  # an entry point (or errors, files): may import any library module
      continue
    for imported in _imports(path, modules):
      layer = _layer(imported)
      assert layer is None or layer <= own or imported in ("llm.errors", "llm.files"), (
          f"{module} imports {imported}, which builds on it ({LAYERS[layer]} after "
          f"{LAYERS[own]})")


# Where each registry lives: a kind is compared only in the package that owns it.
OWNERS = {"task": "llm/tasks/", "model": "llm/model/", "tokenizer": "llm/text/"}


def _kind_comparisons(tree) -> list[tuple[int, str | None]]:
  """(line, registry) of each comparison of a `.kind` with a literal kind or literal kinds
  (==, !=, in, not in); a registry asked (`kind in FAMILIES`) is not one. The registry is "task",
  "model" or "tokenizer" for `<...>.task.kind` and the like, else None."""
  def literal(node):
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
        isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(map(literal, node.elts)))

  found = []
  for node in ast.walk(tree):
    parts = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
    if not any(map(literal, parts)):
      continue
    for part in parts:
      if isinstance(part, ast.Attribute) and part.attr == "kind":
        owner = part.value.attr if isinstance(part.value, ast.Attribute) else getattr(
            part.value, "id", None)
        found.append((node.lineno, owner if owner in OWNERS else None))
  return found


def test_kinds_are_compared_only_by_the_package_that_owns_them():
  found = []
  for module, path in _modules().items():
    relative = os.path.relpath(path, ROOT)
    for line, owner in _kind_comparisons(ast.parse(open(path).read())):
      allowed = [OWNERS[owner]] if owner else list(OWNERS.values())
      if not any(relative.startswith(folder) for folder in allowed):
        found.append(f"{relative}:{line}")
  assert not found, found
  # The check itself finds each form.
  assert _kind_comparisons(ast.parse("if cfg.task.kind == 'lm': pass")) == [(1, "task")]
  assert _kind_comparisons(ast.parse("x = 'lm' not in run.cfg.task.kind")) == [(1, "task")]
  assert _kind_comparisons(ast.parse("y = tokenizer.kind in ('gpt2',)")) == [(1, "tokenizer")]
  assert _kind_comparisons(ast.parse("z = m.kind != 'bert'")) == [(1, None)]


def test_no_module_is_longer_than_500_lines():
  long = {module: n for module, path in _modules().items()
          if (n := sum(1 for _ in open(path))) > 500}
  assert not long, long


def test_pyproject_lists_what_the_requirements_files_install():
  # requirements.txt is the README's first command; pyproject.toml makes `pip install -e .`.
  import tomllib
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]

  def requirements(name):
    lines = (line.split("#")[0].strip() for line in open(os.path.join(ROOT, name)))
    return [line for line in lines if line and not line.startswith("-r")]

  assert project["dependencies"] == requirements("requirements.txt")
  assert project["optional-dependencies"]["test"] == requirements("requirements-test.txt")


def test_every_process_a_test_starts_is_waited_for_with_a_time_limit():
  """A hung child (a process of a multi-process run whose peer died) fails its test, not CI."""
  unlimited = []
  for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
    if not name.endswith(".py"):
      continue
    path = os.path.join(ROOT, "tests", name)
    for node in ast.walk(ast.parse(open(path).read())):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        continue
      owner, method = ast.unparse(node.func.value), node.func.attr
      waits = (owner == "subprocess" and method in ("run", "call", "check_call", "check_output")
               or method in ("communicate", "wait") and owner != "self.manager")
      limited = any(k.arg == "timeout" for k in node.keywords) or (method == "wait"
                                                                   and node.args)
      if waits and not limited:
        unlimited.append(f"{name}:{node.lineno}")
  assert unlimited == []
