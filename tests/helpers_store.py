"""A real local S3 endpoint for the store tests: moto's threaded server on 127.0.0.1 and a free port."""
from __future__ import annotations

import os
from contextlib import contextmanager

from helpers_triton import free_port

#: moto accepts any key pair until authentication is switched on (see ``refusing_credentials``).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "posterrt-test", "AWS_SECRET_ACCESS_KEY": "posterrt-test-secret-9f1c",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_endpoint(buckets=("models",)):
    """``http://127.0.0.1:PORT`` of a started moto S3 server holding empty ``buckets``; the AWS
    variables of this process (which servers started from it inherit) name the test's key pair."""
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def refusing_credentials():
    """moto checks every request's key pair against its IAM users (it has none): any key is refused."""
    from moto import settings

    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
