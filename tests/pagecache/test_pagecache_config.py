"""The config file's ``pageCache`` section: its defaults, what it sets, and refusals that
name the field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.config import add_agent_flags, agent_settings
from agent.settings import AgentSettings, PageCacheSettings
from common.errors import InvalidInput


def settings_from(tmp_path: Path, config: str) -> AgentSettings:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    p = argparse.ArgumentParser()
    add_agent_flags(p)
    return agent_settings(p.parse_args(["--standalone", "--store", str(tmp_path / "s"),
                                        "--config", str(path)]))


def test_defaults_without_a_section(tmp_path: Path) -> None:
    s = settings_from(tmp_path, "store: {highWatermark: 0.8}\n").page_cache
    assert s == PageCacheSettings()
    assert s.enabled and s.min_available == 0.15 and s.max_share == 0.5
    assert s.rate_bytes == 1 << 30 and s.chunk_bytes == 16 << 20


def test_the_section_sets_every_field(tmp_path: Path) -> None:
    s = settings_from(tmp_path, """
pageCache: {enabled: false, minAvailable: 0.25, maxShare: 0.3, rateBytes: 0,
            chunkBytes: 8388608, waitReady: 60}
""").page_cache
    assert s == PageCacheSettings(enabled=False, min_available=0.25, max_share=0.3,
                                  rate_bytes=0, chunk_bytes=8 << 20, wait_ready=60)


@pytest.mark.parametrize(("section", "field"), [
    ("{enabled: 'no'}", "pageCache/enabled"),
    ("{minAvailable: 1}", "pageCache/minAvailable"),
    ("{maxShare: 0}", "pageCache/maxShare"),
    ("{rateBytes: -1}", "pageCache/rateBytes"),
    ("{chunkBytes: 100}", "pageCache/chunkBytes"),
    ("{readAhead: true}", "pageCache"),
])
def test_bad_values_are_refused_naming_the_field(tmp_path: Path, section: str,
                                                 field: str) -> None:
    with pytest.raises(InvalidInput, match=f": {field}: "):
        settings_from(tmp_path, f"pageCache: {section}\n")


def test_the_deployed_config_file_is_valid(tmp_path: Path) -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    cm = yaml.safe_load((root / "deploy" / "base" / "agent-config.yaml").read_text())
    assert settings_from(tmp_path, cm["data"]["config.yaml"]).page_cache.enabled
