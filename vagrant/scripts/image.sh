#!/usr/bin/env bash
# Every node, on demand (`vagrant provision --provision-with image`), as root: build the
# selvedge:dev image from the binaries the host staged in vagrant/.lab/bin and import it
# into this node's containerd. No registry: each node builds its own copy.
set -euo pipefail

bin=/selvedge/vagrant/.lab/bin
containerfile=/selvedge/deploy/Containerfile
# The name the kubelet resolves `image: selvedge:dev` to.
image=docker.io/library/selvedge:dev

for f in "$bin/selvedge" "$bin/selvedge-cni" "$containerfile"; do
    if [[ ! -f $f ]]; then
        echo "$f is missing: run \`cargo xtask lab up\` on the host (it builds and stages the binaries)" >&2
        exit 1
    fi
done

# The binaries were built on the host. selvedge-cni runs on this node itself (containerd
# executes it), so it must work against this node's glibc: say so now rather than as a
# failing pod sandbox later.
if ! out=$("$bin/selvedge" --version 2>&1); then
    echo "the staged selvedge does not run on $(hostname) ($(ldd --version | head -n1)):" >&2
    echo "$out" >&2
    echo "build on a host whose glibc is not newer than this node's (Debian 12, Ubuntu 24.04)" >&2
    exit 1
fi
echo "staged $out"
# The inspection CLI (`selvedge status`, ...) for `cargo xtask lab ssh NODE`.
install -m 0755 "$bin/selvedge" /usr/local/bin/selvedge

context=$(mktemp -d)
archive=$(mktemp --suffix=.tar)
trap 'rm -rf "$context" "$archive"' EXIT
cp "$bin/selvedge" "$bin/selvedge-cni" "$context/"
buildah build --quiet --file "$containerfile" --tag "$image" "$context"
rm -f "$archive"
buildah push --quiet "$image" "docker-archive:$archive:$image"
k3s ctr --namespace k8s.io images import "$archive"
k3s ctr --namespace k8s.io images ls --quiet | grep -qxF "$image"
echo "$image imported into $(hostname)'s containerd"
