"""docs/lecture_ja.md (the lecture guide in Japanese) covers every part of the lecture and points only at
names that exist: every backquoted `ddpm_jax.x.y` imports and resolves (importlib + getattr), every
`tests/test_x.py::test_name` is a test function of that file, every notebook and repository file it names
exists. `check_guide` takes the text, so the tests below also show it failing on made-up names."""
from __future__ import annotations

import ast
import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "lecture_ja.md"

# The parts of the lecture (知能工学特別講義「深層生成モデル」), each a heading of the guide.
REQUIRED_HEADINGS = (
    "深層生成モデルとは",
    "学習プロセス",
    "生成プロセス",
    "代表的な深層生成モデル",
    "変分自己符号化器",
    "GAN",
    "フローモデル",
    "拡散モデル",
    "拡散モデルの構造",
    "q(x_t|x_{t−1})",
    "ノイズ除去ネットワーク",
    "U-Net",
    "Algorithm 1",
    "Algorithm 2",
    "Text-to-Image",
    "P(画像|テキスト)",
    "Stable Diffusion のブロックダイアグラム",
)

DOTTED_NAME = re.compile(r"`(ddpm_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
TEST_ID = re.compile(r"(tests/[\w/]+\.py)::([A-Za-z_][A-Za-z0-9_]*)")
FILE_PATH = re.compile(r"(?<![\w/])((?:docs|notebooks|experiments|ddpm_jax|tests|benchmarks)/[\w/.-]*\w\.(?:md|py|ipynb))")


def resolve(dotted: str) -> object:
    """`ddpm_jax.a.b.C.m` → the object: the longest prefix that imports as a module, then getattr the rest."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:n]).startswith(e.name):
                raise  # a missing dependency inside a module that exists: not a wrong name
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_functions(path: pathlib.Path) -> set[str]:
    """Names of the module-level functions of a test file (read with ast, not imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


test_functions.__test__ = False  # a helper, not a test


def headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


def check_guide(text: str, root: pathlib.Path = ROOT) -> list[str]:
    """Every problem of the guide's text, one line each; [] when it is right."""
    problems = []
    for dotted in sorted(set(DOTTED_NAME.findall(text))):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as e:
            problems.append(f"name `{dotted}` does not resolve: {type(e).__name__}: {e}")
    for path, name in sorted(set(TEST_ID.findall(text))):
        file = root / path
        if not file.is_file():
            problems.append(f"test file {path} (of {path}::{name}) does not exist")
        elif name not in test_functions(file):
            problems.append(f"{path} defines no test function {name}")
    for path in sorted(set(FILE_PATH.findall(text))):
        if not (root / path).exists():
            problems.append(f"file {path} does not exist")
    found = headings(text)
    for part in REQUIRED_HEADINGS:
        if not any(part in heading for heading in found):
            problems.append(f"no heading for the lecture part {part!r}")
    return problems


def test_the_guide_covers_every_part_and_names_only_what_exists():
    text = GUIDE.read_text(encoding="utf-8")
    assert check_guide(text) == []
    # it does cite things (a regex that matched nothing would pass vacuously)
    assert len(set(DOTTED_NAME.findall(text))) >= 40
    assert len(set(TEST_ID.findall(text))) >= 30
    notebooks = {p for p in FILE_PATH.findall(text) if p.endswith(".ipynb")}
    assert notebooks == {str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("0*.ipynb")}


def test_the_checker_fails_on_made_up_names():
    text = "\n".join(f"## {part}" for part in REQUIRED_HEADINGS) + (
        "\n`ddpm_jax.diffusion.q_sample` is right; `ddpm_jax.diffusion.q_sampel` is not;"
        " `ddpm_jax.gan.train` is no module; `ddpm_jax.objectives.hinge_d_loss.nope` no attribute;"
        " `ddpm_jax.pipelines.stable_diffusion.StableDiffusion.txt2img` resolves a method.\n"
        "tests/test_diffusion.py::test_posterior_is_bayes_rule exists; tests/test_diffusion.py::test_made_up does not;"
        " tests/test_no_such_family.py::test_x has no file.\n"
        "notebooks/01_forward_process.ipynb exists, notebooks/08_gan_and_flows.ipynb does not;"
        " docs/equations.md exists, docs/nothing.md does not.\n")
    problems = check_guide(text)
    assert problems == [
        "name `ddpm_jax.diffusion.q_sampel` does not resolve: AttributeError: "
        "module 'ddpm_jax.diffusion' has no attribute 'q_sampel'",
        "name `ddpm_jax.gan.train` does not resolve: AttributeError: module 'ddpm_jax' has no attribute 'gan'",
        "name `ddpm_jax.objectives.hinge_d_loss.nope` does not resolve: AttributeError: "
        "'function' object has no attribute 'nope'",
        "tests/test_diffusion.py defines no test function test_made_up",
        "test file tests/test_no_such_family.py (of tests/test_no_such_family.py::test_x) does not exist",
        "file docs/nothing.md does not exist",
        "file notebooks/08_gan_and_flows.ipynb does not exist",
        "file tests/test_no_such_family.py does not exist",
    ], problems


def test_the_checker_fails_on_a_missing_lecture_part():
    text = "\n".join(f"## {part}" for part in REQUIRED_HEADINGS if part != "フローモデル")
    assert check_guide(text) == ["no heading for the lecture part 'フローモデル'"]
    # a part named only in the body, not in a heading, does not count
    assert check_guide(text + "\nフローモデル\n") == ["no heading for the lecture part 'フローモデル'"]
