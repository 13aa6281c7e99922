"""`python -m kd.methods` lists every method from conf/method/, and docs/methods.md's table is that list."""
import subprocess
import sys

from conftest import METHODS, ROOT
from kd.methods import generated_part, table

PAGE = ROOT / "docs" / "methods.md"


def test_the_table_has_a_row_per_method_with_its_paper():
    rows = table().splitlines()[2:]
    assert [row.split("|")[1].strip().strip("`") for row in rows] == METHODS
    assert "Hinton, Vinyals & Dean" in table() and "temperature 4.0, alpha 0.7" in table()


def test_the_docs_table_is_the_generated_one():
    text = PAGE.read_text()
    start, end = generated_part(text)
    assert text[start:end] == table(), \
        "docs/methods.md's method table is out of date: run `python -m kd.methods --write docs/methods.md`"


def test_the_command_prints_it_and_writes_it_into_the_page(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kd.methods"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == table()
    page = tmp_path / "methods.md"
    text = PAGE.read_text()
    start, end = generated_part(text)
    page.write_text(text[:start] + "| stale |" + text[end:])
    subprocess.run([sys.executable, "-m", "kd.methods", "--write", str(page)], check=True, cwd=ROOT)
    assert page.read_text() == text[:start] + table() + text[end:]
