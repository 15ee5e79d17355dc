"""benchmarks/cpu_revisions.py: Spatial-Mamba-T of an earlier revision against this checkout's, in one process. The
figures themselves are not tested (no timed tests); the report must say what was compared and be self-consistent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cpu_revisions.py"

pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository's git history")


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_report_names_both_revisions_and_its_ratios_are_the_medians_ratios(tmp_path):
    out = tmp_path / "revisions.json"
    result = _run("--base", "HEAD", "--rounds", "1", "--cases", "infer_b1_512", "--out", out)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert report["base"] == "HEAD" and report["base_commit"] == head
    assert Path(report["checkout"]) == ROOT / "spatial_mamba"
    (case,) = report["results"].values()
    medians = case["median_s"]
    assert set(medians) == {"base", "checkout"} and all(len(runs) == 1 for runs in case["runs_s"].values())
    assert case["checkout_over_base"] == pytest.approx(medians["checkout"] / medians["base"])
    assert f"report written to {out}" in result.stdout


def test_an_unknown_revision_is_named_in_the_error(tmp_path):
    result = _run("--base", "no-such-revision", "--out", tmp_path / "r.json")
    assert result.returncode != 0 and "git archive 'no-such-revision' failed" in result.stderr
    assert not (tmp_path / "r.json").exists()
