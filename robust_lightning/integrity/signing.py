"""Ed25519 signatures of manifests: the data owner signs with a private key, training verifies with the public one.

A digest alone cannot stop whoever can write the data, who can write a new manifest too; an
HMAC would not either, because the training job would then hold the key that forges. A public
key verifies and never signs, so training is given only that. The cryptography is the
``cryptography`` package's; this module names the files and phrases the errors.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
PRIVATE, PUBLIC = "private.pem", "public.pem"


def generate_keys(folder: str | Path) -> tuple[Path, Path]:
    """Write a new key pair into ``folder``: ``private.pem`` (readable by its owner only) and ``public.pem``.

    Example:
        >>> import tempfile
        >>> private, public = generate_keys(tempfile.mkdtemp())
        >>> oct(private.stat().st_mode & 0o777), public.name
        ('0o600', 'public.pem')
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / PRIVATE, folder / PUBLIC
    if private.exists() or public.exists():
        raise FileExistsError(
            f"{folder} already holds a key pair. Fix: choose another folder; replacing a key would make every "
            "manifest signed with it unverifiable."
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created with owner-only permissions, so the key is never readable by others, not even briefly.
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def _load(path: str | Path, private: bool) -> Any:
    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(
            f"Cannot read the {kind} key {path}: {error}. Fix: pass the {kind}.pem written by "
            "`robust-lightning-manifest keygen DIR`."
        ) from None  # the chained error could quote the key file's bytes
    expected = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, expected):  # a wrong file: to callers, one more unreadable key
        message = f"{path} holds a {type(key).__name__}, not an Ed25519 {kind} key. Fix: use keygen's keys."
        raise ValueError(message)  # noqa: TRY004
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    return _load(path, private=True)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return _load(path, private=False)


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, to say which key signed without carrying the key itself."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(message: bytes, private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature record a manifest stores: the algorithm, the signer's fingerprint and the signature."""
    signature = base64.b64encode(private_key.sign(message)).decode()
    return {"algorithm": ALGORITHM, "public_key_sha256": fingerprint(private_key.public_key()), "value": signature}


def signature_problem(message: bytes, signature: dict[str, str] | None, public_key: Ed25519PublicKey) -> str | None:
    """What is wrong with ``signature`` of ``message`` under ``public_key``, or None when it holds."""
    if signature is None:
        return "it is not signed"
    if signature.get("public_key_sha256") != fingerprint(public_key):
        return (
            f"it is signed by another key (fingerprint {str(signature.get('public_key_sha256'))[:16]}..., "
            f"the given public key's is {fingerprint(public_key)[:16]}...)"
        )
    try:
        public_key.verify(base64.b64decode(signature["value"], validate=True), message)
    except (InvalidSignature, KeyError, ValueError, TypeError):
        return "its signature does not match its content: it was edited after signing"
    return None
