"""Bearer tokens, TLS and mutual TLS, with certificates made here by the cryptography package."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import llmopt
from llmopt.server import ServerConfig, TLSConfig, read_tokens
from llmopt.server.status import AuthenticationError, ServerUnavailableError
from tests.server.conftest import DECODER, make_repository

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def decoder_repository(packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                       ) -> Path:
    return make_repository(tmp_path_factory.mktemp("secure-repo"), packages, [DECODER])


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: Any, issuer: tuple[str, Any] | None = None, *,
          ca: bool = False, server: bool = False) -> Any:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's."""
    root = tmp_path_factory.mktemp("pki")
    files = {}
    ca_key = _key()
    ca = _cert("llmopt test CA", ca_key, ca=True)
    other_key = _key()
    other_ca = _cert("someone else", other_key, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    made = {
        "ca.pem": ca, "server.pem": _cert("localhost", server_key, ("llmopt test CA", ca_key),
                                          server=True),
        "server.key": server_key,
        "client.pem": _cert("client", client_key, ("llmopt test CA", ca_key)),
        "client.key": client_key,
        "stranger.pem": _cert("stranger", stranger_key, ("someone else", other_key)),
        "stranger.key": stranger_key, "other-ca.pem": other_ca,
    }
    for name, obj in made.items():
        files[name] = root / name
        files[name].write_bytes(_pem(obj))
    return files


def _health(channel: grpc.Channel, service: str = "") -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_bearer_token_required_but_health_stays_open(start_server: Any,
                                                     decoder_repository: Path) -> None:
    srv = start_server(decoder_repository, ServerConfig(tokens=(TOKEN, "second")))
    for token in (None, "wrong", TOKEN + "x"):
        with llmopt.Client(srv.address, token=token) as client:
            with pytest.raises(AuthenticationError, match="bearer token"):
                client.list_models()
            with pytest.raises(AuthenticationError):
                list(client.stream(DECODER, "hi", max_new_tokens=2))
    for token in (TOKEN, "second"):
        with llmopt.Client(srv.address, token=token) as client:
            assert client.generate(DECODER, "hi", max_new_tokens=2,
                                   ignore_eos=True).stats.generated_tokens == 2
    with grpc.insecure_channel(srv.address) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, DECODER) == health_pb2.HealthCheckResponse.SERVING
    refused = srv.metrics.registry.get_sample_value(
        "llmopt_requests_total", {"method": "ListModels", "model": "", "code": "UNAUTHENTICATED"})
    assert refused == 3


def test_tritonclient_passes_the_token_as_a_header(start_server: Any,
                                                   decoder_repository: Path) -> None:
    tc = pytest.importorskip("tritonclient.grpc")
    srv = start_server(decoder_repository, ServerConfig(tokens=(TOKEN,)))
    triton = tc.InferenceServerClient(srv.address)
    with pytest.raises(tc.InferenceServerException, match="UNAUTHENTICATED"):
        triton.is_server_ready()
    assert triton.is_server_ready(headers={"authorization": f"Bearer {TOKEN}"})


def test_tls(start_server: Any, decoder_repository: Path, pki: dict[str, Path]) -> None:
    tls = TLSConfig(pki["server.pem"], pki["server.key"])
    srv = start_server(decoder_repository, ServerConfig(tls=tls, tokens=(TOKEN,)))
    with llmopt.Client(srv.address, token=TOKEN, root_certificates=pki["ca.pem"]) as client:
        assert client.generate(DECODER, "hi", max_new_tokens=2).finish_reason
    with llmopt.Client(srv.address, token=TOKEN) as plaintext, pytest.raises(
            ServerUnavailableError):
        plaintext.list_models(timeout=5)
    with llmopt.Client(srv.address, token=TOKEN,
                       root_certificates=pki["other-ca.pem"]) as untrusting, pytest.raises(
            ServerUnavailableError):
        untrusting.list_models(timeout=5)


