"""``model-registry://[HOST[:PORT]/]MODEL/VERSION``: a version registered in a Kubeflow Model
Registry, pulled from wherever its model artifact points.

The registry's REST API (``/api/model_registry/v1alpha3``) is asked, in three requests:

1. ``GET registered_model?name=MODEL``: the registered model's id;
2. ``GET model_version?name=VERSION&parentResourceId=<id>``: the version's id;
3. ``GET model_versions/<id>/artifacts?artifactType=model-artifact``: its model artifact's
   ``uri`` (the first one, by id, that has a URI).

That URI (``s3://``, ``oci://``, ``hf://``, ``http(s)://``) is resolved by its own source, with
the reference's include globs; the result is this reference's revision and files, with
``source_uri`` set so that the puller fetches the files through that source (with the
credentials meant for it) and the manifest records both references. A model registry URI
pointing at another one, or at ``pvc://`` (mounted by the webhook, not cached), is refused.

The registry host is the reference's, else ``SourceSettings.model_registry``
(``MODEL_REGISTRY_ADDRESS``). Credentials: the registry's bearer token is the credentials'
``model_registry_token``, else ``token``; that key is removed before the rest of the
credentials (S3 keys, an HF token as ``hf_token``, registry logins) go to the artifact's
source, so the registry's token never reaches another service.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from agent.settings import SourceSettings
from agent.sources.base import Credentials, Location, RemoteFile, Resolved, Source
from agent.sources.control import Control
from common.errors import (
    InvalidInput,
    NotAllowed,
    SourceAuthError,
    SourceError,
    SourceNotFound,
)
from common.reference import Reference, parse

API = "/api/model_registry/v1alpha3"
TOKEN_KEYS = ("model_registry_token", "token")
PAGE_SIZE = 100
MAX_PAGES = 100
"""Pages of a version's artifacts read, at most, looking for its model artifact's URI."""


class ModelRegistrySource:
    schemes: tuple[str, ...] = ("model-registry",)

    def __init__(self, control: Control, settings: SourceSettings,
                 sources: Mapping[str, Source]) -> None:
        self.control = control
        self.default_host = settings.model_registry
        self.scheme = settings.model_registry_scheme
        self.sources = sources
        """Every source of the agent (by scheme), to resolve the artifact's URI."""

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        target, source, inner_creds = await self._artifact(ref, credentials)
        resolved = await source.resolve(target, inner_creds)
        return Resolved(ref, resolved.revision, resolved.files, source_uri=target.uri,
                        credentials=inner_creds or {})

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        raise SourceError(f"{file.path}: files of a model registry version are fetched by "
                          "the source of its artifact URI")

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        target, source, inner_creds = await self._artifact(ref, credentials)
        await source.check_access(target, inner_creds)

    async def close(self) -> None:
        await self.control.close()

    # --- the registry --------------------------------------------------------------------

    async def _artifact(self, ref: Reference, credentials: Credentials | None
                        ) -> tuple[Reference, Source, Credentials | None]:
        """The artifact's reference, its source, and the credentials meant for it."""
        headers, inner_creds = _split_credentials(credentials)
        base = self._base(ref)
        shown = ref.display
        model = await self._get(f"{base}/registered_model?{urlencode({'name': ref.path})}",
                                headers, shown, f"no registered model {ref.path!r}")
        version_query = urlencode({"name": ref.revision, "parentResourceId": _id(model, shown)})
        version = await self._get(f"{base}/model_version?{version_query}", headers, shown,
                                  f"model {ref.path!r} has no version {ref.revision!r}")
        artifacts = f"{base}/model_versions/{quote(_id(version, shown), safe='')}/artifacts"
        query = {"artifactType": "model-artifact", "orderBy": "ID", "sortOrder": "ASC",
                 "pageSize": str(PAGE_SIZE)}
        for _ in range(MAX_PAGES):  # the oldest model artifact with a URI, page by page
            page = await self._get(f"{artifacts}?{urlencode(query)}", headers, shown,
                                   f"version {ref.revision!r} has no artifacts")
            uri = _model_artifact_uri(page, shown)
            token = page.get("nextPageToken")
            if uri is not None or not token or not isinstance(token, str):
                break
            query["nextPageToken"] = token
        if uri is None:
            raise SourceNotFound(f"{shown}: the version has no model artifact with a URI")
        try:
            target = parse(uri, ref.include)
        except InvalidInput as e:
            raise SourceError(f"{shown}: the model artifact's URI is not usable: {e}") from e
        if not target.cached or target.scheme == "model-registry":
            raise SourceError(f"{shown}: the model artifact points at {target.scheme}://, "
                              "which the agent cannot pull")
        self.control.egress.check_scheme(target.scheme)
        source = self.sources.get(target.scheme)
        if source is None:
            raise NotAllowed(f"{shown}: no source for {target.scheme}:// is configured")
        return target, source, inner_creds

    def _base(self, ref: Reference) -> str:
        host = ref.host or self.default_host
        if not host:
            raise SourceError(
                f"{ref.display}: no model registry host in the reference and none configured "
                "(MODEL_REGISTRY_ADDRESS)")
        return f"{self.scheme}://{host}{API}"

    async def _get(self, url: str, headers: Mapping[str, str], shown: str,
                   missing: str) -> dict[str, Any]:
        try:
            reply = await self.control.json(url, headers=headers)
        except SourceNotFound as e:
            raise SourceNotFound(f"{shown}: {missing}") from e
        except SourceAuthError as e:
            who = "the token given" if headers else "anonymous access"
            raise SourceAuthError(f"{shown}: the model registry refused {who}") from e
        body = reply.json()
        if not isinstance(body, dict):
            raise SourceError(f"{shown}: the model registry answered something other than "
                              "a JSON object")
        return body


def _split_credentials(credentials: Credentials | None
                       ) -> tuple[dict[str, str], Credentials | None]:
    """(headers for the registry, credentials for the artifact's source)."""
    if not credentials:
        return {}, credentials
    for name in TOKEN_KEYS:
        key = next((k for k in credentials if k.lower() == name), None)
        if key is not None:
            rest = {k: v for k, v in credentials.items() if k != key}
            return {"Authorization": f"Bearer {credentials[key].strip()}"}, rest
    return {}, credentials


def _id(entity: Mapping[str, Any], shown: str) -> str:
    value = entity.get("id")
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value):
        raise SourceError(f"{shown}: the model registry answered an entity without an id")
    return str(value)


def _model_artifact_uri(page: Mapping[str, Any], shown: str) -> str | None:
    items = page.get("items")
    if not isinstance(items, list):
        raise SourceError(f"{shown}: the model registry's artifact list has no items")
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("artifactType", "model-artifact")
        uri = item.get("uri")
        if kind == "model-artifact" and isinstance(uri, str) and uri.strip():
            return uri.strip()
    return None

