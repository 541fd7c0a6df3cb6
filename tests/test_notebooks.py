"""The notebooks are stored clean, import only the package (and display libraries), and run."""

import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.train import TrainConfig

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("explore_embeddings.ipynb", "results.ipynb")
ALLOWED_IMPORTS = {"os", "numpy", "matplotlib", "sklearn", "trailers12k_feats"}


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "T12K_" in code[0].source  # inputs come from the environment when set
    modules = {m for c in code for m in re.findall(r"^\s*(?:from|import)\s+(\w+)", c.source, re.MULTILINE)}
    assert modules <= ALLOWED_IMPORTS, modules - ALLOWED_IMPORTS


def execute(name, tmp_path, monkeypatch, **env):
    """Run a notebook in a fresh kernel with `env` set; return it executed."""
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    # Keep the kernel's profile and connection files out of the home directory.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The kernel must be this interpreter: jupyter_client starts "python3" as sys.executable.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    return nb


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_explore_notebook_runs(corpus, tmp_path, monkeypatch):
    nb = execute("explore_embeddings.ipynb", tmp_path, monkeypatch, T12K_CACHE=corpus / "ik_swin.h5",
                 T12K_METADATA=corpus / "mtgc.csv", T12K_MAX_TRAILERS=200)
    assert images(nb) == 5  # PCA, t-SNE, trajectory, two co-occurrence maps
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "200 used here" in text and "cosine" in text


@pytest.mark.slow
def test_results_notebook_runs(corpus, tmp_path, monkeypatch):
    res = tmp_path / "res"
    reproduce(ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, out_dir=res, rows=("i_swin",),
                              splits=(0, 1), train=TrainConfig(max_epochs=2)), progress=False)
    nb = execute("results.ipynb", tmp_path, monkeypatch, T12K_RESULTS=res)
    assert images(nb) == 4  # Table 6, per-genre AP, PR curves, training curves
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Swin-2D split1" in text and "72.96±4.17" in text
