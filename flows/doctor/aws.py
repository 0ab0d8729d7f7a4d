"""Pre-flight checks: the AWS account (STS, the context bucket) and ECR (repositories, tag mutability, the token).

Every check reads; a Finding's `repair` (ECR repositories, the lifecycle rule) only
creates, and merges with what is there. The AWS behaviours relied on, from botocore
1.43.117's service models (data/<service>/.../service-2.json) unless said otherwise:

- STS GetCallerIdentity needs no permission, "the same information is returned when
  access is denied": a failure is a credential problem, never an IAM one.
- S3 HeadBucket answers 404 for a missing bucket, 403 without `s3:ListBucket`, and
  "regardless of the permissions on the bucket" the `x-amz-bucket-region` header;
  GetBucketLocation's LocationConstraint is null for us-east-1 and `EU` for eu-west-1.
- GetBucketLifecycleConfiguration answers `NoSuchLifecycleConfiguration` when there is
  none; PutBucketLifecycleConfiguration replaces the whole configuration, "if you want
  to retain any configuration details, they must be included".
- IAM SimulatePrincipalPolicy evaluates the identity-based policies (and SCPs) of a
  user, group or role ARN, not a session's, so an assumed-role session is simulated as
  its role; errors NoSuchEntity, InvalidInput, PolicyEvaluation.
- ECR image tag mutability: MUTABLE, IMMUTABLE, IMMUTABLE_WITH_EXCLUSION,
  MUTABLE_WITH_EXCLUSION, with up to five `WILDCARD` exclusion filters of
  `[0-9a-zA-Z._*-]` (ECR API Reference, ImageTagMutabilityExclusionFilter): under
  IMMUTABLE_WITH_EXCLUSION the matching tags may be overwritten, under
  MUTABLE_WITH_EXCLUSION they may not.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import json
import re
import uuid
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from flows.aws import aws_client
from flows.build import BUILDKIT_CACHE_TAG
from flows.config import ECR_HOST, PipelineConfig
from flows.doctor import Subject
from flows.doctor.findings import Finding, failed, passed, warned
from flows.plan import cache_repository
from flows.registry_auth import mint_ecr_token

LIFECYCLE_RULE_ID = "buildkit-pipeline-contexts"
LIFECYCLE_DAYS = 7
PROBE_NAME = "buildkit-pipeline-doctor-probe"
COMMIT_TAGS = "*"
"""The `<commit12>` tags as a family: any tag, as an ECR wildcard."""
DENIED = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403")


@dataclass(frozen=True)
class Identity:
    account: str
    arn: str


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "") or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _said(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{_code(exc)}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _regional(subject: Subject, service: str, region: str):
    """A client of `service` in `region` with the subject's credentials and endpoint (ECR is regional; the
    credentials' own region may be another)."""
    params = subject.credentials.aws_client_parameters.get_params_override()
    return subject.credentials.get_boto3_session().client(service, region_name=region, **params)


# ------------------------------------------------------------------ AWS

async def identity(subject: Subject) -> tuple[Finding, Identity | None]:
    try:
        answer = await asyncio.to_thread(lambda: aws_client(subject.credentials, "sts").get_caller_identity())
    except (ClientError, BotoCoreError) as exc:
        return failed("aws.identity", f"STS GetCallerIdentity failed: {_said(exc)}",
                      "give the flow AWS credentials: the target block's AwsCredentials (README \"Pointing it at a "
                      "real EKS cluster\", step 1), or the worker's own identity (instance profile, EKS Pod Identity, "
                      "IRSA); `aws sts get-caller-identity` with the same credentials shows what they resolve to"), None
    who = Identity(answer["Account"], answer["Arn"])
    return passed("aws.identity", f"account {who.account}, {who.arn}"), who


def location_region(constraint: str | None) -> str:
    """GetBucketLocation's LocationConstraint as a region: null is us-east-1, the legacy `EU` is eu-west-1."""
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(constraint, constraint)


def create_bucket_command(bucket: str, region: str) -> str:
    """us-east-1 takes no LocationConstraint (CreateBucket refuses it there); every other region needs its own."""
    command = f"aws s3api create-bucket --bucket {bucket} --region {region}"
    return command if region == "us-east-1" else f"{command} --create-bucket-configuration LocationConstraint={region}"


