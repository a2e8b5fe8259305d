#!/usr/bin/env bash
# Every node, first boot, as root: check that the kernel and the system have what the
# Selvedge agent needs, then install the tools the lab uses. Every missing piece is
# reported at once, then provisioning stops.
set -euo pipefail

missing=()

# The agent's programs use kernel 5.15 helpers (netns cookies in sockops/sk_msg).
release=$(uname -r)
IFS=. read -r major minor _ <<<"$release"
if ((major < 5 || (major == 5 && ${minor%%[!0-9]*} < 15))); then
    missing+=("kernel 5.15 or newer (this node runs $release)")
fi

# Capture attaches to the cgroup v2 root; pins live in bpffs.
if [[ $(stat -fc %T /sys/fs/cgroup) != cgroup2fs ]]; then
    missing+=("cgroup v2 at /sys/fs/cgroup (boot with systemd.unified_cgroup_hierarchy=1)")
fi
if [[ $(stat -fc %T /sys/fs/bpf 2>/dev/null) != bpf_fs ]]; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || missing+=("a bpf filesystem at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf failed)")
fi

# Kernel options behind each attach point: cgroup programs (connect, getsockopt, bind),
# sockmap + sk_msg (the fast path), the JIT.
config=/boot/config-$release
if [[ -r $config ]]; then
    for option in CONFIG_BPF_SYSCALL CONFIG_BPF_JIT CONFIG_CGROUP_BPF CONFIG_BPF_STREAM_PARSER CONFIG_NET_SOCK_MSG; do
        grep -q "^$option=y" "$config" || missing+=("$option=y in the kernel configuration")
    done
else
    echo "warning: $config is missing: kernel options not checked" >&2
fi

if ((${#missing[@]})); then
    echo "Selvedge cannot run on $(hostname): this node lacks" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    echo "Use the lab's pinned box (see vagrant/Vagrantfile) or a kernel that has them." >&2
    exit 1
fi
echo "kernel $release: cgroup v2, bpffs and the BPF options Selvedge needs are present"

# The image's apt and cloud-init first-boot jobs hold the dpkg lock for a while.
cloud-init status --wait >/dev/null 2>&1 || true
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# buildah builds selvedge:dev on the node (scripts/image.sh); curl fetches k3s and the
# metrics in the e2e scenario.
apt-get install -y -q --no-install-recommends buildah curl rsync
# bpftool for troubleshooting; Ubuntu ships it per kernel. Not fatal: the lab works without.
apt-get install -y -q --no-install-recommends linux-tools-common "linux-tools-$release" ||
    echo "warning: no linux-tools for $release: bpftool is not available on this node" >&2
