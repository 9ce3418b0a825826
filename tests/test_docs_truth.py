"""The docs against the code: every server flag, environment variable, metric, repository path and
load-test flag the docs name exists, the defaults their tables state are the code's, and the
architecture page maps every module. Reads files only (no server, no model): a second or two."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from server.cli import FLAGS
from server.config import Config, parse_bytes
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
# The pages a user or an operator reads. docs/benchmarks*.md are records of runs: their commands
# are checked against the load-test scripts below, their figures are not.
GUIDES = [ROOT / "README.md", *(ROOT / "docs" / n for n in ("architecture.md", "limits.md", "operator.md",
                                                           "experts.md", "metrics.md")),
          ROOT / "deploy" / "README.md", ROOT / "loadtest" / "README.md", ROOT / "adapters_store" / "README.md"]
DOCS = GUIDES + sorted((ROOT / "docs").glob("benchmarks*.md"))
DEPLOY_TEXT = [ROOT / "Dockerfile", *sorted((ROOT / "deploy").rglob("*.y*ml"))]

SERVE_FLAGS = {f"--{f.name}": f for f in FLAGS}
# Flags a guide names that are not `loramux serve`'s, each for a reason.
OTHER_FLAGS = {
    "--config": "loramux serve's settings file",
    "--help": "loramux serve --help",
    "--file": "loramux tenants add-key NAME --file",
    "--enable-prompt-tokens-details": "vLLM's flag, named for comparison",
    "--show-hidden-metrics-for-version": "vLLM's flag, named for comparison",
    "--build-arg": "docker build's", "--gpus": "docker run's", "--local-dir": "huggingface-cli's",
}
# A line that runs another program: its flags are that program's.
OTHER_COMMAND = re.compile(r"\b(loadtest|docker|kubectl|huggingface-cli|curl|pip)\b")
NON_FLAG_ENV = {"LORAMUX_CACHE", "LORAMUX_<FLAG>"}


def prose_lines(path: Path):
    """(line number, text) of `path`, with shell continuations joined."""
    lines = path.read_text().replace("\\\n", " ").splitlines()
    return enumerate(lines, 1)


def test_every_flag_a_guide_names_is_a_serve_flag():
    bad = []
    for path in GUIDES:
        if path.parent.name == "loadtest":  # its flags are the scripts' (the last test)
            continue
        for n, line in prose_lines(path):
            if OTHER_COMMAND.search(line):
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
                if flag not in SERVE_FLAGS and flag not in OTHER_FLAGS:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {flag}")
    assert not bad, "not a `loramux serve` flag:\n" + "\n".join(bad)


def test_every_loramux_variable_is_a_flags():
    env = {f.env for f in FLAGS} | NON_FLAG_ENV
    bad = [f"{p.relative_to(ROOT)}: {v}" for p in DOCS + DEPLOY_TEXT
           for v in sorted(set(re.findall(r"LORAMUX_[A-Z_<>]+[A-Z>]", p.read_text()))) if v not in env]
    assert not bad, "no flag has this variable:\n" + "\n".join(bad)


def _table_defaults(path: Path):
    """(line, flag, default cell) of every table row whose first flag column holds one flag."""
    for n, line in prose_lines(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for i, cell in enumerate(cells[:-1]):
            m = re.fullmatch(r"`(--[a-z0-9-]+)(?: [A-Z=.]+)*`", cell)
            if m and m.group(1) in SERVE_FLAGS:
                yield n, SERVE_FLAGS[m.group(1)], cells[i + 1]
                break


NO_DEFAULT = "(no default)"


def _stated(flag, cell: str):
    """The value a table's default cell states, in the flag's own terms; None if it states none
    that can be compared (words: "the model's", "backend's", "3 x ...")."""
    cell = cell.strip("`").strip()
    if re.match(r"none\b", cell):  # "none", "none (open)", "none: the server is open"
        return NO_DEFAULT
    if flag.switch:
        words = {"off": not flag.switch_value, "(on)": not flag.switch_value}
        return words.get(cell)
    if cell in ("on", "off") and flag.convert.__name__ == "_on_off":
        return cell == "on"
    if re.fullmatch(r"\d+(\.\d+)? ?[KMG]iB", cell):
        return parse_bytes(cell.replace(" ", ""))
    if re.fullmatch(r"[\w.-]+", cell) and not re.fullmatch(r"none|the|backend's", cell):
        try:
            return flag.convert(cell)
        except (ValueError, TypeError):
            return None
    return None


@pytest.mark.parametrize("doc", ["README.md", "docs/limits.md", "docs/operator.md"])
def test_the_defaults_the_tables_state_are_the_codes(doc):
    defaults = Config()
    wrong, checked = [], 0
    for n, flag, cell in _table_defaults(ROOT / doc):
        stated = _stated(flag, cell)
        if stated is None:
            continue
        section, field = flag.path.split(".")
        actual = getattr(getattr(defaults, section), field)
        checked += 1
        if stated != (NO_DEFAULT if actual is None or actual == {} else actual):
            wrong.append(f"{doc}:{n}: --{flag.name} is documented as {cell!r}, the code's default is {actual!r}")
    assert checked >= 5 if doc != "docs/operator.md" else checked >= 1, f"{doc}: the table parser found no defaults"
    assert not wrong, "\n".join(wrong)


def test_every_metric_the_docs_name_exists():
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    bad = []
    for path in DOCS + [ROOT / "deploy" / "grafana" / "dashboards" / "loramux.json"]:
        for n, line in prose_lines(path):
            for name in re.findall(r"\b(?:loramux_[a-z0-9_]*[a-z0-9]|vllm:[a-z0-9_]+)", line):
                # `loramux_tenant_*` names a group; a kernel build directory is no metric.
                if line[line.find(name) + len(name):].startswith("_*") or name.startswith("loramux_paged_attention"):
                    continue
                if name not in names:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not bad, "not in server/metrics.py:\n" + "\n".join(bad)


REPO_PATH = re.compile(r"(?<![\w./-])((?:server|kernels|loadtest|tests|deploy|docs|adapters_store)/[\w./-]*[\w/])(?![\w*])")
NOT_OURS = {"docs/proposals/003-model-server-protocol": "a path in the Gateway API Inference Extension's repository",
            "adapters_store/my-adapter": "an example of where to put one's own adapter"}


def test_every_repository_path_the_docs_name_exists():
    bad = []
    for path in DOCS + DEPLOY_TEXT:
        for n, line in prose_lines(path):
            for rel in REPO_PATH.findall(line):
                rel = rel.rstrip(".")
                if "<" in rel or rel in NOT_OURS:
                    continue
                if not ((ROOT / rel).exists() or (path.parent / rel).exists()):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {rel}")
    assert not bad, "no such file in the repository:\n" + "\n".join(bad)


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for rel in tracked:
        path = ROOT / rel
        if path.suffix not in (".md", ".py", ".yaml", ".yml", ".toml", ".sh", ".json", "") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(r"\.\./shared\b|(?<![\w.])/work/\w", text):
            bad.append(f"{rel}: {text[max(0, m.start() - 30):m.end() + 30]!r}")
    assert not bad, "\n".join(bad)


def test_the_architecture_page_maps_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
    missing = []
    for path in sorted([*(ROOT / "server").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py":
            continue
        # Named by its file name, its module path, or (in a package of several) its package's folder.
        folder = f"{rel.parent}/"
        if path.name not in page and path.stem not in page and folder not in page:
            missing.append(str(rel))
    assert not missing, "docs/architecture.md does not name: " + ", ".join(missing)


def _script_flags(script: Path) -> set[str]:
    """The flags `script` and the loadtest modules it imports declare (argparse string literals)."""
    text = script.read_text()
    sources = [text]
    for mod in re.findall(r"^from loadtest(?:\.(\w+))? import ([\w, ]+)", text, re.M):
        names = [mod[0]] if mod[0] else [n.strip() for n in mod[1].split(",")]
        sources += [(script.parent / f"{n}.py").read_text() for n in names if (script.parent / f"{n}.py").exists()]
    return set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", "\n".join(sources)))


def test_every_load_test_command_in_the_docs_uses_flags_its_script_has():
    bad = []
    for path in DOCS:
        for n, line in prose_lines(path):
            m = re.search(r"loadtest[/.](\w+)(?:\.py)?", line)
            if not m or ("python" not in line and not re.search(r"`loadtest/\w+\.py --", line)):  # a command
                continue
            script = ROOT / "loadtest" / f"{m.group(1)}.py"
            assert script.exists(), f"{path.relative_to(ROOT)}:{n}: no loadtest/{m.group(1)}.py"
            rest = line[m.end():].split("#")[0].split(" -- ")[0]  # after `--`: server flags
            have = _script_flags(script)
            bad += [f"{path.relative_to(ROOT)}:{n}: {script.name} has no {flag}"
                    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest) if flag not in have]
    assert not bad, "\n".join(bad)


def _imports(path: Path) -> set[str]:
    """The absolute modules `path` imports, at any depth (lazy imports too)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_imports_go_the_way_the_architecture_page_says():
    """docs/architecture.md: `api`, `engine`, `adapters`, then `model` and `tenants`, each importing
    only from those after it; `kernels` from `engine` and `adapters/staging.py`; metrics and
    config nothing of ours but metric_types.py; the one named exception."""
    order = ["api", "engine", "adapters", "model", "tenants"]
    exceptions = {("server/adapters/manager.py", "server.engine.residency")}
    kernel_users = {"server/adapters/staging.py"}
    bad = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        layer = path.relative_to(ROOT / "server").parts[0]
        for mod in sorted(_imports(path)):
            if (rel, mod) in exceptions:
                continue
            if mod.split(".")[0] == "kernels" and layer != "engine" and rel not in kernel_users:
                bad.append(f"{rel} imports {mod}")
            if not mod.startswith("server."):
                continue
            target = mod.split(".")[1]
            if layer in ("metrics.py", "config.py", "metric_types.py") and mod != "server.metric_types":
                bad.append(f"{rel} imports {mod}")
            elif layer in order and target in order and (order.index(target) < order.index(layer)
                                                         or {layer, target} == {"model", "tenants"}):
                bad.append(f"{rel} imports {mod}")
    assert not bad, "against the import order of docs/architecture.md:\n" + "\n".join(bad)


