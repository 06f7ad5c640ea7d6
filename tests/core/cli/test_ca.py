import stat
import threading

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from candela_mitm.certs import authority
from candela_mitm.certs.bundle import CA_ENV_VARS, build_bundle, ca_env
from candela_mitm.cli import ca


def test_the_ca_is_created_once_in_mitmproxys_layout(tmp_path):
    certs = tmp_path / "certs"
    combined = authority.ensure_ca(certs)
    assert combined == certs / "mitmproxy-ca.pem"
    raw = combined.read_bytes()
    load_pem_private_key(raw, None)  # the key first, then the certificate: what mitmproxy reads
    cert = x509.load_pem_x509_certificates(raw)[0]
    assert stat.S_IMODE(combined.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert (certs / "mitmproxy-ca-cert.pem").read_bytes() == authority.ca_certificate_pem(certs)
    authority.ensure_ca(certs)
    assert combined.read_bytes() == raw  # a second start keeps the CA clients already trust
    assert cert.subject.rfc4514_string() == "O=Candela,CN=Candela CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign


def test_concurrent_starts_agree_on_one_ca(tmp_path):
    certs = tmp_path / "certs"
    results: list[bytes] = []

    def start():
        authority.ensure_ca(certs, key_size=1024)
        results.append(authority.ca_certificate_pem(certs))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert sorted(p.name for p in certs.iterdir()) == ["mitmproxy-ca-cert.pem", "mitmproxy-ca.pem"]


def test_ca_export_prints_the_certificate_and_never_the_key(tmp_path, capsys):
    cfg = tmp_path / "candela.yaml"
    cfg.write_text(yaml.safe_dump({"interception": {"certs_dir": str(tmp_path / "certs")}}))
    assert ca.main(["export", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.encode() == authority.ca_certificate_pem(tmp_path / "certs")
    assert "PRIVATE KEY" not in out
    assert ca.main(["export", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out == out


def test_ca_export_reports_a_bad_config(tmp_path, capsys):
    cfg = tmp_path / "candela.yaml"
    cfg.write_text("interception: {nope: 1}\n")
    assert ca.main(["export", "--config", str(cfg)]) == 2
    assert "interception.nope" in capsys.readouterr().err


def test_ca_needs_a_subcommand():
    with pytest.raises(SystemExit) as e:
        ca.main([])
    assert e.value.code == 2


def test_the_bundle_is_the_systems_cas_plus_candelas(tmp_path):
    system = tmp_path / "system.pem"
    system.write_text("-----BEGIN CERTIFICATE-----\nsystem\n-----END CERTIFICATE-----")
    candela = b"-----BEGIN CERTIFICATE-----\ncandela\n-----END CERTIFICATE-----\n"
    path = build_bundle(candela, tmp_path / "bundle.pem", system=system)
    text = path.read_text()
    assert text.index("system") < text.index("candela") and text.count("BEGIN CERTIFICATE") == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    env = ca_env(path)
    assert (
        set(env)
        == set(CA_ENV_VARS)
        == {
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "AWS_CA_BUNDLE",
        }
    )
    assert set(env.values()) == {str(path)}
