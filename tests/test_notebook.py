"""notebooks/adapters.ipynb runs top to bottom offline, and says what it should."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "adapters.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_and_switches_merges(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    last = nb.cells[-1].outputs[-1]["text"].strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["names"] == ["base", "squad", "jokes", "ia3", "prompt_tuning"]  # three methods on one base
    assert summary["methods_mixed_equals_separate"] is True
    assert summary["mixed_equals_separate"] is True
    assert summary["merge_max_logit_diff"] < 1e-4
    assert summary["merged_class"] == "T5ForConditionalGeneration"
    assert summary["methods"]["ia3"] == "merged"
    assert summary["methods"]["prompt_tuning"].startswith("refused: ") and "cannot be merged" in summary["methods"][
        "prompt_tuning"]
