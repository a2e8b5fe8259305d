#!/usr/bin/env bash
# Every node, first boot, as root: install the pinned k3s as server or agent, on the
# private network, with its default CNI (flannel). Environment (from the Vagrantfile):
# K3S_ROLE (server|agent), K3S_VERSION, K3S_TOKEN, NODE_IP, SERVER_IP.
set -euo pipefail
: "${K3S_ROLE:?}" "${K3S_VERSION:?}" "${K3S_TOKEN:?}" "${NODE_IP:?}" "${SERVER_IP:?}"

# Flannel must use the private network: the provider's NAT interface has the same address
# on every VirtualBox VM.
iface=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '{ split($4, a, "/"); if (a[1] == ip) print $2 }')
if [[ -z $iface ]]; then
    echo "no interface has $NODE_IP: the private network did not come up (see vagrant/README.md)" >&2
    exit 1
fi

flags=(--node-ip "$NODE_IP" --flannel-iface "$iface")
if [[ $K3S_ROLE == server ]]; then
    # Only what the lab uses: no ingress, load balancer, metrics-server or local storage.
    flags=(server "${flags[@]}" --write-kubeconfig-mode 0644
        --disable traefik --disable servicelb --disable metrics-server --disable local-storage)
else
    flags=(agent "${flags[@]}")
    export K3S_URL="https://$SERVER_IP:6443"
fi

if k3s --version 2>/dev/null | grep -qF "$K3S_VERSION"; then
    echo "k3s $K3S_VERSION is already installed"
else
    # The install script of the same release (the tag's install.sh), not the moving one.
    script=$(mktemp)
    curl -sSfL --retry 3 -o "$script" "https://raw.githubusercontent.com/k3s-io/k3s/${K3S_VERSION/+/%2B}/install.sh"
    INSTALL_K3S_VERSION=$K3S_VERSION K3S_TOKEN=$K3S_TOKEN INSTALL_K3S_EXEC="${flags[*]}" sh "$script"
    rm -f "$script"
fi

if [[ $K3S_ROLE == server ]]; then
    echo "waiting for the API server and this node to be Ready"
    for _ in $(seq 120); do
        if k3s kubectl get node "$(hostname)" 2>/dev/null | grep -qw Ready; then
            k3s kubectl get nodes -o wide
            exit 0
        fi
        sleep 2
    done
    echo "k3s server not Ready after 4 minutes: journalctl -u k3s" >&2
    exit 1
fi
