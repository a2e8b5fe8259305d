#!/usr/bin/env bash
# The lab's end-to-end scenario: `cargo xtask lab test` runs it on the server VM, as root.
# Two namespaces (lab-mesh enrolled, lab-plain not), server and client pods on different
# nodes; proves mutual TLS (the server node's metrics name client-a's identity), STRICT
# refusing plaintext and an AuthorizationPolicy allowing one client and denying another.
# Prints PASS or FAIL per step and "N passed, N failed"; exits 1 if any step failed.
# Removes what it created, also on failure, unless SELVEDGE_LAB_KEEP=1.
set -uo pipefail
export KUBECONFIG=${KUBECONFIG:-/etc/rancher/k3s/k3s.yaml}
here=$(cd "$(dirname "$0")" && pwd)
mesh=lab-mesh
plain=lab-plain
role=lab.selvedge.dev/e2e-role
page=hello-from-lab-server
trust_domain=cluster.local
passed=0
failed=0

pass() {
    passed=$((passed + 1))
    printf 'PASS  %s\n' "$1"
    [[ -z ${2:-} ]] || printf '%s\n' "$2" | sed 's/^/      /'
}
fail() {
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$1"
    [[ -z ${2:-} ]] || printf '%s\n' "$2" | tail -n 6 | sed 's/^/      /'
}
# check DESCRIPTION COMMAND...: one step; the command's output is shown under it.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$what" "$out"; else fail "$what" "$out"; return 1; fi
}
summary() {
    echo "$passed passed, $failed failed"
    ((failed == 0)) || echo "see vagrant/README.md, Troubleshooting (SELVEDGE_LAB_KEEP=1 keeps the pods)"
}
# A step the rest depends on: stop here if it failed.
require() { check "$@" || { summary; exit 1; }; }
# eventually SECONDS COMMAND...: retry every 2 s until it succeeds (policies take effect
# asynchronously: API server -> every agent's watch -> kernel maps).
eventually() {
    local secs=$1 out deadline
    shift
    deadline=$((SECONDS + secs))
    until out=$("$@" 2>&1); do
        if ((SECONDS >= deadline)); then
            printf '%s\n(still failing after %ss)\n' "$out" "$secs"
            return 1
        fi
        sleep 2
    done
    [[ -z $out ]] || printf '%s\n' "$out"
}

cleanup() {
    [[ ${SELVEDGE_LAB_KEEP:-0} == 1 ]] && { echo "kept: namespaces $mesh and $plain"; return; }
    kubectl delete namespace "$mesh" "$plain" --ignore-not-found --wait=false >/dev/null 2>&1
    kubectl label nodes --all "$role-" >/dev/null 2>&1
}

# fetch NAMESPACE POD: the page from the server pod, through whatever the mesh does.
fetch() {
    local out
    out=$(kubectl -n "$1" exec "$2" -- wget -q -O - -T 5 "http://$server_ip:8080/" 2>&1) || {
        echo "$2: $out"
        return 1
    }
    [[ $out == "$page" ]] || { echo "$2: unexpected answer: $out"; return 1; }
}
# refused NAMESPACE POD: the connection fails, twice in a row (not a passing glitch).
refused() {
    if fetch "$@" >/dev/null; then echo "$2 got the page"; return 1; fi
    sleep 3
    if fetch "$@" >/dev/null; then echo "$2 got the page on a second try"; return 1; fi
}
agents_ready() {
    local nodes desired ready
    nodes=$(kubectl get nodes --no-headers | wc -l)
    desired=$(kubectl -n selvedge-system get daemonset selvedge -o 'jsonpath={.status.desiredNumberScheduled}') || return 1
    ready=$(kubectl -n selvedge-system get daemonset selvedge -o 'jsonpath={.status.numberReady}')
    echo "$ready of $nodes nodes"
    [[ $desired == "$nodes" && $ready == "$nodes" ]]
}
# The destination-side metric of the server's node: an mTLS connection from client-a.
mtls_metric() {
    local node_ip
    node_ip=$(kubectl get node "$server_node" -o 'jsonpath={.status.addresses[?(@.type=="InternalIP")].address}')
    curl -sSf --max-time 5 "http://$node_ip:15020/metrics" |
        grep '^istio_tcp_connections_opened_total{' |
        grep 'reporter="destination"' |
        grep 'connection_security_policy="mutual_tls"' |
        grep -F "source_principal=\"spiffe://$trust_domain/ns/$mesh/sa/client-a\"" |
        grep -F "destination_principal=\"spiffe://$trust_domain/ns/$mesh/sa/server\""
}
workloads_ready() {
    kubectl -n "$mesh" wait --for=condition=Ready pod --all --timeout=300s &&
        kubectl -n "$plain" wait --for=condition=Ready pod --all --timeout=300s &&
        kubectl get pods -n "$mesh" -o wide && kubectl get pods -n "$plain" -o wide
}

trap cleanup EXIT
# A previous run killed half-way leaves its namespaces behind.
kubectl delete namespace "$mesh" "$plain" --ignore-not-found --wait=true >/dev/null

require "Selvedge agent ready on every node" agents_ready
mapfile -t nodes < <(kubectl get nodes -o 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}')
if ((${#nodes[@]} < 2)); then
    fail "two nodes for a cross-node scenario" "found ${#nodes[*]}: ${nodes[*]}"
    summary
    exit 1
fi
client_node=${nodes[0]}
server_node=${nodes[1]}
kubectl label node "$server_node" "$role=server" --overwrite >/dev/null
kubectl label node "$client_node" "$role=client" --overwrite >/dev/null
kubectl apply -f "$here/workloads.yaml" >/dev/null
require "pods Ready: server on $server_node, clients on $client_node" workloads_ready
server_ip=$(kubectl -n "$mesh" get pod server -o 'jsonpath={.status.podIP}')

check "client-a -> server ($server_ip:8080), both enrolled, across nodes" eventually 60 fetch "$mesh" client-a
check "client-b -> server, no policy yet" eventually 30 fetch "$mesh" client-b
check "mutual TLS: $server_node reports client-a's identity" eventually 30 mtls_metric
check "PERMISSIVE: plaintext from $plain (not enrolled) accepted" eventually 30 fetch "$plain" plain-client

kubectl apply -f "$here/strict.yaml" >/dev/null
check "STRICT: plaintext from $plain refused" eventually 30 refused "$plain" plain-client
check "STRICT: client-a (mutual TLS) still admitted" eventually 30 fetch "$mesh" client-a

kubectl apply -f "$here/authz.yaml" >/dev/null
check "AuthorizationPolicy: client-b denied" eventually 30 refused "$mesh" client-b
check "AuthorizationPolicy: client-a allowed" eventually 30 fetch "$mesh" client-a

summary
((failed == 0))
