"""The Dockerfile cannot be built here (no Docker daemon, no registry access); these checks keep it consistent with
setup.py and with the rules in docs/docker.md: every runtime requirement installed, never torch, package --no-deps."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def setup_requirements(section="install_requires"):
    tree = ast.parse(read("setup.py"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == section:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {section}")


def quoted_requirements(dockerfile):
    return set(re.findall(r'"([A-Za-z0-9_.\-\[\]]+(?:[<>=!~]=?[^"]*)?)"', dockerfile))


def test_every_runtime_requirement_but_torch_is_installed():
    dockerfile = read("Dockerfile")
    installed = quoted_requirements(dockerfile)
    wanted = [r for r in setup_requirements() if not re.match(r"torch\b", r)]
    missing = [r for r in wanted if r not in installed]
    assert missing == [], f"Dockerfile lacks setup.py requirements {missing}"
    for requirement in setup_requirements("extras_require")["test"]:
        assert requirement in installed


def test_torch_and_te_come_from_the_image():
    dockerfile = read("Dockerfile")
    pip_lines = [line for line in dockerfile.splitlines() if "pip install" in line or line.strip().startswith('"')]
    assert not any(re.search(r'"(torch|transformer[-_]engine)\b', line) for line in pip_lines)
    assert 'pip install --no-deps "megatron-core==0.16.1"' in dockerfile
    assert "pip install --no-deps --no-build-isolation -e ." in dockerfile


def test_base_image_is_a_python_312_ngc_pytorch_tag_and_documented():
    tag = re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3$", read("Dockerfile"), re.M)
    assert tag, "BASE_IMAGE must be an nvcr.io/nvidia/pytorch:YY.MM-py3 tag"
    assert (int(tag.group(1)), int(tag.group(2))) >= (25, 1), "NGC PyTorch images before 25.01 ship Python 3.10"
    assert f"pytorch:{tag.group(1)}.{tag.group(2)}-py3" in read("docs/docker.md")


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in read(".dockerignore").splitlines() if line.strip() and line[0] != "#"}
    assert {".git", ".venv", "runs"} <= ignored
