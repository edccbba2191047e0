"""The pack's metadata is what the Comfy Registry and ComfyUI-Manager read (docs.comfy.org/registry/
specifications, comfy-cli's `extract_node_configuration`): the node id's naming rules, a complete
`[tool.comfy]` whose Icon resolves to a file of this repository, a LICENSE with the full text of
the declared Apache-2.0, and requirements.txt (what ComfyUI-Manager installs) listing the same
runtime dependencies as pyproject.toml, which in turn declares every package the code imports."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]

# The registry's node id: under 100 characters, letters / digits / `-` `_` `.`, no two special
# characters in a row, starting with a letter (neither a digit nor a special character).
NODE_ID = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*")
# comfy-cli's `validate_version` pattern for each comma-separated part of requires-comfyui.
VERSION_PART = re.compile(r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)")
ICON_TYPES = {".svg", ".png", ".jpg", ".jpeg", ".gif"}

# Imports the code makes that are not runtime dependencies, each for a stated reason.
NOT_DEPENDENCIES = {
    "comfy": "ComfyUI itself (nodes/ only)",
    "folder_paths": "ComfyUI itself (nodes/ only)",
    "aiohttp": "ComfyUI's server (tasks_api/ only)",
    "flash_attn": "optional backend: extra flash-attn",
    "flash_attn_interface": "optional backend: FlashAttention-3, built from source",
    "sageattention": "optional backend: extra sage",
    "sgl_kernel": "optional FP8 kernel: extra sgl",
    "triton": "comes with a CUDA build of torch; kernels check for it",
    "diffusers": "tiny models in the diffusers layout (tests): extra test",
}
IMPORT_TO_DIST = {"PIL": "pillow"}
OWN_PACKAGES = {"wan_core", "nodes", "tasks_api"}


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower(): r for r in reqs}


def test_node_id_follows_the_registry_rules():
    name = PROJECT["name"]
    assert NODE_ID.fullmatch(name) and len(name) < 100, name
    assert "comfyui" not in name.lower()  # the registry's advice: the id does not repeat "ComfyUI"
    for bad in ("123-tool", "-tool", "tool--x", "tool.", "tool x"):  # the pattern rejects what the rules do
        assert not NODE_ID.fullmatch(bad), bad
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])  # semantic X.Y.Z (README: version policy)


def test_tool_comfy_is_complete():
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert isinstance(COMFY.get(key), str) and COMFY[key].strip(), key
    assert NODE_ID.fullmatch(COMFY["PublisherId"])
    assert isinstance(COMFY.get("includes", []), list)
    parts = [p.strip() for p in COMFY["requires-comfyui"].split(",")]
    assert all(VERSION_PART.fullmatch(p) for p in parts), COMFY["requires-comfyui"]
    repo = PROJECT["urls"]["Repository"]
    assert urlparse(repo).scheme == "https" and urlparse(repo).netloc


def test_icon_is_a_file_of_this_repository():
    """The Icon URL is the raw form of a file in the repository named by [project.urls], on a branch."""
    owner_repo = urlparse(PROJECT["urls"]["Repository"]).path.strip("/").removesuffix(".git")
    url = urlparse(COMFY["Icon"])
    assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com", COMFY["Icon"]
    prefix = f"/{owner_repo}/"
    assert url.path.startswith(prefix), (url.path, owner_repo)
    _branch, _, rel = url.path[len(prefix) :].partition("/")
    icon = ROOT / rel
    assert icon.is_file(), f"{rel} is not in the repository"
    assert icon.suffix.lower() in ICON_TYPES
    if icon.suffix.lower() == ".svg":
        svg = ET.parse(icon).getroot()
        w, h = (float(svg.get(k, "0").removesuffix("px")) for k in ("width", "height"))
    else:
        from PIL import Image

        with Image.open(icon) as im:
            w, h = im.size
    assert w == h and 0 < w <= 400, (w, h)  # square, at most 400 px


def test_license_is_the_full_apache_2_text():
    assert PROJECT["license"] in ({"text": "Apache-2.0"}, "Apache-2.0", {"file": "LICENSE"})
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for heading in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS"):  # fmt: skip
        assert heading in text, heading
    assert any("Apache Software License" in c for c in PROJECT.get("classifiers", []))


def test_requirements_txt_lists_the_runtime_dependencies():
    """ComfyUI-Manager and comfy-cli install requirements.txt: the same list as pyproject, less torch."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = _requirements([ln for ln in lines if ln])
    declared = _requirements(PROJECT["dependencies"])
    assert "torch" in declared and "torch" not in listed  # ComfyUI brings its own torch build
    del declared["torch"]
    assert set(listed) == set(declared), set(listed) ^ set(declared)
    for name, req in declared.items():
        assert listed[name].specifier == req.specifier, name


def _top_level_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    files = [ROOT / "__init__.py", *(p for d in OWN_PACKAGES for p in (ROOT / d).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    imports = _top_level_imports()
    assert {"torch", "safetensors", "transformers", "sentencepiece", "ftfy"} <= set(imports)  # the walk sees them
    declared = set(_requirements(PROJECT["dependencies"]))
    missing = {
        name: sorted(where)
        for name, where in imports.items()
        if name not in sys.stdlib_module_names and name not in OWN_PACKAGES and name not in NOT_DEPENDENCIES
        and IMPORT_TO_DIST.get(name, name).lower().replace("_", "-") not in declared
    }  # fmt: skip
    assert not missing, f"imported but not in [project].dependencies: {missing}"
    # protobuf is imported by transformers' conversion of a bare spiece.model, not by our code
    assert "protobuf" in declared


def test_readme_documents_the_registry_install():
    readme = (ROOT / "README.md").read_text()
    assert f"comfy node install {PROJECT['name']}" in readme
    assert "semantic versioning" in readme.lower()
