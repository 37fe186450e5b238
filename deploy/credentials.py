"""Create the credentials of one fedtransfer deployment.

A deployment needs three kinds of secrets, all created here with `cryptography`:

* a private CA (key + self-signed certificate) that every party trusts instead of
  the public web PKI, so sites only ever talk to *our* SuperLink;
* the SuperLink's TLS server certificate, signed by that CA, valid for the
  hostnames/IPs sites and operators use (127.0.0.1 and localhost always included,
  because the Control API and the fleet proxy reach the SuperLink over loopback);
* one SuperNode authentication key pair per site, in the format flwr 1.41 reads:
  an unencrypted OpenSSH EC (NIST P-384) private key for
  ``flower-supernode --auth-supernode-private-key`` and the matching OpenSSH
  public key line for ``flwr supernode register``.

Layout under ``out_dir`` (directories 0o700, private keys 0o600)::

    ca/ca.crt  ca/ca.key
    superlink/server.crt  superlink/server.key
    sites/<site>/auth.key  sites/<site>/auth.pub

Existing credentials are never overwritten silently: complete, consistent sets are
kept and reported in ``DeploymentCredentials.kept``; anything half-present or
inconsistent raises ``CredentialsError`` unless ``force=True`` regenerates it.
Re-running with an extra site therefore only adds that site's key pair.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization.ssh import SSHPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedtransfer.common.config.names import validate_site_name
from fedtransfer.common.errors import InputError

ALWAYS_INCLUDED_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
DIR_MODE = 0o700

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_CURVE = ec.SECP384R1  # flwr generates P-384 keys itself; any NIST curve is accepted
_Loaded = TypeVar("_Loaded")


class CredentialsError(RuntimeError):
    """Existing credentials are incomplete or inconsistent; fix them or use force."""


@dataclass(frozen=True)
class SiteKeyPair:
    """Paths of one site's SuperNode authentication key pair."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class DeploymentCredentials:
    """Paths of a deployment's credentials, plus what the last call did to them."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: dict[str, SiteKeyPair]
    created: tuple[Path, ...] = field(default=())
    kept: tuple[Path, ...] = field(default=())


def normalize_hosts(hosts: Sequence[str]) -> list[str]:
    """Return loopback defaults plus ``hosts``, validated, deduplicated, in order."""
    result: list[str] = []
    for raw in (*ALWAYS_INCLUDED_HOSTS, *hosts):
        host = raw.strip().lower()
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            labels = host.rstrip(".").split(".")
            if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(lb) for lb in labels):
                raise InputError(f"--host: {raw!r} is not an IP address or DNS name; give the SuperLink's") from None
            host = ".".join(labels)
        if host not in result:
            result.append(host)
    return result


def credential_paths(out_dir: Path, sites: Sequence[str]) -> DeploymentCredentials:
    """Return where a deployment's credentials live (validating site names only)."""
    for name in sites:
        validate_site_name(name)
    root = Path(out_dir).expanduser().resolve()
    return DeploymentCredentials(
        root=root,
        ca_cert=root / "ca" / "ca.crt",
        ca_key=root / "ca" / "ca.key",
        server_cert=root / "superlink" / "server.crt",
        server_key=root / "superlink" / "server.key",
        sites={
            s: SiteKeyPair(
                private_key=root / "sites" / s / "auth.key",
                public_key=root / "sites" / s / "auth.pub",
            )
            for s in sites
        },
    )


def init_deployment(out_dir: Path, sites: list[str], hosts: list[str], force: bool = False) -> DeploymentCredentials:
    """Create (or keep) the CA, SuperLink certificate and per-site key pairs.

    All existing files are checked before anything is written, so a refused call
    leaves the directory untouched.
    """
    paths = credential_paths(out_dir, sites)
    twice = sorted({s for s in sites if sites.count(s) > 1})
    if twice:
        raise InputError(f"--sites: {', '.join(twice)} named more than once; name each site once")
    all_hosts = normalize_hosts(hosts)

    # Plan: decide keep/create per unit and fail before writing on any conflict.
    keep_ca = not force and _existing_pair(paths.ca_key, paths.ca_cert)
    keep_server = not force and _existing_pair(paths.server_key, paths.server_cert)
    keep_site = {s: not force and _existing_pair(kp.private_key, kp.public_key) for s, kp in paths.sites.items()}
    if keep_ca:
        ca_key, ca_cert = _load_ca(paths.ca_key, paths.ca_cert)
    if keep_server:
        if not keep_ca:
            raise CredentialsError(
                f"{paths.server_cert} exists but the CA does not; it cannot be "
                "verified (pass force=True to regenerate all credentials)"
            )
        _check_server_cert(paths.server_key, paths.server_cert, ca_cert, all_hosts)
    for s, keep in keep_site.items():
        if keep:
            _check_site_pair(paths.sites[s])

    _make_private_dirs(paths)
    created: list[Path] = []
    kept: list[Path] = []
    if keep_ca:
        kept += [paths.ca_key, paths.ca_cert]
    else:
        ca_key, ca_cert = _new_ca()
        _write(paths.ca_key, _private_pem(ca_key), PRIVATE_FILE_MODE, force)
        _write(paths.ca_cert, _cert_pem(ca_cert), PUBLIC_FILE_MODE, force)
        created += [paths.ca_key, paths.ca_cert]
    if keep_server:
        kept += [paths.server_key, paths.server_cert]
    else:
        server_key, server_cert = _new_server_cert(ca_key, ca_cert, all_hosts)
        _write(paths.server_key, _private_pem(server_key), PRIVATE_FILE_MODE, force)
        _write(paths.server_cert, _cert_pem(server_cert), PUBLIC_FILE_MODE, force)
        created += [paths.server_key, paths.server_cert]
    for s, kp in paths.sites.items():
        if keep_site[s]:
            kept += [kp.private_key, kp.public_key]
            continue
        _write_site_pair(s, kp, force)
        created += [kp.private_key, kp.public_key]
    return replace(paths, created=tuple(created), kept=tuple(kept))


