"""`doctor`'s AWS and ECR checks against the sandbox: each green on a prepared sandbox, each red with its fix when
the one thing it looks at is missing, and each repair red -> green, the second changing nothing."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from prefect_aws import AwsClientParameters, AwsCredentials

from flows.doctor.aws import LIFECYCLE_RULE_ID, PROBE_NAME
from flows.doctor.flow import check_target
from sandbox.ecr_auth import SANDBOX_ACCOUNT
from sandbox.example import commit_all

CHECKS = ["aws.identity", "aws.bucket", "aws.bucket-access", "aws.lifecycle", "ecr.repositories",
          "ecr.tag-mutability", "ecr.token"]
REGION = "us-west-2"
_names = itertools.count(1)


def doctor(app, fix: bool = False, **connection) -> dict:
    """The AWS and ECR findings of `check_target` on the app's pipeline file, by check name."""
    kwargs = {**app.flow_kwargs, **connection}
    findings = asyncio.run(check_target(app.pipeline_file, fix=fix, say=lambda line: None, **kwargs))
    assert not [f for f in findings if f.check == "aws"], findings  # the group itself did not fail
    return {f.check: f for f in findings if f.check.split(".")[0] in ("aws", "ecr")}


def vary(app, old: str, new: str) -> None:
    text = app.pipeline_file.read_text()
    assert old in text
    app.pipeline_file.write_text(text.replace(old, new))
    commit_all(app.root, f"doctor: {new}")


def unique(name: str) -> str:
    return f"{name}-d{next(_names)}"


def probe_objects(sandbox, app) -> list[str]:
    s3 = sandbox.aws.client("s3", REGION)
    listed = s3.list_objects_v2(Bucket=app.config.aws.bucket, Prefix=app.config.aws.prefix).get("Contents", [])
    return [o["Key"] for o in listed if PROBE_NAME in o["Key"]]


def test_a_prepared_sandbox_passes_every_aws_and_ecr_check(sandbox, example_app):
    found = doctor(example_app)

    assert list(found) == CHECKS
    assert {c: f.status for c, f in found.items()} == dict.fromkeys(CHECKS, "pass"), found
    assert SANDBOX_ACCOUNT in found["aws.identity"].found
    assert f"in {REGION}" in found["aws.bucket"].found
    # the sandbox's key has no IAM entity to simulate (moto's GetCallerIdentity: arn:aws:sts::...:user/moto)
    assert "written, read and deleted" in found["aws.bucket-access"].found
    assert probe_objects(sandbox, example_app) == []
    assert LIFECYCLE_RULE_ID in found["aws.lifecycle"].found