def _bucket_region(s3, bucket: str) -> str:
    """HeadBucket's x-amz-bucket-region header (also on a 403), else GetBucketLocation. ClientError when the bucket
    is missing."""
    try:
        headers = s3.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]
    except ClientError as exc:
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if _status(exc) != 403 or "x-amz-bucket-region" not in headers:
            raise
    if "x-amz-bucket-region" in headers:
        return headers["x-amz-bucket-region"]
    return location_region(s3.get_bucket_location(Bucket=bucket).get("LocationConstraint"))


async def bucket(subject: Subject) -> Finding:
    config, name = subject.config, subject.bucket
    region = config.aws.region
    s3 = aws_client(subject.credentials, "s3")
    try:
        found = await asyncio.to_thread(_bucket_region, s3, name)
    except ClientError as exc:
        if _status(exc) == 404 or _code(exc) in ("NoSuchBucket", "NotFound", "404"):
            return failed("aws.bucket", f"there is no bucket {name}", create_bucket_command(name, region))
        if _status(exc) == 403:
            return warned("aws.bucket", f"the bucket {name} could not be read: {_said(exc)}",
                          f"grant the flow's identity s3:ListBucket on arn:aws:s3:::{name} (HeadBucket needs it), "
                          "or check aws.bucket names a bucket of this account")
        raise
    if found != region:
        return failed("aws.bucket", f"the bucket {name} is in {found}, not in aws.region {region}",
                      f"set aws.region: {found} in the pipeline file, or use a bucket in {region}: "
                      f"{create_bucket_command('<new-bucket>', region)}")
    return passed("aws.bucket", f"the bucket {name} exists in {region}")


def object_actions() -> list[str]:
    """What a run does under the prefix (flows/upload.py): HeadObject (s3:GetObject) before PutObject, and a
    presigned GetObject for the build; HeadObject of a missing key answers 404 only with s3:ListBucket, 403
    without it (S3 API Reference, HeadObject). A run deletes nothing."""
    return ["s3:PutObject", "s3:GetObject"]


