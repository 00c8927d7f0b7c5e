"""Layering: the library never imports the application.

``jstream/`` and ``pallas_kernels/`` import neither ``experiments`` nor ``configs`` (plain and ``from`` imports,
and module names or paths given as string constants to ``importlib.import_module``, ``__import__``, ``runpy``);
``configs/*.py`` import nothing but ``jstream`` and the standard library. The application reaches the library,
and the library finds the application's commands through entry points (``jstream.cli``).
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
APPLICATION = re.compile(r"^\W*(experiments|configs)(\W|$)")  # a module name or a path that starts in the app
DYNAMIC_IMPORTS = {"import_module", "__import__", "run_module", "run_path", "spec_from_file_location", "find_spec"}


def _sources(*folders: str) -> list[pathlib.Path]:
  files = sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))
  assert files, f"no Python files under {folders}"
  return files


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """``(line, module)`` for every import in ``path``: ``import a.b``, ``from a.b import c`` (``a.b``; relative
  imports keep their dots, ``.c``), and string constants passed to the dynamic import functions."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      found.append((node.lineno, "." * node.level + (node.module or "")))
    elif isinstance(node, ast.Call):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if name in DYNAMIC_IMPORTS:
        args = [*node.args, *(k.value for k in node.keywords)]
        found += [(node.lineno, a.value) for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
  return found


@pytest.mark.parametrize("folder", ["jstream", "pallas_kernels"])
def test_library_does_not_import_the_application(folder):
  bad = [
    f"{path.relative_to(ROOT)}:{line}: {module}"
    for path in _sources(folder)
    for line, module in _imports(path)
    if APPLICATION.match(module)
  ]
  assert not bad, "the library imports the application:\n" + "\n".join(bad)


def test_configs_import_only_the_library_and_the_standard_library():
  allowed = set(sys.stdlib_module_names) | {"__future__", "jstream"}
  bad = [
    f"{path.relative_to(ROOT)}:{line}: {module}"
    for path in _sources("configs")
    for line, module in _imports(path)
    if module.startswith(".") or module.split(".")[0] not in allowed
  ]
  assert not bad, "configs import something other than jstream and the standard library:\n" + "\n".join(bad)


def test_the_checks_see_every_kind_of_import(tmp_path):
  """The walker finds each form of import it is meant to refuse (so that the tests above can fail)."""
  src = tmp_path / "m.py"
  src.write_text(
    "import experiments.streaming_llm\n"
    "from configs import lm_tiny\n"
    "from . import sibling\n"
    "import importlib, runpy\n"
    "importlib.import_module('experiments.bench_stream')\n"
    "__import__('configs.streaming_llm')\n"
    "runpy.run_module(mod_name='experiments.streaming_llm')\n"
    "runpy.run_path('configs/lm_tiny.py')\n"
    "import experimental_stuff, configsy\n"
  )
  modules = [m for _, m in _imports(src)]
  assert [m for m in modules if APPLICATION.match(m)] == [
    "experiments.streaming_llm",
    "configs",
    "experiments.bench_stream",
    "configs.streaming_llm",
    "experiments.streaming_llm",
    "configs/lm_tiny.py",
  ]
  assert ".sibling" not in modules and "." in modules  # `from . import x` is kept as the relative module "."
