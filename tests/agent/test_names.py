"""File-name checks: nothing a source names can leave the model's directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.store.names import (
    MAX_DEPTH,
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    check_unique,
    join_inside,
    safe_relpath,
)
from common.errors import InvalidInput, UnsafeName

GOOD = [
    ("config.json", "config.json"),
    ("a/b/c.safetensors", "a/b/c.safetensors"),
    ("./model.bin", "model.bin"),
    ("..hidden/x", "..hidden/x"),
    ("a/...", "a/..."),
    (".gitattributes", ".gitattributes"),
    ("sub/manifest.json", "sub/manifest.json"),
    ("données/模型.bin", "données/模型.bin"),
    ("a b/c d", "a b/c d"),
    ("/".join(["d"] * MAX_DEPTH), "/".join(["d"] * MAX_DEPTH)),
    ("x" * MAX_SEGMENT_BYTES, "x" * MAX_SEGMENT_BYTES),
]


@pytest.mark.parametrize(("name", "clean"), GOOD)
def test_good_names(name: str, clean: str) -> None:
    assert safe_relpath(name) == clean


BAD = [
    ("", "is empty"),
    ("/etc/passwd", "absolute path"),
    ("//etc/passwd", "absolute path"),
    ("..", "contains '..'"),
    ("../x", "contains '..'"),
    ("a/../../x", "contains '..'"),
    ("a/..", "contains '..'"),
    ("./../x", "contains '..'"),
    ("a/./b", "contains '.'"),
    (".", "contains '.'"),
    ("a\x00b", "contains NUL"),
    ("a\nb", "control character"),
    ("a\x1bb", "control character"),
    ("a\x7fb", "control character"),
    ("a\\b", "backslash"),
    ("model\udcbf.bin", "is not valid UTF-8"),  # a tar name's byte 0xbf, surrogate-escaped
    ("a/\ud83d", "is not valid UTF-8"),  # half of a JSON surrogate pair
    ("..\\x", "backslash"),
    ("C:\\Windows", "backslash"),
    ("a//b", "empty path segment"),
    ("a/", "empty path segment"),
    ("./", "empty path segment"),
    ("././x", "contains '.'"),
    ("x" * (MAX_SEGMENT_BYTES + 1), f"longer than {MAX_SEGMENT_BYTES} bytes"),
    ("é" * 128, f"longer than {MAX_SEGMENT_BYTES} bytes"),  # 256 bytes in UTF-8
    ("/".join(["abcdefgh"] * 500), f"longer than {MAX_PATH_BYTES} bytes"),
    ("/".join(["d"] * (MAX_DEPTH + 1)), f"deeper than {MAX_DEPTH}"),
    ("manifest.json", "reserved by the store"),
    ("./manifest.json", "reserved by the store"),
    ("manifest.json/x", "reserved by the store"),
]


@pytest.mark.parametrize(("name", "says"), BAD)
def test_bad_names_name_the_problem(name: str, says: str) -> None:
    with pytest.raises(UnsafeName) as info:
        safe_relpath(name)
    assert isinstance(info.value, InvalidInput)
    assert says in str(info.value)
    if name:
        assert repr(name[:200]) in str(info.value)  # the offending name is shown


def test_message_says_what_the_name_is() -> None:
    with pytest.raises(UnsafeName, match=r"^archive member '\.\./x' contains '\.\.'$"):
        safe_relpath("../x", what="archive member")


def test_non_string_is_refused() -> None:
    with pytest.raises(UnsafeName, match="not a string"):
        safe_relpath(b"a")  # type: ignore[arg-type]


def test_check_unique_accepts_distinct_files() -> None:
    check_unique(["a", "b/c", "b/d", "bc", "b.c/d"])
    check_unique([])


@pytest.mark.parametrize(("paths", "says"), [
    (["a", "b", "a"], "'a' appears twice"),
    (["a/b", "a/b"], "'a/b' appears twice"),
    (["a", "a/b"], "'a' is both a file and a directory"),
    (["x/y/z", "x/y"], "'x/y' is both a file and a directory"),
    (["x/y/z/w", "x"], "'x' is both a file and a directory"),
])
def test_check_unique_refuses_duplicates_and_clashes(paths: list[str], says: str) -> None:
    with pytest.raises(UnsafeName) as info:
        check_unique(paths, what="listed file")
    assert says in str(info.value)
    assert "listed file" in str(info.value)


def test_join_inside(tmp_path: Path) -> None:
    assert join_inside(tmp_path, "a/b.bin") == tmp_path / "a" / "b.bin"
    assert join_inside(tmp_path, "./c") == tmp_path / "c"
    for bad in ("../x", "/etc/passwd", "a/../../x", "a\\..\\x", ""):
        with pytest.raises(UnsafeName):
            join_inside(tmp_path, bad)


@settings(max_examples=500, deadline=None)
@pytest.mark.slow
@given(st.one_of(
    st.text(max_size=40),
    # lone surrogates too (st.text leaves them out): what a tar name that was not UTF-8
    # decodes to, or a JSON "\udcXX" escape
    st.lists(st.characters() | st.characters(categories=["Cs"]), max_size=12).map("".join),
    st.lists(st.sampled_from(["..", ".", "", "a", "b.c", "/", "\\", "\x00", "é", "manifest.json",
                              "..a", "~", " "]), max_size=8).map("/".join),
    st.lists(st.sampled_from(["..", ".", "", "a", "/", "\\"]), max_size=8).map("".join),
))
@example("../../etc/passwd")
@example("a/" * 40)
def test_any_string_is_refused_or_stays_inside(name: str) -> None:
    root = Path("/srv/store/models/key/t-0")
    try:
        target = join_inside(root, name)
    except UnsafeName as e:
        assert str(e)
        return
    clean = safe_relpath(name)
    # the joined path, normalised without touching the disk, is strictly under the root
    normal = Path(os.path.normpath(target))
    assert normal == target
    assert root in normal.parents
    assert normal.relative_to(root).as_posix() == clean
    assert not any(seg in ("", ".", "..") for seg in clean.split("/"))
    assert clean.split("/")[0] != "manifest.json"
