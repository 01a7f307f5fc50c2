"""The model reference grammar: what each scheme accepts, its canonical form and its key."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from common.errors import InvalidInput, InvalidReference
from common.reference import (
    KEY_HEX,
    LABEL_PREFIX,
    MAX_GLOBS,
    MAX_URI_LENGTH,
    SCHEMES,
    Reference,
    credentials_scope,
    key_of,
    parse,
    parse_include,
    scoped,
    split_host_port,
)

DIGEST = "sha256:" + "ab" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# --- good references, per scheme -------------------------------------------------------------

GOOD = [
    # (written, canonical uri, host, path, revision)
    ("hf://Qwen/Qwen2.5-0.5B@main", "hf://Qwen/Qwen2.5-0.5B@main", "", "Qwen/Qwen2.5-0.5B", "main"),
    ("hf://Qwen/Qwen2.5-0.5B", "hf://Qwen/Qwen2.5-0.5B@main", "", "Qwen/Qwen2.5-0.5B", "main"),
    ("hf://gpt2", "hf://gpt2@main", "", "gpt2", "main"),
    ("HF://org/repo/", "hf://org/repo@main", "", "org/repo", "main"),
    ("hf://org/repo@refs/pr/1", "hf://org/repo@refs/pr/1", "", "org/repo", "refs/pr/1"),
    (f"hf://org/repo@{COMMIT}", f"hf://org/repo@{COMMIT}", "", "org/repo", COMMIT),
    ("oci://registry:5000/models/granite:1.0", "oci://registry:5000/models/granite:1.0",
     "registry:5000", "models/granite", "1.0"),
    ("oci://Registry:5000/models/granite", "oci://registry:5000/models/granite:latest",
     "registry:5000", "models/granite", "latest"),
    (f"oci://r.example.com/a/b@{DIGEST}", f"oci://r.example.com/a/b@{DIGEST}",
     "r.example.com", "a/b", DIGEST),
    (f"oci://r/m:1.0@{DIGEST}", f"oci://r/m@{DIGEST}", "r", "m", DIGEST),
    ("oci://[::1]:5000/m", "oci://[::1]:5000/m:latest", "[::1]:5000", "m", "latest"),
    ("oci://10.0.0.1/m__x/y-z:v", "oci://10.0.0.1/m__x/y-z:v", "10.0.0.1", "m__x/y-z", "v"),
    ("http://Host:80/a/b.bin", "http://host/a/b.bin", "host", "a/b.bin", ""),
    ("https://host:443/m.tar.gz", "https://host/m.tar.gz", "host", "m.tar.gz", ""),
    ("https://host:8443/m", "https://host:8443/m", "host:8443", "m", ""),
    ("http://host:443/m", "http://host:443/m", "host:443", "m", ""),
    ("http://[::1]:8080/a", "http://[::1]:8080/a", "[::1]:8080", "a", ""),
    ("http://[::1]:80/a", "http://[::1]/a", "[::1]", "a", ""),
    ("http://127.0.0.1:8080/a?x=1&y=2", "http://127.0.0.1:8080/a?x=1&y=2", "127.0.0.1:8080",
     "a?x=1&y=2", ""),
    ("http://h/a?", "http://h/a", "h", "a", ""),
    ("s3://models/llama-3-8b/", "s3://models/llama-3-8b", "models", "llama-3-8b", ""),
    ("s3://models//llama/v1//", "s3://models/llama/v1", "models", "llama/v1", ""),
    ("s3://models/a//b", "s3://models/a//b", "models", "a//b", ""),
    ("s3://models", "s3://models", "models", "", ""),
    ("s3://my.bucket-1/", "s3://my.bucket-1", "my.bucket-1", "", ""),
    ("model-registry://iris/v1", "model-registry://iris/v1", "", "iris", "v1"),
    ("model-registry://mr.kubeflow:8080/iris/v1", "model-registry://mr.kubeflow:8080/iris/v1",
     "mr.kubeflow:8080", "iris", "v1"),
    ("model-registry://my%20model/v 1", "model-registry://my%20model/v%201", "",
     "my model", "v 1"),
    ("file:///mnt/seed/llama", "file:///mnt/seed/llama", "", "/mnt/seed/llama", ""),
    ("file:///mnt//seed/llama/", "file:///mnt/seed/llama", "", "/mnt/seed/llama", ""),
    ("file://localhost/mnt/x", "file:///mnt/x", "", "/mnt/x", ""),
    ("file:////mnt/x", "file:///mnt/x", "", "/mnt/x", ""),
    ("pvc://model-pvc/granite-7b", "pvc://model-pvc/granite-7b", "model-pvc", "granite-7b", ""),
    ("pvc://model-pvc/", "pvc://model-pvc", "model-pvc", "", ""),
    ("  hf://org/repo  ", "hf://org/repo@main", "", "org/repo", "main"),
]


@pytest.mark.parametrize(("written", "uri", "host", "path", "revision"), GOOD)
def test_good_references_parse_to_their_canonical_form(written: str, uri: str, host: str,
                                                       path: str, revision: str) -> None:
    ref = parse(written)
    assert (ref.host, ref.path, ref.revision) == (host, path, revision)
    assert ref.uri == uri
    assert ref.scheme in SCHEMES
    # the canonical form is a fixed point
    assert parse(ref.uri) == ref
    assert re.fullmatch(rf"[0-9a-f]{{{KEY_HEX}}}", ref.key)


# --- bad references: the exact class and a message naming what is wrong ---------------------

BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("x" * (MAX_URI_LENGTH + 1), "longer than"),
    ("hf://org/repo\x01", "control character"),
    ("hf://org/repo\x7f", "control character"),
    ("hf://org/re\npo", "control character"),
    ("hf://org/re\udcbfpo", "not valid UTF-8"),  # a lone surrogate (JSON "\udcbf")
    ("https://host/a b.bin", "contains a space; percent-encode it"),
    ("HTTP://0/0 ?", "contains a space"),  # found by hypothesis: "0 " then did not round-trip
    ("Qwen/Qwen2.5", "no scheme"),
    ("hf:/org/repo", "no scheme"),
    ("ftp://host/file", "unknown scheme 'ftp'"),
    ("://host/file", "unknown scheme ''"),
    # hf
    ("hf://", "repository ''"),
    ("hf://a/b/c", "repository 'a/b/c'"),
    ("hf://-org/repo", "repository '-org/repo'"),
    ("hf://org/re..po", "repository 'org/re..po'"),
    ("hf://org/re--po", "repository 'org/re--po'"),
    ("hf://org/repo@", "empty revision"),
    ("hf://org/repo@main..x", "revision 'main..x'"),
    ("hf://org/repo@main/", "revision 'main/'"),
    ("hf://org/repo@-x", "revision '-x'"),
    ("hf://org/repo?x=1", "query or fragment"),
    ("hf://org/repo#x", "query or fragment"),
    # oci
    ("oci://registry:5000", "REGISTRY/REPOSITORY"),
    ("oci://registry/", "REGISTRY/REPOSITORY"),
    ("oci://registry/Models", "repository 'Models'"),
    ("oci://registry/m:", "tag ''"),
    ("oci://registry/m:-bad", "tag '-bad'"),
    ("oci://registry/m@sha256:abc", "digest 'sha256:abc'"),
    ("oci://registry/m@md5:" + "a" * 32, "is not a sha256 digest"),
    ("oci://registry/m:1.0:2.0", "repository 'm:1.0'"),
    ("oci://bad_host/m", "'bad_host' is not a valid host name"),
    ("oci://registry:0/m", "invalid port"),
    ("oci://registry:70000/m", "invalid port"),
    ("oci://registry:abc/m", "invalid port"),
    ("oci://[::1/m", "unclosed '['"),
    ("oci://[::1]x/m", "malformed"),
    ("oci://registry/m?x", "query or fragment"),
    # http(s)
    ("http://h", "must name a file"),
    ("http://h/", "must name a file"),
    ("http://h/dir/", "must name a file"),
    ("http:///a", "has no host"),
    ("http://user:pw@h/a", "credentials"),
    ("http://token@h/a", "credentials"),
    ("http://h/a#frag", "fragment"),
    ("http://h:99999/a", "invalid port"),
    ("http://h:0/a", "invalid port"),
    ("http://h/a/../b", "'..'"),
    ("http://h/a/%2e%2E/b", "'..'"),
    ("http://h/./b", "'.'"),
    ("http://h/a%00b", "NUL or backslash"),
    ("http://h/a%5cb", "NUL or backslash"),
    ("http://bad_host/a", "'bad_host' is not a valid host name"),
    ("http://[::1/a", "malformed"),
    ("https://[]=/a", "malformed"),
    ("http://[zz::1]/a", "malformed"),
    # s3
    ("s3://ab", "bucket 'ab'"),
    ("s3://AB/x", "bucket 'AB'"),
    ("s3://a..b/x", "bucket 'a..b'"),
    ("s3://-ab/x", "bucket '-ab'"),
    ("s3://bucket/../x", "prefix contains '..'"),
    ("s3://bucket/x?versionId=1", "query or fragment"),
    ("s3://bucket/a\\b", "NUL or backslash"),
    # model-registry
    ("model-registry://iris", "[HOST[:PORT]/]MODEL/VERSION"),
    ("model-registry://h/a/b/c", "[HOST[:PORT]/]MODEL/VERSION"),
    ("model-registry://h:99999/a/b", "invalid port"),
    ("model-registry://bad_host/a/b", "'bad_host' is not a valid host name"),
    ("model-registry://iris/v1?x", "query or fragment"),
    ("model-registry://iris%2Fx/v1", "model name 'iris/x'"),
    ("model-registry://iris/%01", "version name '\\x01'"),
    # file
    ("file://host/x", "must name a local path"),
    ("file:///", "root directory"),
    ("file://", "root directory"),
    ("file:///a/../b", "'..'"),
    ("file:///a/./b", "'.'"),
    ("file:///a?x", "query or fragment"),
    ("file:///a\\b", "NUL or backslash"),
    # pvc
    ("pvc://Bad/x", "claim name 'Bad'"),
    ("pvc://", "claim name ''"),
    ("pvc://c/../x", "sub path contains '..'"),
    ("pvc://c/x#y", "query or fragment"),
]


@pytest.mark.parametrize(("uri", "says"), BAD)
def test_bad_references_name_what_is_wrong(uri: str, says: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse(uri)
    assert type(info.value) is InvalidReference
    assert isinstance(info.value, InvalidInput)
    assert says in str(info.value)
    assert info.value.reason == "invalid_reference"


def test_non_string_uri_is_refused() -> None:
    with pytest.raises(InvalidReference, match="must be a string"):
        parse(123)  # type: ignore[arg-type]


# --- include globs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("include", "says"), [
    (["*.json", ""], "empty"),
    ("a,,b", "empty"),
    (["/abs/*"], "absolute"),
    (["../x"], "'..'"),
    (["a/../b"], "'..'"),
    (["[ab"], "unbalanced"),
    (["a\x01"], "control character"),
    (["a\udcbf"], "not valid UTF-8"),
    (["x" * 257], "longer than 256"),
    ([f"g{i}" for i in range(MAX_GLOBS + 1)], "too many include globs"),
    ([1], "must be strings"),
])
def test_bad_include_globs(include: object, says: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse("hf://org/repo", include)  # type: ignore[arg-type]
    assert says in str(info.value)


def test_include_globs_are_stripped_deduplicated_and_sorted() -> None:
    assert parse_include(" b , a ,b") == ("a", "b")
    assert parse_include(["b", "a", "a"]) == ("a", "b")
    assert parse_include(None) == ()
    assert parse_include("") == ()  # an empty annotation selects everything
    assert parse_include([]) == ()


# --- key stability ---------------------------------------------------------------------------

SAME = [
    ["hf://org/repo", "hf://org/repo@main", "HF://org/repo/", "hf://org/repo/@main",
     " hf://org/repo "],
    ["oci://registry:5000/m", "oci://Registry:5000/m:latest", "OCI://REGISTRY:5000/m"],
    ["http://host/a.bin", "http://HOST:80/a.bin", "HTTP://host:80/a.bin"],
    ["https://host/a.bin", "https://host:443/a.bin", "https://Host/a.bin?"],
    ["http://[::1]/a", "http://[0:0::1]:80/a", "http://[::0001]/a"],
    ["s3://bucket/prefix", "s3://bucket/prefix/", "s3://bucket/prefix//"],
    ["s3://bucket", "s3://bucket/"],
    ["model-registry://iris/v1", "model-registry://iris/v1/", "model-registry://ir%69s/v1"],
    ["file:///mnt/x", "file:///mnt/x/", "file://localhost/mnt/x", "file:///mnt//x",
     "file:////mnt/x"],
    ["pvc://claim/sub", "pvc://claim/sub/", "pvc://claim//sub"],
]


@pytest.mark.parametrize("spellings", SAME)
def test_the_same_reference_written_differently_has_one_key(spellings: list[str]) -> None:
    keys = {key_of(s) for s in spellings}
    assert len(keys) == 1, {s: key_of(s) for s in spellings}
    assert len({parse(s).uri for s in spellings}) == 1


def test_include_order_and_duplicates_do_not_change_the_key() -> None:
    base = key_of("hf://org/repo", ["*.json", "*.safetensors"])
    assert key_of("hf://org/repo", ["*.safetensors", "*.json"]) == base
    assert key_of("hf://org/repo", ["*.json", "*.safetensors", "*.json"]) == base
    assert key_of("hf://org/repo", "*.safetensors, *.json") == base
    assert key_of("hf://org/repo", "") == key_of("hf://org/repo", None) == key_of("hf://org/repo")


DIFFERENT = [
    "hf://org/repo", "hf://org/repo@dev", "hf://other/repo",
    "oci://registry:5000/m", "oci://registry:5001/m", "oci://registry:5000/m:1.0",
    f"oci://registry:5000/m@{DIGEST}", "oci://registry/m",
    "http://host/a.bin", "https://host/a.bin", "http://host:8080/a.bin", "http://host/b.bin",
    "http://host/a.bin?v=2",
    "s3://bucket/prefix", "s3://bucket/prefix/sub", "s3://bucket",
    "model-registry://iris/v1", "model-registry://iris/v2", "model-registry://h/iris/v1",
    "file:///mnt/x", "file:///mnt/y", "pvc://claim", "pvc://claim/sub",
]


def test_different_references_have_different_keys() -> None:
    keys = [key_of(u) for u in DIFFERENT]
    assert len(set(keys)) == len(DIFFERENT)
    with_globs = key_of("hf://org/repo", ["*.json"])
    assert with_globs not in keys
    assert with_globs != key_of("hf://org/repo", ["*.bin"])


def test_key_is_fixed_by_the_canonical_form() -> None:
    # The webhook computes the key without the agent: it must not drift between releases.
    ref = parse("hf://Qwen/Qwen2.5-0.5B@main", ["*.json", "*.safetensors"])
    assert ref.canonical == "hf://Qwen/Qwen2.5-0.5B@main\n*.json\n*.safetensors"
    import hashlib
    assert ref.key == hashlib.sha256(ref.canonical.encode()).hexdigest()[:KEY_HEX]


# --- derived fields --------------------------------------------------------------------------

_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.mark.parametrize("uri", [u for u, *_ in GOOD])
def test_node_label_is_a_valid_kubernetes_label_key(uri: str) -> None:
    ref = parse(uri)
    label = ref.node_label
    prefix, _, name = label.partition("/")
    assert label.startswith(LABEL_PREFIX)
    assert _DNS_SUBDOMAIN.match(prefix) and len(prefix) <= 253
    assert _LABEL_NAME.match(name) and len(name) <= 63
    assert name == "m-" + ref.key[:16]


def test_display_hides_secret_looking_query_values() -> None:
    ref = parse("https://host/m.bin?X-Amz-Credential=AKIA123&X-Amz-Signature=deadbeef"
                "&token=s3cr3t&api_key=k3y&sig=zz&version=7&flag")
    shown = ref.display
    for secret in ("AKIA123", "deadbeef", "s3cr3t", "k3y", "zz"):
        assert secret not in shown
        assert secret not in str(ref)
    assert "X-Amz-Credential=REDACTED" in shown
    assert "version=7" in shown and shown.endswith("&flag")
    assert shown.startswith("https://host/m.bin?")
    assert "deadbeef" in ref.uri  # the key still depends on the whole URL


@pytest.mark.parametrize("query", ["%74oken=s3cr3t", "auth=s3cr3t", "passwd=s3cr3t",
                                   "jwt=s3cr3t", "Access+Key=s3cr3t", "X-Goog-Signature=s3cr3t"])
def test_display_sees_through_spellings_of_secret_keys(query: str) -> None:
    ref = parse(f"https://host/m.bin?{query}&page=2")
    assert "s3cr3t" not in ref.display
    assert ref.display.endswith("=REDACTED&page=2")


def test_display_of_references_without_query_is_the_uri() -> None:
    for uri in ("hf://org/repo", "https://host/m.bin", "s3://bucket/p"):
        assert parse(uri).display == parse(uri).uri


def test_immutable_and_cached() -> None:
    assert parse(f"hf://org/repo@{COMMIT}").immutable
    assert not parse("hf://org/repo@main").immutable
    assert parse(f"oci://r/m@{DIGEST}").immutable
    assert not parse("oci://r/m:1.0").immutable
    assert not parse("https://h/a").immutable
    assert not parse("pvc://claim").cached
    assert all(parse(u).cached for u, *_ in GOOD if not u.startswith("pvc"))


def test_with_revision_keeps_everything_else() -> None:
    ref = parse("hf://org/repo@main", ["*.json"])
    pinned = ref.with_revision(COMMIT)
    assert (pinned.scheme, pinned.path, pinned.include) == (ref.scheme, ref.path, ref.include)
    assert pinned.revision == COMMIT and pinned.immutable and pinned.key != ref.key


def test_split_host_port() -> None:
    assert split_host_port("host", 80) == ("host", 80)
    assert split_host_port("host:8080", 80) == ("host", 8080)
    assert split_host_port("[::1]", 443) == ("::1", 443)
    assert split_host_port("[::1]:5000", 443) == ("::1", 5000)


# --- matches() -------------------------------------------------------------------------------


def test_matches_semantics() -> None:
    everything = parse("hf://org/repo")
    assert everything.matches("any/path.bin")
    ref = parse("hf://org/repo", ["*.json", "weights/*.safetensors", "tokenizer.model"])
    assert ref.matches("config.json")
    assert ref.matches("sub/dir/config.json")  # no '/' in the glob: also tried on the base name
    assert ref.matches("weights/a.safetensors")
    assert ref.matches("weights/deep/a.safetensors")  # '*' crosses '/'
    assert not ref.matches("other/a.safetensors")
    assert ref.matches("x/tokenizer.model")
    assert not ref.matches("model.bin")
    assert not ref.matches("config.json.bak")
    assert not parse("hf://org/repo", ["*.JSON"]).matches("config.json")  # case-sensitive


# --- properties ------------------------------------------------------------------------------

_URI_CHARS = st.sampled_from(list("aZ09-._~:/@?#[]%&=+ \\é\x00\x7f"))
_anything = st.one_of(
    st.text(max_size=60),
    st.builds(lambda s, t: s + "://" + t, st.sampled_from([*SCHEMES, "HTTP", "x"]),
              st.text(_URI_CHARS, max_size=50)),
)


@settings(max_examples=400, deadline=None)
@example("HTTP://0/0 ?", None)
@given(_anything, st.one_of(st.none(), st.text(max_size=20), st.lists(st.text(max_size=8),
                                                                       max_size=4)))
def test_parse_never_crashes(uri: str, include: object) -> None:
    try:
        ref = parse(uri, include)  # type: ignore[arg-type]
    except InvalidReference as e:
        assert str(e)
        return
    assert parse(ref.uri, ref.include) == ref


def _rx(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


_label = _rx(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?")
# a name whose last label is a number is an address in some number form, or no valid host
_dns = st.lists(_label, min_size=1, max_size=3).map(".".join).filter(
    lambda n: not re.fullmatch(r"[0-9]+|0x[0-9a-f]*", n.rsplit(".", 1)[-1]))
_port = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
_host = st.one_of(
    st.tuples(_dns, _port).map("".join),
    st.tuples(st.ip_addresses(v=4).map(str), _port).map("".join),
    st.tuples(st.ip_addresses(v=6).map(lambda a: f"[{a}]"), _port).map("".join),
)
_seg = _rx(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,8}")
_segs = st.lists(_seg, min_size=1, max_size=4).map("/".join)
_hf_part = _rx(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}").filter(
    lambda s: ".." not in s and "--" not in s)
_globs = st.lists(_rx(r"[a-z*?][a-z0-9*?._-]{0,6}(/[a-z0-9*?._-]{1,6})?").filter(
    lambda g: ".." not in g.split("/")), max_size=3)


@st.composite
def _references(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(SCHEMES))
    if scheme == "hf":
        repo = draw(st.one_of(_hf_part, st.tuples(_hf_part, _hf_part).map("/".join)))
        rev = draw(st.one_of(st.just(""), _rx(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,10}"),
                             st.integers(1, 999).map(lambda n: f"refs/pr/{n}")))
        return f"hf://{repo}" + (f"@{rev}" if rev else "")
    if scheme == "oci":
        comp = _rx(r"[a-z0-9]{1,4}((\.|_|__|-+)[a-z0-9]{1,4}){0,2}")
        repo = draw(st.lists(comp, min_size=1, max_size=3).map("/".join))
        suffix = draw(st.one_of(st.just(""), _rx(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,10}").map(
            lambda t: f":{t}"), _rx(r"[a-f0-9]{64}").map(lambda d: f"@sha256:{d}")))
        return f"oci://{draw(_host)}/{repo}{suffix}"
    if scheme in ("http", "https"):
        query = draw(st.one_of(st.just(""), _rx(r"[a-z]{1,5}=[a-z0-9]{0,5}").map(
            lambda q: f"?{q}")))
        return f"{scheme}://{draw(_host)}/{draw(_segs)}{query}"
    if scheme == "s3":
        bucket = draw(_rx(r"[a-z0-9][a-z0-9-]{1,10}[a-z0-9]"))
        prefix = draw(st.one_of(st.just(""), _segs))
        return f"s3://{bucket}/{prefix}" + draw(st.sampled_from(["", "/"]))
    if scheme == "model-registry":
        name = st.text(st.characters(min_codepoint=0x20, blacklist_characters="/?#%\x7f",
                                     blacklist_categories=("Cs",)), min_size=1, max_size=8)
        host = draw(st.one_of(st.just(""), _host.map(lambda h: h + "/")))
        return f"model-registry://{host}{draw(name).strip() or 'm'}/{draw(name).strip() or 'v'}"
    if scheme == "file":
        return f"file:///{draw(_segs)}" + draw(st.sampled_from(["", "/"]))
    claim = draw(_rx(r"[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?"))
    return f"pvc://{claim}" + draw(st.one_of(st.just(""), _segs.map(lambda s: "/" + s)))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(_references(), _globs)
def test_round_trip_of_valid_references(uri: str, globs: list[str]) -> None:
    ref = parse(uri, globs)
    again = parse(ref.uri, ref.include)
    assert again == ref
    assert again.key == ref.key
    assert parse(ref.uri, list(reversed(ref.include)) + list(ref.include)).key == ref.key
    assert isinstance(ref, Reference) and ref.uri == again.uri


@settings(max_examples=200, deadline=None)
@given(_segs, _globs)
def test_matches_properties(path: str, globs: list[str]) -> None:
    ref = parse("hf://org/repo", globs)
    if not ref.include:
        assert ref.matches(path)
    # a path that is exactly one of the globs (no wildcard) is selected
    literal = parse("hf://org/repo", [path])
    assert literal.matches(path)
    # a glob without '/' also selects the file by its base name, at any depth
    base = path.rsplit("/", 1)[-1]
    if not any(c in base for c in "*?["):
        assert parse("hf://org/repo", [base]).matches(f"deep/er/{path}")
    # adding globs never deselects a file
    if ref.matches(path) and globs:
        assert parse("hf://org/repo", [*globs, "zzz-nothing"]).matches(path)


def test_the_credentials_scope_is_part_of_the_key() -> None:
    """One private URI: a directory per namespace and Secret, one without credentials, and
    the scope as the webhook, the agent and the init container all compute it."""
    uri = "hf://org/private@main"
    public = parse(uri)
    a = scoped(uri, namespace="team-a", credentials="hf")
    keys = {public.key, a.key, scoped(uri, namespace="team-b", credentials="hf").key,
            scoped(uri, namespace="team-a", credentials="other").key,
            scoped(uri, credentials="hf").key}  # standalone: the name alone
    assert len(keys) == 5
    assert a.credentials == "team-a/hf" and public.credentials == ""
    assert scoped(uri) == public and scoped(uri, namespace="team-a") == public
    # the scope survives the round trip through a manifest (parse of what it records)
    assert parse(uri, (), "", a.credentials).key == a.key
    assert a.with_revision("0" * 40).credentials == a.credentials
    # the two scopes are lines of their own: no glob, no policy can forge one
    both = scoped(uri, namespace="team-a", credentials="hf", verify="release")
    assert both.canonical.split("\n")[1:] == ["\0credentials=team-a/hf",
                                             "\0verify=team-a/release"]
    assert both.key != scoped(uri, namespace="team-a", verify="release").key


@pytest.mark.parametrize(("namespace", "name", "says"), [
    ("team-a", "Bad_Name", "not a Secret name"), ("Team_A", "hf", "not a valid namespace"),
    ("team-a", "", "not a Secret name"),
])
def test_a_bad_credentials_scope_is_refused(namespace: str, name: str, says: str) -> None:
    with pytest.raises(InvalidReference, match=says):
        credentials_scope(namespace, name)


def test_an_archive_url_may_unpack() -> None:
    assert parse("https://h.example/m.tar.gz").may_unpack
    assert parse("oci://r.example/m:1").may_unpack  # a modelcar's tar layers
    assert not parse("https://h.example/m.safetensors?x=a.tar").may_unpack
    assert not parse("hf://org/m").may_unpack and not parse("s3://bucket/m").may_unpack
