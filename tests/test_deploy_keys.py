"""Certificates and site keys: what Flower needs, with safe permissions, and refusals that name the problem."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from cli.main import app
from deploy.certs import CertError, KeySpec, add_site, make_federation_keys, make_site_keypair


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_key_set_layout_permissions_and_formats(tmp_path):
    out = tmp_path / "keys"
    spec = KeySpec(
        sites=("C1", "C2"), san_hosts=("superlink.example.org", "localhost"), san_ips=("10.1.2.3",)
    )
    manifest = make_federation_keys(out, spec, trial_site_keys=True)

    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((out / "superlink" / "server.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    srv.verify_directly_issued_by(ca)  # signed by the private CA
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert isinstance(
        load_pem_private_key((out / "superlink" / "server.key").read_bytes(), None),
        ec.EllipticCurvePrivateKey,
    )

    for site in ("C1", "C2"):
        d = out / "sites" / site
        assert _mode(d) == 0o700 and _mode(d / "node.key") == 0o600 and _mode(d / "node.pub") == 0o644
        key = load_ssh_private_key((d / "node.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert try_load_public_key(d / "node.pub")  # what `flwr supernode register` accepts
        assert (d / "ca.crt").read_bytes() == (out / "ca" / "ca.crt").read_bytes()
        assert not (d / "ca.key").exists()  # a site gets no CA key and no server key
    assert _mode(out / "ca" / "ca.key") == 0o600 and _mode(out / "superlink" / "server.key") == 0o600
    assert set(manifest["sites"]) == {"C1", "C2"}
    assert json.loads((out / "manifest.json").read_text())["superlink"]["san_ips"] == ["10.1.2.3"]
    # the two sites' keys differ
    assert (out / "sites" / "C1" / "node.pub").read_bytes() != (
        out / "sites" / "C2" / "node.pub"
    ).read_bytes()


def test_existing_key_set_is_kept_and_sites_can_be_added(tmp_path):
    out = tmp_path / "keys"
    make_federation_keys(out, KeySpec(sites=("a",)), trial_site_keys=True)
    ca_before = (out / "ca" / "ca.crt").read_bytes()
    with pytest.raises(CertError, match="already holds a key set"):
        make_federation_keys(out, KeySpec(sites=("a",)), trial_site_keys=True)
    add_site(out, "b", trial_private_key=True)
    assert (out / "ca" / "ca.crt").read_bytes() == ca_before
    assert set(json.loads((out / "manifest.json").read_text())["sites"]) == {"a", "b"}
    with pytest.raises(CertError, match="already has a key"):
        add_site(out, "b", trial_private_key=True)
    make_federation_keys(out, KeySpec(sites=("a",)), trial_site_keys=True, overwrite=True)
    assert (out / "ca" / "ca.crt").read_bytes() != ca_before


def test_site_keys_are_made_at_the_site_and_only_public_keys_reach_the_coordinator(tmp_path):
    """By default the coordinator writes no site private key: the site makes its pair, the key set
    holds its node.pub; a private key, a wrong curve or garbage given as a public key is refused."""
    site = make_site_keypair(tmp_path / "at-hospital-1")
    assert _mode(tmp_path / "at-hospital-1") == 0o700 and _mode(Path(site["private_key"])) == 0o600
    with pytest.raises(CertError, match="exists"):
        make_site_keypair(tmp_path / "at-hospital-1")
    out = tmp_path / "keys"
    pub = Path(site["public_key"]).read_bytes()
    with pytest.raises(CertError, match="no public key for site"):
        make_federation_keys(out, KeySpec(sites=("hospital-1",)))
    manifest = make_federation_keys(out, KeySpec(sites=("hospital-1",)), public_keys={"hospital-1": pub})
    assert not list(out.rglob("node.key"))  # no site private key at the coordinator
    assert (out / "sites" / "hospital-1" / "node.pub").read_bytes().strip() == pub.strip()
    assert manifest["sites"]["hospital-1"]["ssh_fingerprint"] == site["ssh_fingerprint"]
    assert manifest["sites"]["hospital-1"]["private_key_made_here"] is False
    with pytest.raises(CertError, match="give its public key"):
        add_site(out, "hospital-2")
    with pytest.raises(CertError, match="holds a private key"):
        add_site(out, "hospital-2", public_key=Path(site["private_key"]).read_bytes())
    with pytest.raises(CertError, match="not an OpenSSH public key"):
        add_site(out, "hospital-2", public_key=b"ssh-ed25519 garbage")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    p256 = other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(CertError, match="P-384"):
        add_site(out, "hospital-2", public_key=p256)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sites": ("../etc",)}, "no path separators"),
        ({"sites": ("a", "a")}, "repeat"),
        ({"sites": ("a",), "san_ips": ("not-an-ip",)}, "not an IP address"),
        ({"sites": ("a",), "days": 0}, "validity"),
    ],
)
def test_bad_key_specs_are_refused_with_the_reason(kwargs, needle):
    with pytest.raises(CertError, match=needle):
        KeySpec(**kwargs)


def test_cli_makes_keys_and_names_bad_input(tmp_path):
    runner = CliRunner()
    out = tmp_path / "k"
    res = runner.invoke(app, ["deploy", "keys", "--out", str(out), "--site", "C1"])
    assert res.exit_code != 0 and "no public key for site" in res.output and not out.exists()
    res = runner.invoke(app, ["deploy", "site-key", "--out", str(tmp_path / "c2")])
    assert res.exit_code == 0 and "send it to the coordinating site" in res.output
    res = runner.invoke(
        app,
        [
            "deploy", "keys", "--out", str(out), "--site", f"C2={tmp_path / 'c2' / 'node.pub'}",
            "--site", "C1", "--trial-site-keys", "--san-ip", "192.168.7.2",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "sites" / "C1" / "node.key").is_file() and not (out / "sites" / "C2" / "node.key").exists()
    assert "192.168.7.2" in res.output and "local trial only" in res.output
    res = runner.invoke(app, ["deploy", "keys", "--out", str(out), "--site", "C1", "--trial-site-keys"])
    assert res.exit_code != 0 and "already holds a key set" in res.output
    res = runner.invoke(app, ["deploy", "add-site", "C3", "--keys", str(out)])
    assert res.exit_code != 0 and "give its public key" in res.output
    runner.invoke(app, ["deploy", "site-key", "--out", str(tmp_path / "c3")])
    res = runner.invoke(
        app,
        ["deploy", "add-site", "C3", "--keys", str(out), "--public-key", str(tmp_path / "c3" / "node.pub")],
    )
    assert res.exit_code == 0 and (out / "sites" / "C3" / "node.pub").is_file()
    assert not (out / "sites" / "C3" / "node.key").exists()
    res = runner.invoke(app, ["deploy", "register", "--keys", str(out), "--site", "nope"])
    assert res.exit_code != 0 and "no key for site" in res.output


def test_trial_config_names_bad_sites_and_resolves_paths(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from deploy.local import LocalTrial, SiteSpec, TrialConfig

    with pytest.raises(ValidationError, match="exactly one of data_dir and phantom_id"):
        SiteSpec(name="C1")
    with pytest.raises(ValidationError, match="does not exist"):
        SiteSpec(name="C1", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValidationError, match="repeat"):
        TrialConfig(
            sites=[SiteSpec(name="a", phantom_id=0), SiteSpec(name="a", phantom_id=1)], work_dir=tmp_path
        )
    monkeypatch.chdir(tmp_path)  # relative folders work although the processes start elsewhere
    trial = LocalTrial(TrialConfig(sites=[SiteSpec(name="a", phantom_id=0)], work_dir="runs/t"))
    assert trial.keys == tmp_path / "runs" / "t" / "keys" and trial.work.is_absolute()
    spec = SiteSpec(name="C1", data_dir=str(tmp_path), model="segresnet")
    assert f'data-dir="{tmp_path}"' in spec.node_config(
        tmp_path / "state"
    ) and 'model="segresnet"' in spec.node_config(tmp_path)
