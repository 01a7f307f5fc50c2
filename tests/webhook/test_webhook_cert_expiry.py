"""The serving certificate's expiry as a metric: set from the certificate's notAfter when it is
first loaded and after every successful reload, unchanged by a reload that fails."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
import trustme
from webhook_testkit import CertFiles

from webhook.metrics import WebhookMetrics
from webhook.tls import CertReloader, not_after

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def expiring_in(ca: trustme.CA, days: int) -> tuple[trustme.LeafCert, float]:
    when = NOW + datetime.timedelta(days=days)
    return ca.issue_cert("127.0.0.1", not_after=when), when.timestamp()


def gauge(metrics: WebhookMetrics) -> float:
    value = metrics.registry.get_sample_value("modelcache_webhook_cert_expiry_timestamp_seconds")
    assert value is not None
    return value


def test_expiry_follows_the_certificate_in_use(ca: trustme.CA, tmp_path: Path) -> None:
    files = CertFiles(tmp_path / "tls.crt", tmp_path / "tls.key")
    first, first_expiry = expiring_in(ca, 40)
    files.write(first)
    metrics = WebhookMetrics()
    reloader = CertReloader(str(files.cert), str(files.key), logging.getLogger("test"),
                            metrics.cert_reloaded, metrics.cert_loaded)
    try:
        assert gauge(metrics) == reloader.not_after == first_expiry

        second, second_expiry = expiring_in(ca, 400)
        files.write(second)
        assert reloader.check()
        assert gauge(metrics) == reloader.not_after == second_expiry

        # a new certificate beside the old key is refused: the expiry stays the one in use
        third, _ = expiring_in(ca, 10)
        files.cert.write_bytes(b"".join(b.bytes() for b in third.cert_chain_pems))
        assert not reloader.check()
        # and so is a file that holds no certificate at all
        files.cert.write_bytes(b"not a certificate\n")
        assert not reloader.check()
        assert gauge(metrics) == second_expiry
        assert metrics.registry.get_sample_value(
            "modelcache_webhook_cert_reloads_total", {"result": "error"}) == 2
    finally:
        reloader.close()


def test_the_leaf_is_the_first_certificate_of_the_chain(ca: trustme.CA) -> None:
    leaf, expiry = expiring_in(ca, 3)
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    assert not_after(chain) == expiry
    with pytest.raises(ValueError):
        not_after(b"")


def test_an_unusable_certificate_at_start_is_an_error(
    ca: trustme.CA, tmp_path: Path
) -> None:
    files = CertFiles(tmp_path / "tls.crt", tmp_path / "tls.key")
    files.write(ca.issue_cert("127.0.0.1"))
    files.cert.write_bytes(b"garbage\n")
    loaded: list[float] = []
    with pytest.raises(ValueError):
        CertReloader(str(files.cert), str(files.key), logging.getLogger("test"),
                     on_load=loaded.append)
    assert loaded == []
