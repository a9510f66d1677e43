"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh kernel each) at SIZE="tiny".

Parameters are injected as papermill does: a cell tagged `injected-parameters` right after the
notebook's `parameters` cell reassigns the names it overrides (each must be one the parameters
cell defines). A last cell, added here, prints the notebook variables the checks read as one
JSON line. Each notebook runs in its own temporary folder; the synthetic ones on the session's
tiny world (conftest.tiny_world), the fine-tuning notebook from the quickstart's export. The
official-checkpoint notebook needs neither, so it runs in a thread beside the other two (its
kernel is another process: the two CPU cores compile side by side).
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
# Kernels see 2 fake CPU devices, so the notebooks' mesh (data = jax.device_count()) is really
# data parallel; with this process's 8 the quickstart took about 3x longer on 2 cores (each step
# runs on 8 devices; orbax then also compiled a slice per array on every save, since avoided:
# uniter_jax/checkpointing.py).
KERNEL_DEVICES = 2
# Smaller programs to compile, so the file takes about a minute on a 2-core CPU: one encoder
# layer, pretraining on MLM alone (the full objective mix compiles 3x longer; the trainer tests
# cover it) without held-out evals; the VQA notebook evaluates once, in its own eval cell.
FAST = {"model.num_layers": 1}
FAST_PRETRAIN = {**FAST, "pretrain.mix": {"mlm": 1.0}, "evals.heldout.every_steps": 0,
                 "evals.itm.every_steps": 0}
FAST_VQA = {**FAST, "evals.vqa.every_steps": 0}
STEPS = 4
MARK = "NOTEBOOK_RESULTS "


def _parameters_cell(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"one cell tagged 'parameters', found {len(tagged)}"
  return tagged[0]


def _assigned(source: str) -> set[str]:
  return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
          for t in node.targets if isinstance(t, ast.Name)}


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={KERNEL_DEVICES}".strip()
  return env


def run_notebook(name: str, folder: pathlib.Path, params: dict, results: dict[str, str]) -> dict:
  """Executes notebooks/NAME in `folder` with `params`; returns {key: value of expression}."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  i = _parameters_cell(nb)
  unknown = set(params) - _assigned(nb.cells[i].source)
  assert not unknown, f"{name}: its parameters cell does not define {sorted(unknown)}"
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(i + 1, injected)
  report = ", ".join(f"{k!r}: {expr}" for k, expr in results.items())
  nb.cells.append(nbformat.v4.new_code_cell(
      f"import json\nprint({MARK!r} + json.dumps({{{report}}}, default=str))"))
  folder.mkdir(parents=True, exist_ok=True)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(folder)}}).execute(env=_kernel_env())
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  line = next(ln for ln in text.splitlines() if ln.startswith(MARK))
  return json.loads(line[len(MARK):])


def test_notebooks_are_stored_clean():
  """No outputs in the repository, a parameters cell with the documented names, and a Colab
  setup that runs only on Colab."""
  names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
  assert names == ["finetune_vqa.ipynb", "official_checkpoint.ipynb", "quickstart.ipynb"]
  for name in names:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}: outputs stored"
    declared = _assigned(nb.cells[_parameters_cell(nb)].source)
    assert {"SIZE", "DATA", "WORKDIR"} <= declared, (name, declared)
    if name != "official_checkpoint.ipynb":  # it trains nothing
      assert {"STEPS", "OVERRIDES"} <= declared, (name, declared)
    setup = [c.source for c in nb.cells if "if ON_COLAB:" in c.source]
    assert len(setup) == 1 and '"pip", "install"' in setup[0], name


def _setup_cells() -> dict[str, str]:
  """Each notebook's Colab setup cell."""
  return {p.name: next(c.source for c in nbformat.read(p, as_version=4).cells
                       if "if ON_COLAB:" in c.source) for p in sorted(NOTEBOOKS.glob("*.ipynb"))}


