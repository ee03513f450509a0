#!/usr/bin/env bash
# The end-to-end scenario on a real Kubernetes cluster made with kind.
#
# Needs: docker, kind, kubectl, helm (v3 or v4). Not runnable in clip's CI (no Docker
# engine there); run it on a laptop or a CI runner with Docker:
#
#   e2e/kind/run.sh            # create cluster, build and load images, install, test
#   KEEP=1 e2e/kind/run.sh     # keep the cluster afterwards
#
# What it does: creates a kind cluster, builds the node/controller images from the
# Dockerfile, loads them into the cluster, installs the chart with a small in-cluster Redis
# Cluster, runs a registry inside the cluster with a test image, applies a ClipImage and a
# pod that mounts it, waits for Ready, checks the pod's output, rolls the node plugin and
# checks that the pod's volume kept working (taken over, not remounted), and collects logs on
# failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-clip-e2e}
NS=${NS:-clip-system}
TAG=${TAG:-e2e}
for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done

collect_logs() {
    echo "--- collecting logs" >&2
    mkdir -p target/kind-logs
    kubectl get all,clipimages -A -o wide > target/kind-logs/objects.txt 2>&1 || true
    kubectl -n "$NS" logs -l app.kubernetes.io/component=node --all-containers --tail=-1 > target/kind-logs/node.log 2>&1 || true
    kubectl -n "$NS" logs -l app.kubernetes.io/component=keeper --tail=-1 > target/kind-logs/keeper.log 2>&1 || true
    kubectl -n "$NS" logs -l app.kubernetes.io/component=controller --tail=-1 > target/kind-logs/controller.log 2>&1 || true
    kubectl describe pod clip-e2e-reader -n default > target/kind-logs/pod.txt 2>&1 || true
    kubectl get events -A --sort-by=.lastTimestamp > target/kind-logs/events.txt 2>&1 || true
    echo "logs in target/kind-logs/" >&2
}
cleanup() {
    status=$?
    [ $status -ne 0 ] && collect_logs
    [ -z "${KEEP:-}" ] && kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    exit $status
}
trap cleanup EXIT

kind create cluster --name "$CLUSTER" --wait 120s
docker build --target node -t ghcr.io/clip-dev/clip-node:$TAG .
docker build --target controller -t ghcr.io/clip-dev/clip-controller:$TAG .
kind load docker-image --name "$CLUSTER" ghcr.io/clip-dev/clip-node:$TAG ghcr.io/clip-dev/clip-controller:$TAG

# A registry inside the cluster, holding a small test image (busybox with a marker file).
kubectl apply -f e2e/kind/registry.yaml
kubectl rollout status deploy/registry --timeout=120s
kubectl run push-test-image --rm -i --restart=Never --image=quay.io/skopeo/stable:latest -- \
    copy --dest-tls-verify=false docker://docker.io/library/busybox:1.36 \
    docker://registry.default.svc.cluster.local:5000/e2e/busybox:1.36

helm upgrade --install clip charts/clip --namespace "$NS" --create-namespace --wait --timeout 5m \
    --set image.tag=$TAG \
    --set redis.deploy.enabled=true \
    --set registry.insecure[0]=registry.default.svc.cluster.local:5000

kubectl apply -f e2e/kind/scenario.yaml
kubectl wait clipimage/e2e-busybox --for=jsonpath='{.status.phase}'=Ready --timeout=300s
kubectl wait pod/clip-e2e-reader --for=condition=Ready --timeout=180s
out=$(kubectl logs clip-e2e-reader)
echo "$out"
grep -q "clip e2e: busybox runs from a lazily mounted image" <<<"$out"

# A rolling update of the node plugin keeps the pod's volume working: the keeper holds the
# mount while the plugin restarts, and the new plugin takes it over (no remount).
before=$(kubectl exec clip-e2e-reader -- /image/bin/busybox stat -c %d /image)
kubectl -n "$NS" rollout restart ds/clip-node
kubectl -n "$NS" rollout status ds/clip-node --timeout=180s
kubectl exec clip-e2e-reader -- /image/bin/busybox ls /image/bin >/dev/null
after=$(kubectl exec clip-e2e-reader -- /image/bin/busybox stat -c %d /image)
[ "$before" = "$after" ] || { echo "the volume was remounted ($before -> $after)"; exit 1; }
kubectl -n "$NS" logs -l app.kubernetes.io/component=node -c clip-node --tail=-1 | grep -q "took over the live mount"
echo "kind e2e passed"