def access_statement(name: str, prefix: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": object_actions(), "Resource": f"arn:aws:s3:::{name}/{prefix}*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{name}"}]}, indent=1)


_ASSUMED = re.compile(r"^arn:(?P<partition>[\w-]+):sts::(?P<account>\d{12}):assumed-role/(?P<role>[\w+=,.@-]+)/")
_IAM_ENTITY = re.compile(r"^arn:[\w-]+:iam::\d{12}:(user|role)/")


def simulation_arn(arn: str) -> str | None:
    """The IAM entity SimulatePrincipalPolicy takes for a caller ARN: a user or role as is, an assumed-role
    session as its role (pathless: an STS ARN does not carry the role's path); None for the root user and
    federated sessions, which have no entity to simulate."""
    if _IAM_ENTITY.match(arn):
        return arn
    if match := _ASSUMED.match(arn):
        return f"arn:{match['partition']}:iam::{match['account']}:role/{match['role']}"
    return None


def _simulate(iam, source: str, name: str, prefix: str) -> dict[str, str]:
    """Each action's decision ("allowed", "implicitDeny", "explicitDeny"), one resource per call."""
    decisions = {}
    for actions, resource in ((object_actions(), f"arn:aws:s3:::{name}/{prefix}{PROBE_NAME}"),
                              (["s3:ListBucket"], f"arn:aws:s3:::{name}")):
        answer = iam.simulate_principal_policy(PolicySourceArn=source, ActionNames=actions, ResourceArns=[resource])
        decisions |= {r["EvalActionName"]: r["EvalDecision"] for r in answer["EvaluationResults"]}
    return decisions


def _probe(s3, name: str, prefix: str) -> list[str]:
    """What a run does under the prefix, with a tiny object: HEAD of a key not there (404 needs s3:ListBucket,
    403 without it), PUT, GET, then DELETE at once. The requests refused, as `<action> (<answer>)`."""
    key = f"{prefix}{PROBE_NAME}-{uuid.uuid4().hex[:12]}"
    refused = []
    try:
        s3.head_object(Bucket=name, Key=key)
    except ClientError as exc:
        if _status(exc) == 403:
            refused.append(f"s3:ListBucket (HeadObject of a missing key answered {_said(exc)}, not 404)")
        elif _status(exc) != 404:
            raise
    try:
        s3.put_object(Bucket=name, Key=key, Body=b"buildkit-pipeline doctor probe\n")
    except ClientError as exc:
        return [*refused, f"s3:PutObject ({_said(exc)})"]
    try:
        s3.get_object(Bucket=name, Key=key)["Body"].read()
    except ClientError as exc:
        refused.append(f"s3:GetObject ({_said(exc)})")
    finally:
        try:
            s3.delete_object(Bucket=name, Key=key)
        except ClientError as exc:
            if _status(exc) != 403:
                raise
            # a run deletes nothing, so README's policy has no s3:DeleteObject: not a refusal of a run's rights
            return [*refused, f"(s3:DeleteObject refused, which a run does not need: s3://{name}/{key} is left for "
                               "the lifecycle rule)"]
    return refused


async def bucket_access(subject: Subject, who: Identity | None) -> Finding:
    name, prefix = subject.bucket, subject.config.aws.prefix
    where = f"s3://{name}/{prefix}"
    fix = f"attach to the flow's identity{f' ({who.arn})' if who else ''}:\n{access_statement(name, prefix)}"
    source = simulation_arn(who.arn) if who else None
    why_probe = "no IAM entity to simulate" if who else "no identity"
    if source:
        try:
            iam = aws_client(subject.credentials, "iam")
            decisions = await asyncio.to_thread(_simulate, iam, source, name, prefix)
        except (ClientError, BotoCoreError) as exc:
            why_probe = f"IAM policy simulation of {source} not possible: {_said(exc)}"
        else:
            denied = [f"{action} ({decision})" for action, decision in decisions.items() if decision != "allowed"]
            if denied:
                return failed("aws.bucket-access", f"IAM policy simulation of {source} denies {', '.join(denied)} "
                              f"on {where}", fix)
            return passed("aws.bucket-access", f"IAM policy simulation of {source} allows "
                          f"{', '.join(decisions)} on {where} (identity-based policies; a bucket policy or a "
                          "session policy can still deny)")
    s3 = aws_client(subject.credentials, "s3")
    try:
        refused = await asyncio.to_thread(_probe, s3, name, prefix)
    except ClientError as exc:
        refused = [f"the probe failed: {_said(exc)}"]
    if refused and all(r.startswith("(s3:DeleteObject") for r in refused):
        return passed("aws.bucket-access", f"a probe object under {where} was written and read {refused[0]} "
                      f"({why_probe})")
    if refused:
        return failed("aws.bucket-access", f"a probe object under {where} was refused: {', '.join(refused)} "
                      f"({why_probe})", fix)
    return passed("aws.bucket-access", f"a probe object under {where} was written, read and deleted ({why_probe})")


def lifecycle_rule(prefix: str) -> dict:
    return {"ID": LIFECYCLE_RULE_ID, "Filter": {"Prefix": prefix}, "Status": "Enabled",
            "Expiration": {"Days": LIFECYCLE_DAYS}}


def _rule_prefix(rule: dict) -> str | None:
    """The key prefix a rule applies to when it applies to every object under it (no tag or size filter)."""
    if "Filter" not in rule:
        return rule.get("Prefix", "")
    selected = rule["Filter"]
    if "And" in selected:
        selected = selected["And"]
        if selected.get("Tags") or "ObjectSizeGreaterThan" in selected or "ObjectSizeLessThan" in selected:
            return None
        return selected.get("Prefix", "")
    if set(selected) - {"Prefix"}:
        return None
    return selected.get("Prefix", "")


def expiring_rule(rules: list[dict], prefix: str) -> dict | None:
    """An enabled rule that expires every object under `prefix`."""
    for rule in rules:
        covers = _rule_prefix(rule)
        expires = rule.get("Expiration", {})
        if (rule.get("Status") == "Enabled" and covers is not None and prefix.startswith(covers)
                and ("Days" in expires or "Date" in expires)):
            return rule
    return None


def _lifecycle_rules(s3, name: str) -> list[dict]:
    try:
        return s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
    except ClientError as exc:
        if _code(exc) == "NoSuchLifecycleConfiguration":
            return []
        raise


def add_lifecycle_rule(s3, name: str, prefix: str) -> None:
    """Read the rules again and put them back with ours added: the PUT replaces the whole configuration."""
    rules = _lifecycle_rules(s3, name)
    if expiring_rule(rules, prefix) or any(r.get("ID") == LIFECYCLE_RULE_ID for r in rules):
        return
    s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={
        "Rules": [*rules, lifecycle_rule(prefix)]})


