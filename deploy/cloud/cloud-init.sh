#!/bin/bash
# cloud-init user data for a GPU instance (Ubuntu with the NVIDIA driver, Docker and the NVIDIA
# container toolkit, as GPU clouds' stock images ship them). .github/workflows/gpu-deploy.yml
# fills the @...@ placeholders and passes this script at launch. It runs as root, once.
set -euo pipefail
IMAGE="@IMAGE@"              # e.g. ghcr.io/OWNER/kernelport:cuda-<sha>
REPO_URL="@REPO_URL@"        # this repository, for deploy/ (compose file, manifests)
REF="@REF@"
DEPLOYMENT="@DEPLOYMENT@"    # a key of deploy/deployments.yaml
export HF_TOKEN="@HF_TOKEN@"

git clone --depth 1 --branch "$REF" "$REPO_URL" /opt/kernelport
cd /opt/kernelport
docker pull "$IMAGE"
# The image's Python has PyYAML (a kernelport dependency); the host's need not.
MANIFEST="$(docker run --rm -v "$PWD/deploy:/deploy:ro" --entrypoint python "$IMAGE" -c \
  "import sys, yaml; d = yaml.safe_load(open('/deploy/deployments.yaml'))['deployments']; print(d[sys.argv[1]].get('manifest', ''))" \
  "$DEPLOYMENT")"
MODELS=/opt/models
mkdir -p "$MODELS"
if [ -n "$MANIFEST" ]; then
  # The image's own `kernelport fetch` writes the model repository the server then serves.
  docker run --rm -e HF_TOKEN -v "$PWD:/src:ro" -v "$MODELS:/models" --user 0 \
    --entrypoint kernelport "$IMAGE" fetch "/src/$MANIFEST" --into /models --quiet
  export KERNELPORT_MODELS="$MODELS"
fi
sed -i 's/^    # gpus: all$/    gpus: all/' deploy/compose.yaml
KERNELPORT_IMAGE="$IMAGE" docker compose -f deploy/compose.yaml up -d --no-build
