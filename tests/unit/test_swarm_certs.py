"""scripts/swarm-certs: the Redis CA and server certificate the Swarm stack deploys.

The script runs for real with the openssl command line tool, into the test's own
directory; the certificate is checked with openssl and with a TLS handshake through
Python's ssl module, as redis-py makes it.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support import free_port, require

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "swarm-certs"
FILES = ("redis_ca.key", "redis_ca.crt", "redis_tls.key", "redis_tls.crt")
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def needs_openssl() -> None:
    require(shutil.which("openssl") is not None, "openssl")


def swarm_certs(
    secrets: Path, *args: str, names: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKSTACK_SECRETS_DIR": str(secrets)}
    env.pop("REDIS_TLS_NAMES", None)
    if names is not None:
        env["REDIS_TLS_NAMES"] = names
    return subprocess.run(
        [str(SCRIPT), *args], env=env, check=check, timeout=60, capture_output=True, text=True
    )


def openssl(*args: str) -> str:
    return subprocess.run(
        ["openssl", *args], check=True, timeout=60, capture_output=True, text=True
    ).stdout


def subject_alt_names(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-ext", "subjectAltName")


def contents(secrets: Path) -> dict[str, bytes]:
    return {name: (secrets / name).read_bytes() for name in FILES}


def said(output: str, word: str) -> set[str]:
    """The files the script reported as ``kept`` or ``wrote``."""
    return {Path(line.split()[1]).name for line in output.splitlines() if line.startswith(word)}


def test_writes_a_ca_and_a_server_certificate_it_signs(tmp_path: Path) -> None:
    result = swarm_certs(tmp_path)
    assert said(result.stdout, "wrote") == set(FILES)
    assert "REDIS_TLS_CA_FILE=" in result.stdout.splitlines()[-1]
    for name in ("redis_ca.key", "redis_tls.key"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    verified = openssl(
        "verify", "-CAfile", str(tmp_path / "redis_ca.crt"), str(tmp_path / "redis_tls.crt")
    )
    assert verified.strip().endswith(": OK")
    ca = openssl(
        "x509",
        "-in",
        str(tmp_path / "redis_ca.crt"),
        "-noout",
        "-subject",
        "-ext",
        "basicConstraints",
    )
    assert "taskstack Redis CA" in ca
    assert "CA:TRUE" in ca
    usage = openssl(
        "x509", "-in", str(tmp_path / "redis_tls.crt"), "-noout", "-ext", "extendedKeyUsage"
    )
    assert "TLS Web Server Authentication" in usage
    assert "TLS Web Client Authentication" in usage


class Server:
    """A TLS server on loopback with the script's certificate, for a few handshakes."""

    def __init__(self, secrets: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(secrets / "redis_tls.crt", secrets / "redis_tls.key")
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(64))
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused the certificate

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT)
        self.listener.close()
        assert not self.thread.is_alive(), "the TLS server thread did not stop"

    def handshake(self, context: ssl.SSLContext, server_hostname: str) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock,
            context.wrap_socket(sock, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"ping")
            return tls.recv(64)


def test_clients_trusting_the_ca_verify_the_swarm_names(tmp_path: Path) -> None:
    swarm_certs(tmp_path)
    trusting = ssl.create_default_context(cafile=str(tmp_path / "redis_ca.crt"))
    with Server(tmp_path) as server:
        assert server.handshake(trusting, "sentinel-3") == b"ping"
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            server.handshake(trusting, "elsewhere")
        with pytest.raises(ssl.SSLCertVerificationError):
            server.handshake(ssl.create_default_context(), "sentinel-3")


def test_extra_names_are_added_and_the_files_kept_until_a_name_is_missing(tmp_path: Path) -> None:
    names = "redis.example.org, 10.1.2.3,fd00::1"
    swarm_certs(tmp_path, names=names)
    listed = subject_alt_names(tmp_path / "redis_tls.crt")
    assert "DNS:redis.example.org" in listed
    assert "IP Address:10.1.2.3" in listed
    assert listed.count("IP Address:") == 3  # 127.0.0.1 and the IPv6 address too
    assert "DNS:sentinel-1" in listed
    before = contents(tmp_path)

    # The same names, other spellings, or a subset of them: nothing is written.
    for again in (names, "REDIS.example.org,fd00:0::1,10.1.2.3", "10.1.2.3", None):
        result = swarm_certs(tmp_path, names=again)
        assert said(result.stdout, "kept") == set(FILES), again
        assert said(result.stdout, "wrote") == set(), again
        assert contents(tmp_path) == before, again

    result = swarm_certs(tmp_path, names=f"{names},cache.example.net")
    assert said(result.stdout, "wrote") == {"redis_tls.key", "redis_tls.crt"}
    after = contents(tmp_path)
    assert after["redis_ca.key"] == before["redis_ca.key"]
    assert after["redis_ca.crt"] == before["redis_ca.crt"]
    assert after["redis_tls.crt"] != before["redis_tls.crt"]
    listed = subject_alt_names(tmp_path / "redis_tls.crt")
    assert "DNS:cache.example.net" in listed
    assert "DNS:redis.example.org" in listed


def test_a_new_ca_reissues_the_server_certificate(tmp_path: Path) -> None:
    swarm_certs(tmp_path)
    (tmp_path / "redis_ca.crt").unlink()
    result = swarm_certs(tmp_path)
    assert said(result.stdout, "wrote") == set(FILES)
    verified = openssl(
        "verify", "-CAfile", str(tmp_path / "redis_ca.crt"), str(tmp_path / "redis_tls.crt")
    )
    assert verified.strip().endswith(": OK")


def test_unknown_argument_is_named_and_exits_2(tmp_path: Path) -> None:
    result = swarm_certs(tmp_path, "--bogus", check=False)
    assert result.returncode == 2
    assert "--bogus" in result.stderr
    assert not any((tmp_path / name).exists() for name in FILES)


def test_bad_extra_name_is_refused(tmp_path: Path) -> None:
    result = swarm_certs(tmp_path, names="redis.example.org,not a host", check=False)
    assert result.returncode == 2
    assert "not a host" in result.stderr


def test_help_prints_the_usage(tmp_path: Path) -> None:
    result = swarm_certs(tmp_path, "--help")
    assert "REDIS_TLS_NAMES" in result.stdout
    assert "scripts/swarm-certs" in result.stdout
    assert not result.stdout.startswith("#")