async def lifecycle(subject: Subject) -> Finding:
    name, prefix = subject.bucket, subject.config.aws.prefix
    s3 = aws_client(subject.credentials, "s3")
    try:
        rules = await asyncio.to_thread(_lifecycle_rules, s3, name)
    except ClientError as exc:
        if _code(exc) in DENIED or _status(exc) == 403:
            return warned("aws.lifecycle", f"the lifecycle configuration of {name} could not be read: {_said(exc)}",
                          f"grant s3:GetLifecycleConfiguration on arn:aws:s3:::{name} to check it")
        if _code(exc) == "NoSuchBucket":
            return failed("aws.lifecycle", f"there is no bucket {name}", "see aws.bucket")
        raise
    if rule := expiring_rule(rules, prefix):
        expires = rule["Expiration"]
        when = f"after {expires['Days']} days" if "Days" in expires else f"on {expires['Date']}"
        return passed("aws.lifecycle", f"rule {rule.get('ID', '(no ID)')!r} expires s3://{name}/{prefix} {when}")
    merged = {"Rules": [*rules, lifecycle_rule(prefix)]}
    fix = (f"aws s3api put-bucket-lifecycle-configuration --bucket {name} --lifecycle-configuration "
           f"'{json.dumps(merged)}'")
    kept = f" (the bucket's {len(rules)} other rule(s) kept)" if rules else ""
    taken = any(r.get("ID") == LIFECYCLE_RULE_ID for r in rules)
    found = (f"no enabled lifecycle rule expires the contexts under s3://{name}/{prefix}; they are kept for ever"
             + (f" (a rule {LIFECYCLE_RULE_ID!r} exists but does not: edit it)" if taken else ""))
    repair = None if taken else (lambda: asyncio.to_thread(add_lifecycle_rule, s3, name, prefix))
    return warned("aws.lifecycle", found, fix + kept, repair)


# ------------------------------------------------------------------ ECR

@dataclass(frozen=True)
class Registry:
    account: str
    region: str


def ecr_registry(config: PipelineConfig) -> Registry | None:
    match = ECR_HOST.match(config.registry)
    return Registry(match["account"], match["region"]) if match else None


def _bare(config: PipelineConfig, repository: str) -> str:
    return repository.removeprefix(f"{config.registry}/")


def repositories(config: PipelineConfig) -> dict[str, dict[str, str]]:
    """Every repository a run pushes to, with each tag family it overwrites and why.

    A build pushes `<commit12>` and `ctx-<context sha256 12>` (and `latest` with tag_latest) to the image's
    repository (flows/build.py image_ref) and, with the registry cache, `buildcache` to the cache repository
    (flows/build.py _cache_flags). `ctx-` is pushed again for every build of a context built before, the commit
    tag on a rebuild of the same commit (the nightly with nothing new), `latest` on every build, `buildcache`
    on every build."""
    wanted: dict[str, dict[str, str]] = {}
    for component in config.components:
        tags = wanted.setdefault(component.image, {})
        tags["ctx-*"] = "every build of a context built before"
        tags[COMMIT_TAGS] = "on a rebuild of the same commit"
        if component.tag_latest:
            tags["latest"] = "every build (tag_latest)"
        if cache := cache_repository(config, component):
            wanted.setdefault(_bare(config, cache), {})[BUILDKIT_CACHE_TAG] = "every build (the registry cache)"
    return wanted


def _describe(ecr, account: str, names: list[str]) -> dict[str, dict]:
    found = {}
    for name in names:
        try:
            answered = ecr.describe_repositories(registryId=account, repositoryNames=[name])["repositories"]
        except ClientError as exc:
            if _code(exc) == "RepositoryNotFoundException":
                continue
            raise
        # moto answers an empty list for another account's registry where ECR names the missing repository
        found.update((r["repositoryName"], r) for r in answered if r["repositoryName"] == name)
    return found


def create_repository_command(name: str, region: str) -> str:
    return f"aws ecr create-repository --repository-name {name} --region {region}"


