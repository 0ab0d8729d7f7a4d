"""A refused registry-cache export costs the cache, not the build."""

from __future__ import annotations

from sandbox.example import commit_all
from tests.conftest import by_name, run_logs
from tests.test_live_log import steps_artifact

MCP = "weather-mcp"
REFUSED = "cannot be overwritten because the repository is immutable"


def test_an_immutable_cache_repository_with_a_buildcache_tag_still_builds_and_deploys(
        prefect_server, sandbox, example_app):
    app = example_app
    cache = f"agents-on-eks/weather-mcp-cache-{app.config.build.namespace}"
    ecr = sandbox.aws.client("ecr", app.config.aws.region)
    ecr.create_repository(repositoryName=cache, imageTagMutability="IMMUTABLE")
    ecr.put_image(repositoryName=cache, imageTag="buildcache", imageDigest="sha256:" + "1" * 64,
                  imageManifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
                                '"config":{},"layers":[]}')
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace(
        "    image: agents-on-eks/weather-mcp\n", f"    image: agents-on-eks/weather-mcp\n    cache_repository: {cache}\n"))
    commit_all(app.root, "An immutable cache repository")

    state = app.run()

    assert state.is_completed(), state.message
    assert by_name(state.result())[MCP].outcome == "deployed"
    flow_run_id = state.state_details.flow_run_id
    assert any(m.startswith(f"{MCP} | ") and "ERROR" in m and REFUSED in m for m in run_logs(flow_run_id))
    [row] = [r for r in steps_artifact(flow_run_id, MCP) if r["step"] == "exporting cache to registry"]
    assert REFUSED in row["error"]
    [image] = ecr.describe_images(repositoryName=cache, imageIds=[{"imageTag": "buildcache"}])["imageDetails"]
    assert image["imageDigest"] == "sha256:" + "1" * 64, "the immutable tag still names the old cache"
