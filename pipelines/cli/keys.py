"""`leukops keys generate`: an Ed25519 key pair for promotion attestations (``pipelines.trust.attestation``).

The private key (0600) goes to the promotion job only (``LEUKOPS_PROMOTION_SIGNING_KEY``); the public key
to serving and QA (``LEUKOPS_SERVING__ATTESTATION_PUBLIC_KEY``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="promotion signing keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = add_command(actions, "generate", "write a new Ed25519 pair (private 0600, never overwritten)", _generate)
    generate.add_argument("--out", required=True, type=Path, help="folder for the two PEM files")


def _generate(args: argparse.Namespace) -> Output:
    from pipelines.trust.attestation import generate_key_pair, key_id, read_public_key

    private, public = generate_key_pair(args.out)
    data = {"private_key": str(private), "public_key": str(public), "key_id": key_id(read_public_key(public))}
    text = (
        f"key {data['key_id']}\n"
        f"  LEUKOPS_PROMOTION_SIGNING_KEY={private}   (the promotion job only)\n"
        f"  LEUKOPS_SERVING__ATTESTATION_PUBLIC_KEY={public}   (serving, evaluate --model champion)"
    )
    return Output(data, text)
