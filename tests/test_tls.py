"""TLS and mTLS of the real gRPC server (in process, fake pipeline), the client's ``tls_*`` arguments,
the CLI's ``--tls-*`` options, and the refusal to serve plaintext on a non-loopback address.

The CA, the server certificate (SAN DNS:localhost, IP:127.0.0.1) and the client certificates are
made at test time with ``cryptography`` (pki.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from fakes import FakePipeline, photo
from pki import Pki

from facegallery.client import GalleryClient
from facegallery.client.cli import main
from facegallery.server.service.app import InsecureAddressError, ServerConfig, create_server, is_loopback_host
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _config(data_dir: Path, **kwargs) -> ServerConfig:
    return ServerConfig(data_dir=data_dir, host="localhost", port=0, max_workers=4, snapshot_interval_s=None, grace_s=0.5, **kwargs)


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    running = create_server(_config(tmp_path_factory.mktemp("tls"), tls_cert=pki.server_cert_path, tls_key=pki.server_key_path), pipeline=FakePipeline())
    yield running
    running.stop(None)


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("mtls"), tls_cert=pki.server_cert_path, tls_key=pki.server_key_path, tls_client_ca=pki.ca_path)
    running = create_server(config, pipeline=FakePipeline())
    yield running
    running.stop(None)


def _raw_server_info(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """Status of one raw GetServerInfo call (no retries, 5 s deadline)."""
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    try:
        pb_grpc.GalleryServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_a_tls_client_with_the_ca_works(tls_server, pki):
    with GalleryClient(f"localhost:{tls_server.port}", tls_ca=pki.ca_path, timeout=10) as client:
        assert client.server_info().version
        enrolled = client.enroll("ann", photo((200, 10, 0)), display_name="Ann")
        assert enrolled.identity_id == "ann"
    with GalleryClient(f"localhost:{tls_server.port}", tls_ca=pki.ca, timeout=10) as client:  # bytes work too
        assert [i.identity_id for i in client.list_identities()] == ["ann"]


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    assert _raw_server_info(f"localhost:{tls_server.port}", None) is grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_is_refused(tls_server, pki):
    other = grpc.ssl_channel_credentials(root_certificates=pki.rogue_cert)
    assert _raw_server_info(f"localhost:{tls_server.port}", other) is grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate_at_the_handshake(mtls_server, pki):
    address = f"localhost:{mtls_server.port}"
    assert _raw_server_info(address, grpc.ssl_channel_credentials(root_certificates=pki.ca)) is grpc.StatusCode.UNAVAILABLE
    rogue = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.rogue_key, certificate_chain=pki.rogue_cert)
    assert _raw_server_info(address, rogue) is grpc.StatusCode.UNAVAILABLE
    assert _raw_server_info(address, None) is grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_with_a_certificate_signed_by_the_client_ca(mtls_server, pki):
    with GalleryClient(f"localhost:{mtls_server.port}", tls_ca=pki.ca_path, tls_cert=pki.client_cert_path, tls_key=pki.client_key_path) as client:
        assert client.server_info().version
        assert client.enroll("bob", photo((10, 200, 0))).identity_id == "bob"


def test_the_client_wants_a_certificate_and_its_key_together(pki):
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        GalleryClient("localhost:1", tls_ca=pki.ca, tls_cert=pki.client_cert)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "[::1]", "127.0.0.2"])
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "::", "10.0.0.1", "example.org"])
def test_non_loopback_hosts(host):
    assert not is_loopback_host(host)


def test_plaintext_on_a_non_loopback_host_is_refused_before_binding(tmp_path):
    with pytest.raises(InsecureAddressError, match="--insecure"):
        create_server(ServerConfig(data_dir=tmp_path, host="0.0.0.0", port=0, snapshot_interval_s=None), pipeline=FakePipeline())
    assert not any(tmp_path.iterdir())  # nothing opened or created


def test_insecure_allows_plaintext_on_a_non_loopback_host_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="facegallery.server.service.app")
    running = create_server(ServerConfig(data_dir=tmp_path, host="0.0.0.0", port=0, snapshot_interval_s=None, insecure=True), pipeline=FakePipeline())
    try:
        assert any(r.levelno == logging.WARNING and "serving without TLS on a non-loopback address" in r.getMessage() for r in caplog.records)
        with GalleryClient(f"127.0.0.1:{running.port}") as client:
            assert client.server_info().version
    finally:
        running.stop(None)


def test_a_client_ca_without_a_server_certificate_is_refused(tmp_path, pki):
    with pytest.raises(RuntimeError, match="--tls-client-ca"):
        create_server(_config(tmp_path, tls_client_ca=pki.ca_path), pipeline=FakePipeline())


def test_serve_refuses_a_non_loopback_host_without_tls_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "refusing to serve without TLS on the non-loopback address 0.0.0.0" in result.output


def test_cli_global_tls_options_and_env(mtls_server, pki):
    server = f"localhost:{mtls_server.port}"
    tls = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(pki.client_cert_path), "--tls-key", str(pki.client_key_path)]
    result = CliRunner().invoke(main, ["galleries", "--server", server, "--json", *tls])
    assert result.exit_code == 0, result.output
    env = {"FACEGALLERY_TLS_CA": str(pki.ca_path), "FACEGALLERY_CLIENT_CERT": str(pki.client_cert_path), "FACEGALLERY_CLIENT_KEY": str(pki.client_key_path)}
    result = CliRunner().invoke(main, ["galleries", "--server", server, "--json", "--timeout", "5"], env=env)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["galleries", "--server", server, "--timeout", "5", "--tls-ca", str(pki.ca_path)])  # no client cert
    assert result.exit_code == 1, result.output
