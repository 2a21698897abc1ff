"""The README documents what the code does: the job params reference is the code's own, and the
README stands alone."""

from pathlib import Path

from models.jobs import JOB_TYPES, params_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_readme_holds_the_params_reference_of_every_job_type():
    block = README.split("<!-- job-params:start -->\n")[1].split("<!-- job-params:end -->")[0]
    assert block == params_markdown(), "run `beaver jobs` and paste its output between the job-params markers"
    assert all(f"**`{name}`**" in block for name in JOB_TYPES)


def test_the_readme_stands_alone():
    assert "../shared" not in README and "DESIGN.md" not in README
