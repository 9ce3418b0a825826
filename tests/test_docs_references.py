"""What the docs point at exists: the class members, modules, links, routes and metric types they
name. Reads files only (no server, no model): a second or two. The flags, variables, defaults and
paths they name are tests/test_docs_truth.py's."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from server.metrics import Metrics
from test_docs_truth import DOCS, ROOT, prose_lines


def _classes() -> dict[str, tuple[set[str], list[str]]]:
    """Our classes (server, kernels, loadtest) -> (members: defs, class attributes, `self.x` stores; base names)."""
    import ast

    out: dict[str, tuple[set[str], list[str]]] = {}
    for path in [p for d in ("server", "kernels", "loadtest") for p in (ROOT / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            members, bases = out.setdefault(node.name, (set(), []))
            bases += [ast.unparse(b).split("[")[0].split(".")[-1] for b in node.bases]
            for n in ast.walk(node):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
                    members.add(n.name)
                elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    members.add(n.id)
                elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                    members.add(n.attr)
    return out


def test_every_class_member_the_docs_name_exists():
    """`Class.member` in a doc: the class is ours and has that member (a method, a field, a
    `self.` attribute), itself or through a base. A renamed method otherwise leaves the page
    pointing at nothing (`LLMEngine._run`, long after it became `_launch`)."""
    classes = _classes()

    def has(cls: str, member: str, depth: int = 0) -> bool:
        members, bases = classes.get(cls, (set(), []))
        return member in members or (depth < 5 and any(has(b, member, depth + 1) for b in bases))

    bad = []
    for path in DOCS:
        for n, line in prose_lines(path):
            for cls, member in re.findall(r"`([A-Z]\w*)\.(\w+)(?:\(.*?\))?`", line):
                if cls in classes and not has(cls, member):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {cls}.{member}")
    assert not bad, "no such member:\n" + "\n".join(bad)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of `path`'s headings: lower case, punctuation dropped, spaces -> dashes."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_between_docs_resolves():
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    bad = []
    for rel in tracked:
        path = ROOT / rel
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a code block's brackets are no link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file) if file else path
            if not dest.exists():
                bad.append(f"{rel}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{rel}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def _registered() -> dict[str, tuple[str, set[str]]]:
    """Every metric of server/metrics.py -> (type, label names), read from the objects themselves
    (a registry's samples show no labels before a series exists)."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.metric_types import CountedHistogram

    m = Metrics()
    out = {}
    for obj in [*vars(m).values(), *vars(m.vllm).values()]:
        if isinstance(obj, MetricWrapperBase):
            out[obj._name] = (obj._type, set(obj._labelnames))
        elif isinstance(obj, CountedHistogram):
            out[obj.name] = ("histogram", set(obj.labelnames))
    return out


def test_the_metrics_page_states_each_metrics_type_and_labels():
    """docs/metrics.md's tables against server/metrics.py, both ways: each row's type and labels
    (a label's values, in parentheses, are not labels), and every metric on the page."""
    registered = _registered()
    page = (ROOT / "docs" / "metrics.md").read_text()
    wrong = []
    for n, line in prose_lines(ROOT / "docs" / "metrics.md"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        labels = set(re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", cells[2])))
        for name in re.findall(r"`([a-z][\w:]*)`", cells[0]):
            base = name.removesuffix("_total") if name.removesuffix("_total") in registered else name
            if base not in registered:
                wrong.append(f"docs/metrics.md:{n}: {name} is not in server/metrics.py")
            elif registered[base] != (cells[1].split()[0], labels):
                wrong.append(f"docs/metrics.md:{n}: {name} is documented as {cells[1].split()[0]} {sorted(labels)}, "
                             f"the code's is {registered[base][0]} {sorted(registered[base][1])}")
    for name, (kind, _) in registered.items():
        if not re.search(rf"`{re.escape(name)}{'(_total)?' if kind == 'counter' else ''}[`{{]", page):
            wrong.append(f"docs/metrics.md does not name {name}")
    assert not wrong, "\n".join(wrong)


def test_the_readmes_api_table_lists_every_route():
    """README.md's route table and the routes the code declares (`@router.get("/v1/...")`, `@app.get`)."""
    declared = set()
    for path in (ROOT / "server" / "api").glob("*.py"):
        declared |= {(m.upper(), p.replace(":path}", "}")) for m, p in
                     re.findall(r"@(?:router|app)\.(get|post|delete)\(\"([^\"]+)\"", path.read_text())}
    documented = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        verbs = []  # "`GET` / `POST /v1/adapters`": both verbs, one path
        for span in re.findall(r"`([^`]*)`", line.split("|")[1] if line.startswith("| `") else ""):
            m = re.fullmatch(r"(GET|POST|DELETE)(?: (/\S*))?", span)
            if m and m.group(2):
                documented |= {(verb, m.group(2)) for verb in [*verbs, m.group(1)]}
                verbs = []
            elif m:
                verbs.append(m.group(1))
    assert documented - declared == set(), f"README.md names routes the code lacks: {sorted(documented - declared)}"
    assert declared - documented == set(), f"README.md's API table lacks: {sorted(declared - documented)}"



def test_every_module_a_doc_names_by_file_name_exists():
    """A bare `name.py` / `name.cpp` (architecture.md names most modules so) is a file of the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = {Path(rel).name for rel in tracked}
    bad = [f"{path.relative_to(ROOT)}:{n}: {name}" for path in DOCS for n, line in prose_lines(path)
           for name in re.findall(r"(?<![\w/.-])(\w+\.(?:py|cpp))\b", line) if name not in names]
    assert not bad, "no such file in the repository:\n" + "\n".join(bad)