def test_no_credentials_fail_the_identity_with_the_credential_fix(sandbox, example_app, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no request to 169.254.169.254
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    nobody = AwsCredentials(region_name=REGION, aws_client_parameters=AwsClientParameters(endpoint_url=sandbox.aws.url))

    found = doctor(example_app, aws_credentials=nobody)

    assert list(found) == ["aws.identity"]
    assert found["aws.identity"].status == "fail"
    assert "Unable to locate credentials" in found["aws.identity"].found
    assert "aws sts get-caller-identity" in found["aws.identity"].fix


def test_a_missing_bucket_fails_with_the_create_bucket_command(sandbox, example_app):
    app = example_app
    missing = unique(app.config.aws.bucket)
    vary(app, f"bucket: {app.config.aws.bucket}", f"bucket: {missing}")

    found = doctor(app)

    assert found["aws.bucket"].status == "fail"
    assert found["aws.bucket"].fix == (f"aws s3api create-bucket --bucket {missing} --region {REGION} "
                                       f"--create-bucket-configuration LocationConstraint={REGION}")
    assert found["aws.bucket-access"].status == found["aws.lifecycle"].status == "fail"


def test_a_bucket_in_another_region_fails_naming_both(sandbox, example_app):
    app = example_app
    elsewhere = unique(app.config.aws.bucket)
    # us-east-1 takes no LocationConstraint, and GetBucketLocation answers null for it
    sandbox.aws.client("s3", "us-east-1").create_bucket(Bucket=elsewhere)
    vary(app, f"bucket: {app.config.aws.bucket}", f"bucket: {elsewhere}")

    found = doctor(app)

    assert found["aws.bucket"].status == "fail"
    assert f"is in us-east-1, not in aws.region {REGION}" in found["aws.bucket"].found
    assert "set aws.region: us-east-1" in found["aws.bucket"].fix


def test_a_refused_probe_fails_bucket_access_with_the_policy_to_attach(sandbox, example_app):
    app = example_app
    bucket, prefix = app.config.aws.bucket, app.config.aws.prefix
    sandbox.aws.front.fail("PUT", rf"^/{bucket}/{prefix}{PROBE_NAME}", 403, times=None)
    try:
        found = doctor(app)
    finally:
        sandbox.aws.front.clear_faults()

    access = found["aws.bucket-access"]
    assert access.status == "fail"
    assert "s3:PutObject (AccessDenied: Access Denied)" in access.found
    policy = json.loads(access.fix.split(":\n", 1)[1])
    assert {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
            "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"} in policy["Statement"]
    assert {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"} in policy["Statement"]


def flow_role(sandbox, app, *, object_actions: list[str], simulate: bool = True) -> AwsCredentials:
    """Credentials of a session of a new role with these S3 rights under the prefix (and ECR's token), as the
    flow's role of README step 2; `simulate`: may it call iam:SimulatePrincipalPolicy."""
    iam = sandbox.aws.client("iam", "us-east-1")
    name = unique("doctor-flow")
    bucket, prefix = app.config.aws.bucket, app.config.aws.prefix
    statements = [
        {"Effect": "Allow", "Action": object_actions, "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"}]
    if simulate:
        statements.append({"Effect": "Allow", "Action": "iam:SimulatePrincipalPolicy",
                           "Resource": f"arn:aws:iam::{SANDBOX_ACCOUNT}:role/{name}"})
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                     "Principal": {"AWS": f"arn:aws:iam::{SANDBOX_ACCOUNT}:root"}}]}
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
    iam.put_role_policy(RoleName=name, PolicyName="flow", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    issued = sandbox.aws.client("sts", REGION).assume_role(
        RoleArn=f"arn:aws:iam::{SANDBOX_ACCOUNT}:role/{name}", RoleSessionName="doctor")["Credentials"]
    return AwsCredentials(aws_access_key_id=issued["AccessKeyId"], aws_secret_access_key=issued["SecretAccessKey"],
                          aws_session_token=issued["SessionToken"], region_name=REGION,
                          aws_client_parameters=AwsClientParameters(endpoint_url=sandbox.aws.url))


def test_an_assumed_role_is_checked_by_iam_policy_simulation_of_its_role(sandbox, example_app):
    app = example_app
    allowed = flow_role(sandbox, app, object_actions=["s3:PutObject", "s3:GetObject"])
    denied = flow_role(sandbox, app, object_actions=["s3:GetObject"])

    good, bad = doctor(app, aws_credentials=allowed), doctor(app, aws_credentials=denied)

    assert good["aws.identity"].found.split(", ")[1].startswith(f"arn:aws:sts::{SANDBOX_ACCOUNT}:assumed-role/")
    assert good["aws.bucket-access"].status == "pass", good["aws.bucket-access"]
    assert good["aws.bucket-access"].found.startswith(f"IAM policy simulation of arn:aws:iam::{SANDBOX_ACCOUNT}:role/")
    assert bad["aws.bucket-access"].status == "fail"
    assert "denies s3:PutObject (implicitDeny)" in bad["aws.bucket-access"].found
    assert '"s3:PutObject"' in bad["aws.bucket-access"].fix
    assert probe_objects(sandbox, app) == [], "a simulation writes nothing"


def test_a_role_that_may_not_simulate_is_checked_with_a_probe_object(sandbox, example_app):
    app = example_app
    credentials = flow_role(sandbox, app, object_actions=["s3:PutObject", "s3:GetObject"], simulate=False)

    found = doctor(app, aws_credentials=credentials)

    access = found["aws.bucket-access"]
    assert access.status == "pass", access
    assert "IAM policy simulation" in access.found and "not possible: AccessDenied" in access.found
    assert "is not authorized to perform: iam:SimulatePrincipalPolicy" in access.found
    assert "written, read and deleted" in access.found
    assert probe_objects(sandbox, app) == []


def lifecycle_rules(sandbox, bucket: str) -> list[dict]:
    return sandbox.aws.client("s3", REGION).get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]


