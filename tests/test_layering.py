"""Imports run one way: datasets -> augment -> data -> models -> taps -> losses -> trainer -> run. The report reads run
folders and imports neither the trainer nor the teacher-training code; nothing below the run imports it."""
import ast
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "kd"
# Each layer, and the layers above it that it must never import.
ORDER = ["kd.datasets", "kd.augment", "kd.data", "kd.models", "kd.taps", "kd.losses", "kd.trainer", "kd.setup",
         "kd.run"]


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kd_imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kd")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from kd import teacher`
    return found


GRAPH = {module_name(p): kd_imports(p) for p in PACKAGE.rglob("*.py")}


def imports_within(module, prefix):
    return sorted(i for i in GRAPH[module] if i == prefix or i.startswith(prefix + "."))


@pytest.mark.parametrize("layer", ORDER[:-1])
def test_no_layer_imports_one_above_it(layer):
    above = ORDER[ORDER.index(layer) + 1:]
    offenders = {m: [i for top in above for i in imports_within(m, top)]
                 for m in GRAPH if m == layer or m.startswith(layer + ".")}
    assert not {m: i for m, i in offenders.items() if i}


def test_nothing_imports_the_run_command():  # the benchmark and the teacher zoo share kd.setup instead
    importers = sorted(m for m in GRAPH if imports_within(m, "kd.run"))
    assert importers == []


def test_the_report_never_imports_training_code():
    forbidden = ("kd.trainer", "kd.teacher", "kd.teacher_cache", "kd.run", "kd.losses", "kd.bench")
    report = [m for m in GRAPH if m.startswith("kd.report")]
    assert report and not {m: [i for f in forbidden for i in imports_within(m, f)] for m in report
                           if any(imports_within(m, f) for f in forbidden)}
    loaded = subprocess.run([sys.executable, "-c", "import sys, kd.report.__main__; "
                             "print(' '.join(m for m in sys.modules if m.startswith('kd')))"],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    assert "kd.report.write" in loaded
    assert not [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)], loaded
