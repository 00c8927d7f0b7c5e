"""Runs the code cells of a notebook headless, in order, in one namespace (no Jupyter needed).

python notebooks/run_notebook.py notebooks/01_quickstart.ipynb
"""

import json
import sys


def run(path: str) -> dict:
  nb = json.load(open(path))
  namespace: dict = {"__name__": "__main__"}
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    exec(compile(src, f"{path}:cell{i}", "exec"), namespace)
  return namespace


if __name__ == "__main__":
  for p in sys.argv[1:]:
    run(p)
    print(f"{p}: ok")