def test_a_missing_lifecycle_rule_warns_and_the_repair_adds_it_keeping_the_others(sandbox, example_app):
    app = example_app
    bucket, prefix = app.config.aws.bucket, app.config.aws.prefix
    theirs = [{"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 30}},
              {"ID": "build-tagged", "Filter": {"And": {"Prefix": prefix, "Tags": [{"Key": "k", "Value": "v"}]}},
               "Status": "Enabled", "Expiration": {"Days": 1}},
              {"ID": "disabled", "Filter": {"Prefix": ""}, "Status": "Disabled", "Expiration": {"Days": 1}}]
    s3 = sandbox.aws.client("s3", REGION)
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": theirs})
    before = lifecycle_rules(sandbox, bucket)

    red = doctor(app)["aws.lifecycle"]
    assert red.status == "warn"
    command, _, document = red.fix.partition(" --lifecycle-configuration ")
    assert command == f"aws s3api put-bucket-lifecycle-configuration --bucket {bucket}"
    wanted = json.loads(document.split("'")[1])
    assert wanted["Rules"] == [*before, {"ID": LIFECYCLE_RULE_ID, "Filter": {"Prefix": prefix},
                                         "Status": "Enabled", "Expiration": {"Days": 7}}]

    fixed = doctor(app, fix=True)["aws.lifecycle"]
    assert fixed.status == "pass", fixed
    after = lifecycle_rules(sandbox, bucket)
    assert after[:3] == before and after[3]["ID"] == LIFECYCLE_RULE_ID

    asyncio.run(red.repair())
    assert lifecycle_rules(sandbox, bucket) == after, "a second repair changes nothing"


def test_no_lifecycle_configuration_at_all_warns(sandbox, example_app):
    bucket = example_app.config.aws.bucket
    sandbox.aws.client("s3", REGION).delete_bucket_lifecycle(Bucket=bucket)

    found = doctor(example_app)["aws.lifecycle"]

    assert found.status == "warn"
    assert f"under s3://{bucket}/build/" in found.found
    assert f'{{"Rules": [{{"ID": "{LIFECYCLE_RULE_ID}", "Filter": {{"Prefix": "build/"}}' in found.fix


def test_missing_repositories_fail_and_the_repair_creates_them(sandbox, example_app):
    app = example_app
    image, cache = unique("agents-on-eks/weather-mcp"), unique("agents-on-eks/cache")
    vary(app, "    image: agents-on-eks/weather-mcp\n",
         f"    image: {image}\n    cache_repository: {cache}\n")
    ecr = sandbox.aws.client("ecr", REGION)

    red = doctor(app)["ecr.repositories"]
    assert red.status == "fail"
    assert red.fix == (f"aws ecr create-repository --repository-name {image} --region {REGION}\n"
                       f"aws ecr create-repository --repository-name {cache} --region {REGION}")

    green = doctor(app, fix=True)["ecr.repositories"]
    assert green.status == "pass", green
    created = ecr.describe_repositories(repositoryNames=[image, cache])["repositories"]
    assert [r["imageTagMutability"] for r in created] == ["MUTABLE", "MUTABLE"]

    asyncio.run(red.repair())
    assert ecr.describe_repositories(repositoryNames=[image, cache])["repositories"] == created


def test_an_immutable_image_repository_fails_naming_the_tags_a_run_overwrites(sandbox, example_app):
    app = example_app
    image = unique("agents-on-eks/weather-mcp")
    sandbox.aws.client("ecr", REGION).create_repository(repositoryName=image, imageTagMutability="IMMUTABLE")
    vary(app, "    image: agents-on-eks/weather-mcp\n", f"    image: {image}\n    tag_latest: true\n")

    found = doctor(app)["ecr.tag-mutability"]

    assert found.status == "fail"
    assert found.found.startswith(f"{image} is IMMUTABLE but a run overwrites ctx-* (")
    assert "<commit12> (on a rebuild of the same commit)" in found.found
    assert "latest (every build (tag_latest))" in found.found
    assert found.fix == (f"aws ecr put-image-tag-mutability --repository-name {image} --region {REGION} "
                         "--image-tag-mutability MUTABLE")


def test_an_immutable_cache_repository_warns_until_buildcache_is_excluded(sandbox, example_app):
    app = example_app
    cache = unique("agents-on-eks/cache")
    ecr = sandbox.aws.client("ecr", REGION)
    ecr.create_repository(repositoryName=cache, imageTagMutability="IMMUTABLE")
    vary(app, "    image: agents-on-eks/weather-mcp\n",
         f"    image: agents-on-eks/weather-mcp\n    cache_repository: {cache}\n")

    red = doctor(app)["ecr.tag-mutability"]
    assert red.status == "warn", "the build goes on without its cache (test_cache_export)"
    assert red.found == (f"{cache} is IMMUTABLE but a run overwrites buildcache (every build (the registry cache)): "
                         "builds succeed, but their cache export is refused, so every build runs without a fresh "
                         "cache")
    assert red.fix.splitlines()[0] == (
        f"aws ecr put-image-tag-mutability --repository-name {cache} --region {REGION} --image-tag-mutability "
        "IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=buildcache")
    assert "build.cache_repository" in red.fix

    ecr.put_image_tag_mutability(repositoryName=cache, imageTagMutability="IMMUTABLE_WITH_EXCLUSION",
                                 imageTagMutabilityExclusionFilters=[{"filterType": "WILDCARD", "filter": "build*"}])
    assert doctor(app)["ecr.tag-mutability"].status == "pass"


def test_a_mutable_repository_whose_exclusion_freezes_ctx_tags_fails(sandbox, example_app):
    app = example_app
    image = unique("agents-on-eks/weather-mcp")
    # MUTABLE_WITH_EXCLUSION: the tags a filter matches are immutable; `ctx-a*` freezes some ctx- tags
    sandbox.aws.client("ecr", REGION).create_repository(
        repositoryName=image, imageTagMutability="MUTABLE_WITH_EXCLUSION",
        imageTagMutabilityExclusionFilters=[{"filterType": "WILDCARD", "filter": "ctx-a*"},
                                            {"filterType": "WILDCARD", "filter": "release-*"}])
    vary(app, "    image: agents-on-eks/weather-mcp\n", f"    image: {image}\n")

    found = doctor(app)["ecr.tag-mutability"]

    assert found.status == "fail"
    assert found.found == (f"{image} is MUTABLE_WITH_EXCLUSION but a run overwrites ctx-* (every build of a context "
                           "built before)"), "release-* matches no commit or ctx- tag"


@pytest.mark.parametrize("registry, named", [
    (f"210987654321.dkr.ecr.{REGION}.amazonaws.com",
     f"the registry's account 210987654321 is not the identity's account {SANDBOX_ACCOUNT}"),
    (f"{SANDBOX_ACCOUNT}.dkr.ecr.eu-central-1.amazonaws.com",
     f"the registry's region eu-central-1 is not aws.region {REGION}"),
])
def test_a_registry_of_another_account_or_region_fails_the_token_naming_both(sandbox, example_app, registry, named):
    app = example_app
    vary(app, f"registry: {app.config.registry}", f"registry: {registry}")

    found = doctor(app)["ecr.token"]

    assert found.status == "fail"
    assert named in found.found
    assert found.fix.startswith(f"set registry: to {SANDBOX_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com")


def test_a_refused_delete_of_the_probe_is_no_failure_since_a_run_deletes_nothing(sandbox, example_app):
    app = example_app
    bucket, prefix = app.config.aws.bucket, app.config.aws.prefix
    sandbox.aws.front.fail("DELETE", rf"^/{bucket}/{prefix}{PROBE_NAME}", 403, times=None)
    try:
        found = doctor(app)["aws.bucket-access"]
    finally:
        sandbox.aws.front.clear_faults()

    assert found.status == "pass", found
    assert "s3:DeleteObject refused, which a run does not need" in found.found
    [left] = probe_objects(sandbox, app)
    assert left in found.found
    sandbox.aws.client("s3", REGION).delete_object(Bucket=bucket, Key=left)