def _create_repositories(ecr, names: list[str]) -> None:
    for name in names:
        try:
            ecr.create_repository(repositoryName=name)
        except ClientError as exc:
            if _code(exc) != "RepositoryAlreadyExistsException":
                raise


def ecr_denied_fix(action: str, registry: Registry) -> str:
    return (f"grant the flow's identity {action} on "
            f"arn:aws:ecr:{registry.region}:{registry.account}:repository/* (or the pipeline's repositories)")


async def ecr_repositories(subject: Subject, registry: Registry) -> tuple[Finding, dict[str, dict]]:
    wanted = list(repositories(subject.config))
    ecr = _regional(subject, "ecr", registry.region)
    try:
        found = await asyncio.to_thread(_describe, ecr, registry.account, wanted)
    except ClientError as exc:
        if _code(exc) in DENIED:
            return warned("ecr.repositories", f"ECR DescribeRepositories was refused: {_said(exc)}",
                          ecr_denied_fix("ecr:DescribeRepositories", registry)), {}
        raise
    missing = [name for name in wanted if name not in found]
    where = f"registry {registry.account} in {registry.region}"
    if missing:
        return failed("ecr.repositories", f"missing in {where}: {', '.join(missing)}",
                      "\n".join(create_repository_command(name, registry.region) for name in missing),
                      lambda: asyncio.to_thread(_create_repositories, ecr, missing)), found
    return passed("ecr.repositories", f"{', '.join(wanted)} exist in {where}"), found


def _covers(family: str, filters: list[dict]) -> bool:
    """Whether a WILDCARD filter matches every tag of a family (`ctx-*` for all `ctx-` tags): the filters' only
    wildcard is `*`, so matching the family's own pattern as a name decides it."""
    return any(f.get("filterType") == "WILDCARD" and fnmatch.fnmatchcase(family, f["filter"]) for f in filters)


HEX = frozenset("0123456789abcdef")


def _overlap(family: str, wildcard: str) -> bool:
    """Whether some tag of the family (its `*` stands for lowercase hex digits) matches the filter: the two
    patterns read side by side, each `*` taking characters of the other."""
    @functools.cache
    def meet(i: int, j: int) -> bool:
        if i == len(family) and j == len(wildcard):
            return True
        if i < len(family) and family[i] == "*":
            if meet(i + 1, j):
                return True
            return j < len(wildcard) and (wildcard[j] == "*" or wildcard[j] in HEX) and meet(i, j + 1)
        if j < len(wildcard) and wildcard[j] == "*":
            return meet(i, j + 1) or (i < len(family) and meet(i + 1, j))
        return i < len(family) and j < len(wildcard) and family[i] == wildcard[j] and meet(i + 1, j + 1)

    return meet(0, 0)


def refused_tags(repository: dict, tags: dict[str, str]) -> dict[str, str]:
    """The tag families of `tags` (pattern: why it is overwritten) this repository refuses to overwrite."""
    mode = repository.get("imageTagMutability", "MUTABLE")
    filters = repository.get("imageTagMutabilityExclusionFilters") or []
    if mode == "IMMUTABLE":
        return dict(tags)
    if mode == "IMMUTABLE_WITH_EXCLUSION":
        return {tag: why for tag, why in tags.items() if not _covers(tag, filters)}
    if mode == "MUTABLE_WITH_EXCLUSION":
        return {tag: why for tag, why in tags.items()
                if any(f.get("filterType") == "WILDCARD" and _overlap(tag, f["filter"]) for f in filters)}
    return {}


def _mutability_fix(name: str, repository: dict, refused: dict[str, str], region: str) -> str:
    base = f"aws ecr put-image-tag-mutability --repository-name {name} --region {region}"
    if set(refused) == {BUILDKIT_CACHE_TAG}:
        mode = repository.get("imageTagMutability")
        filters = [f for f in repository.get("imageTagMutabilityExclusionFilters") or []
                   if mode == "IMMUTABLE_WITH_EXCLUSION"]
        keep = " ".join(f"filterType=WILDCARD,filter={f['filter']}" for f in filters)
        return (f"{base} --image-tag-mutability IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters "
                f"{keep + ' ' if keep else ''}filterType=WILDCARD,filter={BUILDKIT_CACHE_TAG}\n"
                f"or keep the cache in a MUTABLE repository of its own: build.cache_repository (or the component's "
                f"cache_repository) naming one made by aws ecr create-repository --repository-name <name> "
                f"--image-tag-mutability MUTABLE --region {region}")
    return f"{base} --image-tag-mutability MUTABLE"


