"""Fixtures for the signature tests: key pairs and a CA chain (once per session), a signer
that runs the real ``model_signing`` CLI, and the agent's real pull pipeline
(``tests/sources/conftest.py``) with signature policies from files, as the config file
gives them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from agent.index import Model
from agent.settings import PolicyFiles
from agent.verify.policy import ConfigPolicies
from common.reference import parse
from tests.sources.conftest import Pipeline, PipelineFactory, pipeline  # noqa: F401
from tests.verify.signing import CertChain, KeyPair, Signer


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    where = tmp_path_factory.mktemp("keys")
    return {name: KeyPair.make(where, name) for name in ("release", "stranger")}


@pytest.fixture(scope="session")
def corp_ca(tmp_path_factory: pytest.TempPathFactory) -> CertChain:
    return CertChain.make(tmp_path_factory.mktemp("ca"), "corp")


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertChain:
    return CertChain.make(tmp_path_factory.mktemp("ca2"), "other")


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer(tmp_path / "signing")


@pytest.fixture
def policies(keys: dict[str, KeyPair], corp_ca: CertChain, tmp_path: Path
             ) -> tuple[PolicyFiles, ...]:
    """``release`` (its key), ``also-release`` (the same key by another name), ``stranger``
    (another key), ``corp`` (the CA chain's root), ``broken`` (a file that is no key)."""
    broken = tmp_path / "broken.pub"
    broken.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    return (PolicyFiles("release", public_key=keys["release"].public),
            PolicyFiles("also-release", public_key=keys["release"].public),
            PolicyFiles("stranger", public_key=keys["stranger"].public),
            PolicyFiles("corp", certificate_chain=corp_ca.root),
            PolicyFiles("broken", public_key=broken))


@pytest.fixture
def verifying(pipeline: PipelineFactory,  # noqa: F811
              policies: tuple[PolicyFiles, ...]) -> PipelineFactory:
    """Like ``pipeline``, with the :func:`policies` configured."""

    async def make(**kwargs: object) -> Pipeline:
        p: Pipeline = await pipeline(**kwargs)
        p.puller.policies = ConfigPolicies(policies)
        return p

    return make


async def pull(p: Pipeline, uri: str, verify: str = "",
               include: Iterable[str] | None = None) -> Model:
    """Ensure ``uri`` under policy ``verify`` and wait for the pull to end (either way)."""
    model = await p.puller.ensure(parse(uri, include, verify))
    if model.task is not None:
        await model.task
    return model


def published(p: Pipeline, model: Model) -> list[str]:
    """What ``models/<key>/`` shows (nothing, if the model was never published)."""
    directory = p.store.models / model.key
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def verifications(p: Pipeline, result: str) -> float:
    return p.metrics.verifications.labels(result=result)._value.get()  # type: ignore[no-any-return]
