"""A real S3 API server for tests of a data root in a bucket: moto's server mode in its own process (on loopback
unless told another address), with request authentication on, so only a user's signed requests read or write and
anonymous ones are refused (as on a lab's own bucket). Its own process, because moto's authentication setting is
process-wide and the OpenOrganelle replica in the test process serves anonymous readers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from em_ingest_tests.services import free_port

# Requests moto serves before it starts checking signatures: creating the user, its key and its policy.
_SETUP_REQUESTS = 3
_SERVE = "from moto.server import ThreadedMotoServer as S; import time; S(ip_address={host!r}, port={port}).start(); " \
         "time.sleep(1e9)"


@dataclass
class S3Server:
    """An S3 endpoint, one IAM user allowed s3:*, and the AWS SDK environment with its key."""

    process: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str

    @classmethod
    def start(cls, host: str = "127.0.0.1") -> S3Server:
        """Serves on `host` (an address of this machine): loopback by default; containers reach the host at their
        network's gateway address, which is one of the host's own."""
        import boto3

        port = free_port()
        process = subprocess.Popen([sys.executable, "-c", _SERVE.format(host=host, port=port)],
                                   env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    process.kill()
                    raise RuntimeError("the S3 server did not start") from None
                time.sleep(0.1)
        endpoint = f"http://{host}:{port}"
        try:
            iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                               region_name="us-east-1")
            iam.create_user(UserName="lab")
            key = iam.create_access_key(UserName="lab")["AccessKey"]
            iam.put_user_policy(UserName="lab", PolicyName="lake", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        except BaseException:
            process.kill()
            process.wait()
            raise
        return cls(process, endpoint, key["AccessKeyId"], key["SecretAccessKey"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    @property
    def env(self) -> dict[str, str]:
        """What a user sets to point the AWS SDKs (and so em-ingest) at this endpoint with their credentials."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def bucket(self, name: str, *, refuse_writes: bool = False) -> str:
        """A new private bucket; `refuse_writes` adds a policy denying every PUT (a read-only bucket)."""
        client = self.client()
        client.create_bucket(Bucket=name)
        if refuse_writes:
            client.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{name}/*"}]}))
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, tuple[str, Any]]:
        """Every object under `prefix`: key -> (ETag, LastModified), to tell what a run rewrote."""
        found = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = (item["ETag"], item["LastModified"])
        return found