async def tag_mutability(subject: Subject, registry: Registry, found: dict[str, dict]) -> Finding:
    problems, fixes, blocking = [], [], False
    for name, tags in repositories(subject.config).items():
        if name not in found:
            continue
        if refused := refused_tags(found[name], tags):
            blocking = blocking or set(refused) != {BUILDKIT_CACHE_TAG}
            mode = found[name].get("imageTagMutability")
            problems.append(f"{name} is {mode} but a run overwrites "
                            + "; ".join(f"{'<commit12>' if t == COMMIT_TAGS else t} ({why})" for t, why in refused.items()))
            fixes.append(_mutability_fix(name, found[name], refused, registry.region))
    if not found:
        return warned("ecr.tag-mutability", "no repository to look at (see ecr.repositories)",
                      "create the repositories first")
    if problems and not blocking:
        # the cache export is `ignore-error=true` (flows/build.py): a refused `buildcache` push costs the cache
        # (every build starts cold), not the build
        return warned("ecr.tag-mutability", "; ".join(problems) + ": builds succeed, but their cache export is "
                      "refused, so every build runs without a fresh cache", "\n".join(fixes))
    if problems:
        return failed("ecr.tag-mutability", "; ".join(problems), "\n".join(fixes))
    return passed("ecr.tag-mutability", f"every tag a run overwrites may be overwritten in {', '.join(found)}")


def _minted_for(credentials, registry: str) -> tuple[str, str]:
    """Mint a token as a run does (mint_ecr_token: the flow's ECR client) and say where it is good: the region of
    the client that minted it; the token itself is dropped."""
    mint_ecr_token(credentials, registry)
    return aws_client(credentials, "ecr").meta.region_name, registry


async def token(subject: Subject, who: Identity, registry: Registry | None) -> Finding:
    config = subject.config
    if registry is None:
        return failed("ecr.token", f"registry {config.registry!r} is not an ECR registry",
                      f"set registry: to {who.account}.dkr.ecr.{config.aws.region}.amazonaws.com")
    problems = []
    if who.account != registry.account:
        problems.append(f"the registry's account {registry.account} is not the identity's account {who.account}")
    if registry.region != config.aws.region:
        problems.append(f"the registry's region {registry.region} is not aws.region {config.aws.region}")
    try:
        minted_in, _ = await asyncio.to_thread(_minted_for, subject.credentials, config.registry)
    except (ClientError, BotoCoreError) as exc:
        return failed("ecr.token", f"ECR GetAuthorizationToken failed: {_said(exc)}",
                      "grant the flow's identity ecr:GetAuthorizationToken on * (it has no resource-level "
                      "permissions)")
    if minted_in != registry.region:
        problems.append(f"the token was minted in {minted_in} (the AWS credentials' region), not in the "
                        f"registry's region {registry.region}")
    if problems:
        return failed("ecr.token", f"{'; '.join(problems)} ({config.registry})",
                      f"set registry: to {who.account}.dkr.ecr.{config.aws.region}.amazonaws.com (and the "
                      f"credentials' region to {config.aws.region}), or run with credentials of account "
                      f"{registry.account} in {registry.region} and aws.region: {registry.region}")
    return passed("ecr.token", f"a token for {config.registry} was minted by {who.arn}")


async def checks(subject: Subject) -> list[Finding]:
    found, who = await identity(subject)
    if who is None:
        return [found]
    findings = [found, await bucket(subject)]
    if findings[-1].fix.startswith("aws s3api create-bucket"):
        findings += [failed(check, f"not checked: there is no bucket {subject.bucket}", "see aws.bucket")
                     for check in ("aws.bucket-access", "aws.lifecycle")]
    else:
        findings += [await bucket_access(subject, who), await lifecycle(subject)]
    registry = ecr_registry(subject.config)
    if registry is not None:
        repos, described = await ecr_repositories(subject, registry)
        findings += [repos, await tag_mutability(subject, registry, described)]
    return [*findings, await token(subject, who, registry)]
