"""The fake apiserver's parsers and patchers, by example and by property."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.kubeapi.errors import ApiError
from tests.kubeapi.patch import json_patch, merge_patch, strategic_merge_patch
from tests.kubeapi.selectors import labels_match, parse_fields, parse_labels

# --- label selectors -----------------------------------------------------------------------

LABELS = {"app": "web", "tier": "front", "n": "5", "empty": ""}


@pytest.mark.parametrize(("selector", "matches"), [
    ("", True),
    ("app=web", True),
    ("app = web", True),
    ("app==web", True),
    ("app=db", False),
    ("app!=db", True),
    ("missing!=x", True),
    ("app in (web, db)", True),
    ("app in (db)", False),
    ("app notin (db)", True),
    ("missing notin (db)", True),
    ("app notin (web)", False),
    ("app", True),
    ("missing", False),
    ("!missing", True),
    ("!app", False),
    ("empty=", True),
    ("n>4", True),
    ("n<5", False),
    ("app=web,tier=front,!missing", True),
    ("app=web,tier=back", False),
    ("example.com/key-1.x_y=v", False),
])
def test_label_selector(selector: str, matches: bool):
    assert labels_match(parse_labels(selector), LABELS) is matches


@pytest.mark.parametrize("selector", [
    "app in web", "app in (web", "=web", "app=web,", "app=(x)", "app=a b", "n>x", "-app=1",
    "app===web",
])
def test_bad_label_selectors_are_400(selector: str):
    with pytest.raises(ApiError) as e:
        parse_labels(selector)
    assert e.value.code == 400


KEY = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
VALUE = st.from_regex(r"([a-z0-9]{1,8})?", fullmatch=True)


@given(st.dictionaries(KEY, VALUE, max_size=5), st.dictionaries(KEY, VALUE, max_size=3))
def test_equality_selector_matches_supersets(labels: dict[str, str], wanted: dict[str, str]):
    selector = ",".join(f"{k}={v}" for k, v in wanted.items())
    expected = all(labels.get(k) == v and k in labels for k, v in wanted.items())
    assert labels_match(parse_labels(selector), labels) is expected


def test_field_selector():
    terms = parse_fields("spec.nodeName=n1,status.phase!=Failed", lambda f: True)
    assert [(t.field, t.equal, t.value) for t in terms] == [
        ("spec.nodeName", True, "n1"), ("status.phase", False, "Failed")]
    assert parse_fields(r"metadata.name=a\,b", lambda f: True)[0].value == "a,b"
    with pytest.raises(ApiError) as e:
        parse_fields("spec.other=x", lambda f: f == "spec.nodeName")
    assert e.value.message == "field label not supported: spec.other"


# --- patches -------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "patch", "result"), [
    # the examples of RFC 7386, appendix A
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
])
def test_merge_patch_rfc7386(target: Any, patch: Any, result: Any):
    assert merge_patch(target, patch) == result


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                               max_size=3),
    max_leaves=10,
)


@given(JSONS, JSONS)
def test_merge_patch_is_idempotent(target: Any, patch: Any):
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


def test_json_patch_errors():
    with pytest.raises(ApiError) as e:
        json_patch({"a": 1}, {"op": "add"})
    assert e.value.code == 400
    with pytest.raises(ApiError) as e:
        json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
    assert e.value.code == 422
    with pytest.raises(ApiError) as e:
        json_patch({"a": 1}, [{"op": "remove", "path": "/b"}])
    assert e.value.code == 422
    assert json_patch({"a": 1}, [{"op": "replace", "path": "/a", "value": 2}]) == {"a": 2}


def test_strategic_merge_patch():
    pod = {"metadata": {"labels": {"a": "1"}, "finalizers": ["x"]}, "spec": {
        "containers": [{"name": "main", "image": "v1"}, {"name": "side", "image": "s"}],
        "volumes": [{"name": "data", "emptyDir": {}}]}}
    out = strategic_merge_patch(pod, {
        "metadata": {"labels": {"a": None, "b": "2"}, "finalizers": ["y"]},
        "spec": {"containers": [{"name": "main", "image": "v2"},
                                {"name": "side", "$patch": "delete"},
                                {"name": "new", "image": "n"}],
                 "volumes": [{"name": "cache", "hostPath": {"path": "/var/lib/modelcache"}}]},
    })
    assert out["metadata"] == {"labels": {"b": "2"}, "finalizers": ["x", "y"]}
    assert out["spec"]["containers"] == [{"name": "main", "image": "v2"},
                                         {"name": "new", "image": "n"}]
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", "cache"]
    out = strategic_merge_patch(pod, {"spec": {"$patch": "replace", "containers": []}})
    assert out["spec"] == {"containers": []}
    out = strategic_merge_patch(pod, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}})
    assert out["metadata"]["finalizers"] == []
    with pytest.raises(ApiError) as e:
        strategic_merge_patch(pod, {"spec": {"containers": [{"image": "no-name"}]}})
    assert e.value.code == 400


# --- typed Secrets and webhook configurations ------------------------------------------------


def test_tls_secrets_need_their_keys_and_a_type_never_changes():
    from tests.kubeapi.cluster import Cluster

    c = Cluster()
    tls = {"metadata": {"name": "t"}, "type": "kubernetes.io/tls"}
    with pytest.raises(ApiError) as e:
        c.create("secrets", {**tls, "stringData": {"tls.crt": "c"}}, "default")
    assert e.value.code == 422 and "data[tls.key]: Required value" in e.value.message
    c.create("secrets", {**tls, "stringData": {"tls.crt": "c", "tls.key": "k"}}, "default")
    opaque = {**c.get("secrets", "t", "default"), "type": "Opaque"}
    with pytest.raises(ApiError) as e:
        c.update("secrets", "t", opaque, "default")
    assert e.value.code == 422 and "type: Invalid value" in e.value.message


def test_webhook_configurations_carry_ca_bundles_as_base64():
    from tests.kubeapi.cluster import Cluster

    c = Cluster()
    hook = {"name": "h.example.com", "clientConfig": {"caBundle": "not base64!"}}
    with pytest.raises(ApiError) as e:
        c.create("mutatingwebhookconfigurations",
                 {"metadata": {"name": "w"}, "webhooks": [hook]})
    assert e.value.code == 400
    hook["clientConfig"]["caBundle"] = "TFMwdExTMUNSVWRKVGc9PQ=="
    c.create("mutatingwebhookconfigurations", {"metadata": {"name": "w"}, "webhooks": [hook]})
    assert c.get("mutatingwebhookconfigurations", "w")["kind"] == "MutatingWebhookConfiguration"
