"""Bearer-token auth (UNAUTHENTICATED without it, health open) and TLS with a self-signed certificate."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from serve.client import Client

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    root = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(root / "key.pem"), "-out", str(root / "cert.pem"), "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return root / "cert.pem", root / "key.pem"


@pytest.fixture(scope="module")
def secure_server(start_server, certificate):
    cert, key = certificate
    return start_server(auth_token=TOKEN, tls_cert_file=str(cert), tls_key_file=str(key))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_tls_with_the_right_token_serves(secure_server, certificate):
    with secure_server.client(root_certificates=certificate[0].read_bytes(), token=TOKEN) as client:
        assert client.generate("Return the", max_tokens=3).usage.completion_tokens == 3
        assert len(list(client.stream("Return the", max_tokens=3, ignore_eos=True))) >= 1
        assert client.model_info().vocab_size == 512


def test_missing_or_wrong_token_is_unauthenticated_but_health_is_open(secure_server, certificate):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for token in (None, "wrong", TOKEN + "x"):
        with secure_server.client(root_certificates=certificate[0].read_bytes(), token=token) as client:
            assert _code(lambda: client.generate("Return the", max_tokens=1)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: list(client.stream("Return the", max_tokens=1))) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: client.tokenize("x")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: ProtoReflectionDescriptorDatabase(client.channel).get_services()) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert client.health() == "SERVING"  # load balancers and probes hold no secrets


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_server):
    with Client(secure_server.target, token=TOKEN) as client:
        assert _code(lambda: client.generate("Return the", max_tokens=1, timeout_s=10)) == grpc.StatusCode.UNAVAILABLE