def test_colab_setup_fetches_the_repository_from_a_url_a_folder_or_a_zip(tmp_path):
  """The setup cell (one copy: the notebooks differ in what they pip-install only) refuses the
  placeholder with a message, uses a folder in place, unpacks an uploaded .zip (whatever folder
  it wraps the repository in) and clones a git URL; an existing checkout is kept."""
  cells = {name: re.sub(r"(?m)^PIP = .*$", "", src) for name, src in _setup_cells().items()}
  assert len(set(cells.values())) == 1, "the notebooks' setup cells differ"
  scope: dict = {}
  exec(next(iter(_setup_cells().values())), scope)  # off Colab: defines fetch, runs nothing
  fetch = scope["fetch"]
  with pytest.raises(SystemExit, match="REPO is the placeholder: set it in the setup cell"):
    fetch(scope["REPO"], str(tmp_path / "never"))
  repo = tmp_path / "src" / "uniter_jax-main"  # the folder a GitHub zip download holds
  repo.mkdir(parents=True)
  (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
  assert fetch(str(repo), str(tmp_path / "never")) == str(repo)
  archive = shutil.make_archive(str(tmp_path / "upload"), "zip", tmp_path / "src")
  got = fetch(archive, str(tmp_path / "from_zip"))
  assert (pathlib.Path(got) / "pyproject.toml").read_text() == "[project]\nname = 'x'\n"
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(git + ["add", "pyproject.toml"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
  got = fetch(repo.as_uri(), str(tmp_path / "cloned"))
  assert (pathlib.Path(got) / "pyproject.toml").is_file() and (pathlib.Path(got) / ".git").is_dir()
  assert fetch("https://example.invalid/x.git", got) == got  # already there: no network
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("not the repository")
  with pytest.raises(SystemExit, match="holds no pyproject.toml"):
    fetch(shutil.make_archive(str(tmp_path / "other"), "zip", other), str(tmp_path / "x"))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """The official-checkpoint notebook, started in a thread at once: (its folder, a Future of
  its results), or None without torch. The quickstart fixture asks for it first, so the two
  notebooks run at the same time."""
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:  # reading .pt files needs it (requirements-test.txt installs it)
    yield None
    return
  folder = tmp_path_factory.mktemp("official")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    yield folder, pool.submit(run_notebook, "official_checkpoint.ipynb", folder, {
        "SIZE": "tiny", "DATA": str(folder / "official"), "WORKDIR": str(folder / "work"),
    }, {"itm": "ITM_SCORES.tolist()", "filled": "FILLED", "answers": "ANSWERS",
        "model": "type(predictor.model).__name__"})


@pytest.fixture(scope="module")
def quickstart(official, tiny_world, tmp_path_factory):  # pylint: disable=unused-argument
  folder = tmp_path_factory.mktemp("quickstart")
  out = run_notebook("quickstart.ipynb", folder, {
      "SIZE": "tiny", "STEPS": STEPS, "WORKDIR": str(folder / "workdir"), "DATA": tiny_world,
      "OVERRIDES": FAST_PRETRAIN,
  }, {"export": "EXPORT", "itm": "[itm_own, itm_other]", "fill": "fill_own",
      "alignment": "ALIGNMENT_PNG", "steps": "result['step']", "mesh": "dict(config.mesh)"})
  return folder, out


def test_quickstart(quickstart):
  folder, out = quickstart
  assert out["steps"] == STEPS
  assert out["mesh"] == {"data": KERNEL_DEVICES, "fsdp": 1}  # every device
  export = pathlib.Path(out["export"])
  assert export == folder / "workdir" / "pretrain" / "export"
  for f in ("params.msgpack", "model_config.json", "config.json", "vocab.txt", "MODEL_CARD.md"):
    assert (export / f).is_file(), f
  assert len(out["itm"]) == 2 and all(0.0 <= p <= 1.0 for p in out["itm"])
  assert len(out["fill"]) == 3  # the top 3 words for the one [MASK]
  assert all(isinstance(w, str) and 0.0 <= p <= 1.0 for w, p in out["fill"])
  for png in ("world.png", "pretrain/curves.png", "alignment.png"):
    assert os.path.getsize(folder / "workdir" / png) > 0, png
  assert out["alignment"] == str(folder / "workdir" / "alignment.png")


# About 35 s more: left to -m slow. Its steps (VQA training, eval, export, predictor.answer) run
# by default in test_vqa_finetune.py and test_inference.py; the other two notebooks run here.
@pytest.mark.slow
def test_finetune_vqa_from_the_quickstart_export(quickstart, tiny_world, tmp_path):
  _, pretrained = quickstart
  out = run_notebook("finetune_vqa.ipynb", tmp_path, {
      "SIZE": "tiny", "STEPS": STEPS, "WORKDIR": str(tmp_path / "vqa"), "DATA": tiny_world,
      "INIT_FROM": pretrained["export"], "OVERRIDES": FAST_VQA,
  }, {"export": "EXPORT", "score": "VQA_SCORE", "answers": "answers", "steps": "result['step']",
      "init": "config.init_from", "labels": "list(predictor.answers)"})
  assert out["init"] == pretrained["export"] and out["steps"] == STEPS
  assert 0.0 <= out["score"] <= 1.0
  export = pathlib.Path(out["export"])
  assert (export / "params.msgpack").is_file() and (export / "ans2label.json").is_file()
  assert len(out["answers"]) == 8
  for top in out["answers"]:
    assert len(top) == 3 and all(a in out["labels"] and 0.0 <= s <= 1.0 for a, s in top)


def test_official_checkpoint_on_the_tiny_fixture(official):
  """SIZE="tiny": the notebook lays out the repository's official-format fixture as the
  official files, converts the pretrained checkpoint and runs it and the VQA one."""
  if official is None:
    pytest.skip("torch is not installed")
  folder, future = official
  out = future.result()
  assert (folder / "work" / "uniter-tiny" / "params.msgpack").is_file()
  assert out["model"] == "UniterForPretraining"
  assert len(out["itm"]) == 3 and all(0.0 <= p <= 1.0 for p in out["itm"])
  assert len(out["filled"]) == 1 and len(out["filled"][0]) == 5  # one [MASK], top 5
  with open(folder / "official" / "vqa" / "ckpt" / "ans2label.json", encoding="utf-8") as f:
    names = set(json.load(f))
  assert len(out["answers"]) == 3
  for top in out["answers"]:
    assert len(top) == 3 and all(a in names and 0.0 <= s <= 1.0 for a, s in top)
