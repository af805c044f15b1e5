"""The README's API example runs as written and prints what the README says."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_prints_what_it_claims():
    text = README.read_text()
    example = re.search(r"## The API in one example\n\n```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", text, re.S)
    assert example, "README lost its API example"
    code, expected = example.groups()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert output.getvalue() == expected
