"""The sources the agent can pull from: one object per scheme, built once."""

from __future__ import annotations

from agent.egress import Egress
from agent.settings import AgentSettings
from agent.sources.base import Source
from agent.sources.control import Control
from agent.sources.file import FileSource
from agent.sources.hf import HfSource
from agent.sources.http import HttpSource
from agent.sources.oci import OciSource
from agent.sources.registry import ModelRegistrySource
from agent.sources.s3 import S3Source


def build_sources(egress: Egress, settings: AgentSettings) -> dict[str, Source]:
    """One source object per scheme the agent can pull."""
    s = settings.sources
    control = Control(egress, retries=s.control_retries)
    http = HttpSource(control)
    sources: dict[str, Source] = {
        "http": http,
        "https": http,
        "file": FileSource(egress),
        "hf": HfSource(control, s.hf_endpoint, s.hf_token),
        "s3": S3Source(control, s),
        "oci": OciSource(control, s.oci_plain_http),
    }
    sources["model-registry"] = ModelRegistrySource(control, s, sources)
    return sources