def _make_private_dirs(paths: DeploymentCredentials) -> None:
    """Every folder of the layout, owner-only even when it existed before."""
    for directory in [
        paths.root,
        paths.ca_cert.parent,
        paths.server_cert.parent,
        *(kp.private_key.parent for kp in paths.sites.values()),
    ]:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        directory.chmod(DIR_MODE)
    if paths.sites:
        (paths.root / "sites").chmod(DIR_MODE)


def _write_site_pair(site: str, pair: SiteKeyPair, force: bool) -> None:
    """A new OpenSSH EC key pair: the private key for the SuperNode, the public line for registration."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(pair.private_key, private, PRIVATE_FILE_MODE, force)
    _write(pair.public_key, public + f" fedtransfer-{site}\n".encode(), PUBLIC_FILE_MODE, force)


def _existing_pair(private: Path, public: Path) -> bool:
    """True if both files exist, False if neither; a lone half is an error."""
    if private.exists() and public.exists():
        if private.stat().st_mode & 0o077:
            raise CredentialsError(
                f"{private} is readable by group/others "
                f"(mode {oct(private.stat().st_mode & 0o777)}); run chmod 600 on it"
            )
        return True
    if not private.exists() and not public.exists():
        return False
    present, missing = (private, public) if private.exists() else (public, private)
    raise CredentialsError(
        f"{present} exists but {missing} is missing; restore it, or pass "
        "force=True to regenerate (re-register sites afterwards)"
    )


def _read(path: Path, loader: Callable[[bytes], _Loaded]) -> _Loaded:
    """A key or certificate from `path`; a damaged one (cryptography's ValueError) is a CredentialsError naming it."""
    try:
        return loader(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:  # TypeError: a key that needs a password
        raise CredentialsError(
            f"{path}: not a readable key or certificate ({err}); restore it, or pass --force to "
            "regenerate all credentials (sites must re-register)"
        ) from None


def _pem_key(data: bytes) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(data, password=None)


def _ssh_key(data: bytes) -> SSHPrivateKeyTypes:
    return serialization.load_ssh_private_key(data, None)


def _load_ca(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _read(key_path, _pem_key)
    cert = _read(cert_path, x509.load_pem_x509_certificate)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _pub(key) != _pub(cert):
        raise CredentialsError(f"{key_path} does not match {cert_path}")
    return key, cert


def _check_server_cert(key_path: Path, cert_path: Path, ca_cert: x509.Certificate, hosts: list[str]) -> None:
    key = _read(key_path, _pem_key)
    cert = _read(cert_path, x509.load_pem_x509_certificate)
    if _pub(key) != _pub(cert):
        raise CredentialsError(f"{key_path} does not match {cert_path}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialsError(f"{cert_path} is not signed by the deployment CA; pass force=True") from None
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise CredentialsError(f"{cert_path} has expired; pass force=True")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    covered = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    covered |= set(san.get_values_for_type(x509.DNSName))
    if missing := [h for h in hosts if h not in covered]:
        raise CredentialsError(
            f"{cert_path} does not cover host(s) {', '.join(missing)}; pass force=True to reissue it"
        )


def _check_site_pair(pair: SiteKeyPair) -> None:
    key = _read(pair.private_key, _ssh_key)
    public = _read(pair.public_key, serialization.load_ssh_public_key)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _pub(key) != _pub(public):
        raise CredentialsError(f"{pair.private_key} does not match {pair.public_key}")


def _pub(obj: object) -> bytes:
    """DER of the public key behind a key, public key or certificate."""
    if isinstance(obj, x509.Certificate):
        obj = obj.public_key()
    if isinstance(obj, ec.EllipticCurvePrivateKey):
        obj = obj.public_key()
    if not isinstance(obj, ec.EllipticCurvePublicKey):
        return b""
    return obj.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtransfer"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedtransfer deployment CA"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _new_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    public_hosts = [h for h in hosts if h not in ALWAYS_INCLUDED_HOSTS]
    common_name = public_hosts[0] if public_hosts else "localhost"
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtransfer"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int, replace: bool) -> None:
    """Write with ``mode`` from the first byte; only replace when asked to.

    Without ``replace`` the file is created with O_EXCL, so a concurrent or stale
    file makes this fail loudly instead of being clobbered.
    """
    if not replace:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
