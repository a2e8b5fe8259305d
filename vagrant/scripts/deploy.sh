#!/usr/bin/env bash
# The server, on demand (`vagrant provision server --provision-with deploy`), as root, once
# every node has imported selvedge:dev: Istio's security CRDs, the CA Secret, the DaemonSet
# (deploy/ through the k3s overlay); then wait until an agent is ready on every node.
# Environment: EXPECTED_NODES (from the Vagrantfile).
set -euo pipefail
: "${EXPECTED_NODES:?}"
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
lab=/selvedge/vagrant
ca=$lab/.lab/ca

echo "waiting for $EXPECTED_NODES nodes to be Ready"
for _ in $(seq 150); do
    ready=$(kubectl get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)
    ((ready >= EXPECTED_NODES)) && break
    sleep 2
done
kubectl get nodes -o wide
if ((ready < EXPECTED_NODES)); then
    echo "only $ready of $EXPECTED_NODES nodes are Ready after 5 minutes (journalctl -u k3s-agent on the missing ones)" >&2
    exit 1
fi

# The agent watches AuthorizationPolicy and PeerAuthentication; the lab has no Istio.
kubectl apply -f "$lab/manifests/istio-security-crds.yaml"
kubectl wait --for condition=Established --timeout=60s \
    crd/authorizationpolicies.security.istio.io crd/peerauthentications.security.istio.io

for f in root-cert.pem root-key.pem; do
    [[ -f $ca/$f ]] || { echo "$ca/$f is missing: run \`cargo xtask lab up\` on the host" >&2; exit 1; }
done
kubectl create namespace selvedge-system --dry-run=client -o yaml | kubectl apply -f -
# The key goes to the cluster CA only (Secret); the agents get the root certificate.
kubectl -n selvedge-system create secret generic selvedge-ca \
    --from-file=root-cert.pem="$ca/root-cert.pem" --from-file=root-key.pem="$ca/root-key.pem" \
    --dry-run=client -o yaml | kubectl apply -f -
kubectl -n selvedge-system create configmap selvedge-ca-root \
    --from-file=root-cert.pem="$ca/root-cert.pem" \
    --dry-run=client -o yaml | kubectl apply -f -

existed=$(kubectl -n selvedge-system get daemonset selvedge --ignore-not-found -o name)
kubectl apply -k "$lab/overlay"
if [[ -n $existed ]]; then
    # Same tag, new image: only a restart makes the pods use what image.sh just imported.
    kubectl -n selvedge-system rollout restart daemonset/selvedge
fi
if ! kubectl -n selvedge-system rollout status daemonset/selvedge --timeout=600s; then
    kubectl -n selvedge-system get pods -o wide >&2
    echo "the DaemonSet is not ready: see vagrant/README.md, Troubleshooting" >&2
    exit 1
fi
kubectl -n selvedge-system get pods -o wide
