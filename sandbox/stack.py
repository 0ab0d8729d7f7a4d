"""The local sandbox: moto for S3/ECR/STS, a Kubernetes API emulator, and simulated BuildKit and Kaniko pods.

Everything listens on 127.0.0.1 and lives only as long as the Sandbox object.
Tests start one per session; `buildkit-pipeline run --sandbox` and `make demo`
start one per run.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from flows.config import DEFAULT_BUILDKIT_IMAGE, DEFAULT_KANIKO_IMAGE, PipelineConfig
from sandbox.apps.busybox import BusyboxWget, is_busybox
from sandbox.apps.dnsproxy import ClusterDnsProxy
from sandbox.apps.runtime import AppRuntime
from sandbox.aws import BUILD_ROLE_ARN, AwsSandbox
from sandbox.builders import BuiltImage, built_image
from sandbox.buildkit import SimulatedBuildKit
from sandbox.kaniko import SimulatedKaniko
from sandbox.kube import KubeEmulator


BUILDER_IMAGES = frozenset({DEFAULT_BUILDKIT_IMAGE, f"{DEFAULT_BUILDKIT_IMAGE}-rootless", DEFAULT_KANIKO_IMAGE})
ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$")


def ecr_image_exists(aws: AwsSandbox, image: str) -> bool:
    """`<account>.dkr.ecr.<region>.amazonaws.com/<repo>[:<tag>][@<digest>]` names an image in the sandbox ECR."""
    host, _, rest = image.partition("/")
    found = ECR_HOST.match(host)
    if not found or not rest:
        return False
    name, _, digest = rest.partition("@")
    repository, _, tag = name.rpartition(":") if ":" in name else (name, "", "latest")
    ecr = aws.client("ecr", found["region"])
    image_id = {"imageDigest": digest} if digest else {"imageTag": tag}
    try:
        ecr.describe_images(registryId=found["account"], repositoryName=repository, imageIds=[image_id])
    except (ecr.exceptions.ImageNotFoundException, ecr.exceptions.RepositoryNotFoundException):
        return False
    return True


class Sandbox:
    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="buildkit-sandbox-")
        self.workdir = Path(workdir or self._tmp.name)
        self.aws = AwsSandbox()
        self.kube = KubeEmulator()
        self.buildkit = SimulatedBuildKit(self.kube, self.aws)
        self.kaniko = SimulatedKaniko(self.kube, self.aws)
        self.dns = ClusterDnsProxy(self.kube)
        self.apps = AppRuntime(self.kube, self.built_image, proxy_url=self.dns.url)
        self.busybox = BusyboxWget(self.kube)
        self.kubeconfig = self.workdir / "kubeconfig"

    def start(self) -> Sandbox:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aws.start()
        self.kube.start()
        self.kube.write_kubeconfig(self.kubeconfig)
        self.kube.image_resolver = self.image_exists
        self.dns.start()
        self.install_builders()
        return self

    def image_exists(self, image: str) -> bool:
        """What the sandbox's nodes can pull: the pinned builder images, and what was pushed to its ECR."""
        if image in BUILDER_IMAGES or is_busybox(image):
            return True
        return ecr_image_exists(self.aws, image)

    def built_image(self, image: str) -> BuiltImage | None:
        """The build a pushed image came from, when a simulated builder made it: `...@sha256:<digest>` directly,
        a tag through the digest ECR holds for it."""
        if "@" in image:
            return built_image(image.rpartition("@")[2])
        if not ecr_image_exists(self.aws, image):
            return None
        host, _, rest = image.partition("/")
        repository, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
        ecr = self.aws.client("ecr", ECR_HOST.match(host)["region"])
        found = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])["imageDetails"]
        return built_image(found[0]["imageDigest"]) if found else None

    def install_builders(self) -> None:
        """The simulated BuildKit and Kaniko pods, app pods as processes and busybox test pods as the only pod
        behaviours, e.g. after a test's own."""
        self.kube.clear_pod_behaviours()
        self.busybox.install()
        self.apps.install()
        self.buildkit.install()
        self.kaniko.install()

    def stop(self) -> None:
        self.apps.stop()
        self.dns.stop()
        self.kube.stop()
        self.aws.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def prepare(self, config: PipelineConfig) -> dict:
        """Create the bucket, repositories and namespaces the pipeline expects; return the flow's connection
        arguments."""
        self.aws.provision(config)
        for namespace in namespaces_to_provision(config):
            if self.kube.get("namespaces", None, namespace) is None:
                self.kube.create("namespaces", None, {"metadata": {"name": namespace}})
        # What README "Pointing it at a real EKS cluster" has an admin create: deployments/rbac.yaml's build
        # ServiceAccount (token not mounted), and step 4's Pod Security label. `privileged` is also what the
        # emulator applies to an unlabelled namespace, as the PodSecurity admission plugin's default configuration
        # does (kubernetes/pod-security-admission admission/api/v1 defaults.go, v0.35.0: enforce "privileged").
        build = config.build
        if self.kube.get("serviceaccounts", build.namespace, build.service_account) is None:
            self.kube.create("serviceaccounts", build.namespace, {
                "metadata": {"name": build.service_account}, "automountServiceAccountToken": False})
        labels = self.kube.get("namespaces", None, build.namespace)["metadata"].get("labels") or {}
        if "pod-security.kubernetes.io/enforce" not in labels:
            self.kube.patch("namespaces", None, build.namespace,
                            {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}})
        self.buildkit.region = self.kaniko.region = config.aws.region
        return {"aws_credentials": self.aws.credentials(config.aws.region), "kubeconfig": str(self.kubeconfig),
                # the role a build's STS session is scoped from (docs.aws IAM User Guide,
                # id_credentials_temp_control-access_assumerole.html: session policy ∩ role policy)
                "build_role_arn": BUILD_ROLE_ARN}


def namespaces_to_provision(config: PipelineConfig) -> list[str]:
    """What an admin creates beforehand (README "Pointing it at a real EKS cluster"): the build namespace and every
    release namespace helm is not told to create (`release.create_namespace`). The emulator refuses objects in a
    namespace that does not exist, as the NamespaceLifecycle admission plugin does."""
    wanted = [config.build.namespace]
    wanted += [c.release.namespace for c in config.components if c.release and not c.release.create_namespace]
    return list(dict.fromkeys(wanted))
