"""benchmarks/results_index.py: the index names the file behind every README result, the README links only to
current results, and superseded runs and test logs are archived."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_index", ROOT / "benchmarks" / "results_index.py")
results_index = importlib.util.module_from_spec(_spec)
sys.modules["results_index"] = results_index  # dataclasses look their module up there
_spec.loader.exec_module(results_index)


def test_every_readme_result_is_in_the_index_with_its_run():
    text = results_index.render()
    claims = text.split("## Other current results")[0]
    targets = [t for _, t in results_index.readme_results()]
    assert len(targets) >= 20
    for target in targets:
        if target == "INDEX.md":  # the README's link to this index
            continue
        if target.startswith("INDEX.md#"):
            assert f'<a id="{target.partition("#")[2]}"></a>' in text, target
            continue
        assert f"[{target}]({target})" in claims, target
        js = (results_index.RESULTS / target).with_name(results_index.stem(Path(target)) + ".json")
        env = json.loads(js.read_text()).get("environment") if js.is_file() else None
        if env:  # the run's command and date come from its JSON (a combined table may have no environment)
            row = next(line for line in claims.splitlines() if f"[{target}]({target})" in line)
            assert env["utc"] in row and env["command"][:40].replace("|", "\\|") in row
    assert "**missing**" not in text


def test_the_readme_links_to_current_results_only():
    readme = results_index.README.read_text()
    assert not re.findall(r"\]\(benchmarks/results/[^)]*/archive/", readme)
    for _, target in results_index.readme_results():
        assert "/archive/" not in target


def test_superseded_runs_and_test_logs_are_archived():
    current, archived = results_index.result_files()
    for path in current:
        assert not re.fullmatch(r"gpu_tests.*\.log|.*_(rerun|refactor_check|review_check|s6_run1|run[1-5])(_.*)?\..*",
                                path.name), f"{path.relative_to(ROOT)} belongs in archive/"
    archived_stems = {f"{p.relative_to(results_index.RESULTS).parts[0]}/{results_index.stem(p)}" for p in archived}
    for old, new in results_index.SUPERSEDED_BY.items():
        assert old in archived_stems, old
        assert any(results_index.RESULTS.glob(new + ".*")), f"{old} is superseded by {new}, which does not exist"


def test_claim_of_a_link_is_its_row_its_image_or_its_sentence():
    lines = ["| what | result | [x](benchmarks/results/a.md) |", "", "**Bold lead** and [y](benchmarks/results/b.md).",
             "", "First sentence. Second one cites", "[z](benchmarks/results/c.md).",
             "![alt text](benchmarks/results/d.png)"]
    assert results_index._claim(lines, 0, lines[0].index("[x]")) == "what"
    assert results_index._claim(lines, 2, lines[2].index("[y]")) == "Bold lead"
    assert results_index._claim(lines, 5, 0) == "Second one cites"
    assert results_index._claim(lines, 6, 0) == "alt text"
