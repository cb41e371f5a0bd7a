"""One line for a failed AWS call, as the command-line tools print it: what went wrong and what to do.

:func:`describe` names the cause (no credentials, credentials rejected, access denied, no such
bucket or stack, endpoint unreachable) from botocore's exceptions and the service's error code,
never a traceback or a Python repr.
"""

from __future__ import annotations

import sys
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

NO_CREDENTIALS = ("no AWS credentials found: run `aws configure` or `aws sso login`, or set AWS_PROFILE "
                  "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "Forbidden", "403",
                                 "UnauthorizedOperation", "AllAccessDisabled"})
REJECTED_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                                       "ExpiredTokenException", "InvalidClientTokenId", "UnrecognizedClientException",
                                       "InvalidToken", "TokenRefreshRequired"})


def aws_cause(exc: BaseException) -> BaseException | None:
    """The botocore exception behind ``exc`` (itself, or one it was raised from or while handling)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, BotoCoreError | ClientError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def error_code(exc: BaseException) -> str:
    """The service's error code of a :class:`ClientError` (``AccessDenied``, ``NoSuchBucket``...), else ''."""
    if not isinstance(exc, ClientError):
        return ""
    err: dict[str, Any] = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")


def is_no_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` comes from missing or partial AWS credentials."""
    return isinstance(aws_cause(exc), NoCredentialsError | PartialCredentialsError)


def describe(exc: BaseException, resource: str = "") -> str | None:
    """One line saying why an AWS call failed, or None when ``exc`` is not an AWS error.

    ``resource`` names what was being read or written (``s3://bucket/prefix/``, ``stack X``) for
    the access-denied and not-found lines.
    """
    cause = aws_cause(exc)
    if cause is None:
        return None
    on = f" on {resource}" if resource else ""
    if isinstance(cause, NoCredentialsError | PartialCredentialsError):
        return NO_CREDENTIALS
    if isinstance(cause, NoRegionError):
        return "no AWS region: pass --region or set AWS_REGION"
    if isinstance(cause, EndpointConnectionError):
        return f"cannot reach {cause.kwargs.get('endpoint_url', 'the AWS endpoint')}: check the network, the region or --endpoint-url"
    if isinstance(cause, BotoCoreError):
        return f"AWS client error: {cause}"
    code = error_code(cause)
    message = cause.response.get("Error", {}).get("Message") or ""
    operation = cause.operation_name or "the request"
    if code in ACCESS_DENIED_CODES:
        return (f"access denied: the AWS credentials in use may not call {operation}{on}"
                + (f" ({message})" if message and message != "Access Denied" else ""))
    if code in REJECTED_CREDENTIAL_CODES:
        return f"AWS rejected the credentials ({code}): {message or 'renew or reconfigure them'}"
    if code == "NoSuchBucket":
        bucket = cause.response.get("Error", {}).get("BucketName") or resource or "the bucket"
        return f"bucket {bucket} does not exist: check the bucket name and the region"
    return f"{operation} failed{on}: {code or 'error'}: {message}".rstrip(": ")


def report_aws_failure(exc: BaseException, prefix: str, resource: str = "") -> int:
    """For a command's ``main``: print why an AWS call failed as one line on stderr
    (``"<prefix>: <reason>"``) and return the exit status 1. Re-raises ``exc`` when it is not an AWS
    error: that is a bug, and its traceback is for whoever fixes it."""
    reason = describe(exc, resource)
    if reason is None:
        raise exc
    print(f"{prefix}: {reason}", file=sys.stderr)
    return 1
