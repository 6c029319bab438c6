"""A real S3 API for the tests: moto's server mode on 127.0.0.1, in its own process.

The server runs with IAM authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``): the first three
requests create a user, its S3 policy and an access key; after that every request is signed and
checked, so wrong credentials are refused exactly as a real bucket refuses them. Tests talk to it
through s3fs with ``--storage-option endpoint_url=...`` and the key in the usual environment
variables, as a user talks to their bucket.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    process: subprocess.Popen = field(repr=False)

    @property
    def options(self) -> dict[str, str]:
        """fsspec storage options (endpoint and credentials) for open_cache / BuildConfig."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    @property
    def cli_options(self) -> list[str]:
        """The endpoint as a CLI user passes it (credentials come from ``env``)."""
        return ["--storage-option", f"endpoint_url={self.endpoint}"]

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess / CliRunner: the credentials, as a user exports them."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            **extra,
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key=self.key, secret=self.secret, skip_instance_cache=True
        )

    def new_bucket(self) -> str:
        name = f"kd-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log: Path, timeout: float = 60.0) -> S3Server:
    """Start ``python -m moto.server`` on a free loopback port; RuntimeError if it cannot."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "INITIAL_NO_AUTH_ACTION_COUNT": "3",
        "AWS_ACCESS_KEY_ID": "bootstrap",
        "AWS_SECRET_ACCESS_KEY": "bootstrap",
    }
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}: {log.read_text()}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not answer on {endpoint}") from None
            time.sleep(0.2)
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="kdcache")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                     "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="kdcache", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="kdcache")["AccessKey"]
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)