def test_mutual_tls(start_server: Any, decoder_repository: Path, pki: dict[str, Path]) -> None:
    tls = TLSConfig(pki["server.pem"], pki["server.key"], pki["ca.pem"])
    srv = start_server(decoder_repository, ServerConfig(tls=tls))
    with llmopt.Client(srv.address, root_certificates=pki["ca.pem"],
                       client_cert=pki["client.pem"], client_key=pki["client.key"]) as client:
        assert [m.name for m in client.list_models()] == [DECODER]
    for cert, key in ((None, None), (pki["stranger.pem"], pki["stranger.key"])):
        with llmopt.Client(srv.address, root_certificates=pki["ca.pem"], client_cert=cert,
                           client_key=key) as refused, pytest.raises(ServerUnavailableError):
            refused.list_models(timeout=5)


def test_tokens_from_a_file_or_the_environment(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens"
    path.write_text("# operators\nalpha\n\n  beta  \nalpha\n")
    assert read_tokens(file=path) == ("alpha", "beta")
    monkeypatch.setenv("LLMOPT_TOKENS", "gamma, delta")
    assert read_tokens(env="LLMOPT_TOKENS") == ("gamma", "delta")
    path.write_text("# nothing\n")
    with pytest.raises(llmopt.InvalidInputError, match="holds no token"):
        read_tokens(file=path)
    monkeypatch.setenv("LLMOPT_TOKENS", " ")
    with pytest.raises(llmopt.InvalidInputError, match="unset or empty"):
        read_tokens(env="LLMOPT_TOKENS")
    with pytest.raises(llmopt.InvalidInputError, match="whitespace"):
        ServerConfig(tokens=("two words",))


def test_http_door_takes_the_same_tls_and_tokens(start_server: Any, decoder_repository: Path,
                                                 pki: dict[str, Path]) -> None:
    import json
    import ssl
    import urllib.error
    import urllib.request

    tls = TLSConfig(pki["server.pem"], pki["server.key"], pki["ca.pem"])
    srv = start_server(decoder_repository, ServerConfig(tls=tls, tokens=(TOKEN,), http_port=0))
    assert srv.http_url.startswith("https://")

    def get(path: str, token: str | None, cert: str | None) -> int:
        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        if cert is not None:
            context.load_cert_chain(pki[f"{cert}.pem"], pki[f"{cert}.key"])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(srv.http_url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                assert json.loads(response.read())
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get("/v1/models", TOKEN, "client") == 200
    assert get("/v1/models", "wrong", "client") == 401
    assert get("/v2/health/ready", None, "client") == 200
    for stranger in (None, "stranger"):  # mutual TLS: no or an untrusted client certificate
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            get("/v2/health/live", None, stranger)

@pytest.mark.parametrize(("files", "named", "text"), [
    (("server.pem", "missing.key", None), "missing.key", "cannot read the TLS key file"),
    (("server.pem", "garbage.key", None), "garbage.key", "is not PEM"),
    (("server.pem", "client.key", None), "client.key", "does not load with the certificate"),
    (("server.pem", "server.key", "garbage.key"), "garbage.key", "client CA file"),
    (("server.pem", "server.key", "server.key"), "server.key", "holds no usable certificate"),
])
def test_bad_tls_files_are_named_before_any_model_loads(
        pki: dict[str, Path], tmp_path: Path, files: tuple[str, str, str | None], named: str,
        text: str) -> None:
    from llmopt.server import create_server

    (tmp_path / "garbage.key").write_text("not a key\n")

    def path(name: str) -> Path:
        return pki.get(name, tmp_path / name)

    cert, key, ca = files
    tls = TLSConfig(path(cert), path(key), path(ca) if ca else None)
    # the repository does not exist: the TLS error must come first, before any model loads
    with pytest.raises(llmopt.InvalidInputError, match=text) as info:
        create_server(tmp_path / "no-repository", "127.0.0.1:0", ServerConfig(tls=tls))
    assert named in str(info.value) and "free port" not in str(info.value)