def test_every_serve_flag_is_named_by_a_guide():
    """The other way round: no setting only --help knows of."""
    text = "\n".join(p.read_text() for p in GUIDES if p.parent.name != "loadtest")  # its flags are the scripts'
    missing = [f"--{f.name}" for f in FLAGS
               if not re.search(rf"--{re.escape(f.name)}(?![\w-])", text) and f.env not in text]
    assert not missing, "no guide names: " + ", ".join(missing)


# Standard-library modules newer than some Python a `requires-python` bound may admit.
NEW_STDLIB = {"tomllib": (3, 11)}


def test_the_python_the_package_admits_has_the_modules_it_imports():
    """pyproject.toml's `requires-python` lower bound: a user on that Python must be able to import the
    package (a bound of 3.10 admitted Pythons without `tomllib`, which `loramux serve` imports at start)."""
    bound = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert bound, "pyproject.toml: no requires-python lower bound"
    lowest = (int(bound.group(1)), int(bound.group(2)))
    bad = [f"{path.relative_to(ROOT)} imports {mod} (Python {'.'.join(map(str, NEW_STDLIB[mod]))}+)"
           for path in sorted([*(ROOT / "server").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
           for mod in _imports(path) if mod in NEW_STDLIB and NEW_STDLIB[mod] > lowest]
    assert not bad, f"requires-python admits {'.'.join(map(str, lowest))}, but:\n" + "\n".join(bad)
