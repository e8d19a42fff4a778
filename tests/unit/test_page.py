"""The page's pure parts: which result files it may serve, and markdown made safe to show."""
from __future__ import annotations

import os

from mmlib.serve.page import list_results, render_markdown, result_path


def test_result_paths_stay_inside_the_results_folder(tmp_path, monkeypatch):
    root = tmp_path / "results"
    (root / "p").mkdir(parents=True)
    (root / "p" / "run.json").write_text("{}")
    (root / "summary.md").write_text("# x")
    (root / "run.sh").write_text("echo")
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, root / "p" / "out.json")
    os.symlink(root / "p", root / "alias")  # a link that stays inside is fine
    monkeypatch.setenv("MM_RESULTS_DIR", str(root))
    assert result_path("p/run.json") == (root / "p" / "run.json").resolve()
    assert result_path("alias/run.json") == (root / "p" / "run.json").resolve()
    for bad in ("p/out.json", "../outside.json", "p/../../outside.json", "/etc/passwd", str(outside),
                "run.sh", "p", "nothing.json", "p/run.json\0.png"):
        assert result_path(bad) is None, bad
    assert [f["path"] for f in list_results(root)] == ["summary.md", "p/run.json"]  # links not walked


def test_markdown_renders_tables_and_no_markup_or_outside_images():
    html = render_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](../x/plot.png) ![far](http://e.com/a.png)\n"
                           "<img src=x onerror=alert(1)> [link](javascript:alert(1))\n", "sub")
    assert "<table>" in html and "<td>2</td>" in html
    assert '<img data-result="x/plot.png" alt="plot">' in html
    assert "e.com" not in html and "<img src" not in html and "href" not in html  # markup shown as text
