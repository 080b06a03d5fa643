#!/usr/bin/env bash
# Tandem's two entry points on a fresh Debian machine (run as root):
#   ./dev.sh demo   the main job
#   ./dev.sh test   every check CI runs: fmt, clippy, all tests, bench smoke
# Both install their own prerequisites first (idempotent).
set -euo pipefail
cd "$(dirname "$0")"

# Build and test prerequisites. clang/llvm/libelf/zlib/m4/pkg-config build
# the XDP program and libxdp (see docs/ARCHITECTURE.md); protobuf-compiler's
# protoc builds raft-rs's message types (witness mode); iproute2 builds the
# network-namespace topologies of the root tests and the lab; nftables is
# fwd-bench's kernel baseline and iperf3 its TCP bulk sender; valgrind counts
# the packet core's instructions (fwd-bench --instructions); nftables,
# conntrackd, conntrack and keepalived are the Linux-standard stack the demo
# compares against (--peer-compare); coturn's turnserver and
# turnutils_natdiscovery judge the NAT's RFC 5780 behaviour (nat_netns test);
# rsyslog receives the security log in its UDP/TCP syslog test; hping3 is
# the SYN flood of the screen test, its bench and the lab's flood phase.
APT_PACKAGES=(build-essential pkg-config clang llvm libelf-dev zlib1g-dev m4 make protobuf-compiler iproute2 ethtool nftables
    iperf3 valgrind conntrackd conntrack keepalived iputils-ping iputils-tracepath traceroute coturn rsyslog hping3)

log() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }

install_prerequisites() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            log "missing packages: ${missing[*]}; run as root or install them with apt-get"
            exit 1
        fi
        log "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        # shellcheck disable=SC1091
        [[ -f "$HOME/.cargo/env" ]] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null || { log "cargo not found: install the Rust toolchain (rustup) first"; exit 1; }
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
}

run_tests() {
    log "cargo fmt --check"
    cargo fmt --all -- --check
    log "cargo clippy -D warnings"
    cargo clippy --workspace --all-targets --locked -- -D warnings
    log "cargo test (root-only tests run when root, and say why they skip otherwise)"
    cargo test --workspace --locked
    log "bench smoke: session-bench at 100k sessions (checks invariants after every phase)"
    cargo run --release --locked -q -p tandem-dataplane --bin session-bench -- --sessions 100000 --rounds 1 --json
    log "bench smoke: fwd-bench (packet core, workers, fabric redirect; AF_XDP and TCP vs nftables when root)"
    cargo run --release --locked -q -p tandem-dataplane --bin fwd-bench -- --seconds 1 --json
    log "bench smoke: screen-bench (real connections under an hping3 SYN flood; root)"
    cargo run --release --locked -q -p tandem-dataplane --bin screen-bench -- --seconds 2 --json
    log "bench smoke: forwarding latency while the real sync applies and exports a 200k-session bulk"
    cargo run --release --locked -q -p tandem-cluster --bin sync-bench -- --only latency --bulk 200000 --json
    log "bench smoke: cps-bench at 100k connections (core, sync sender, QUIC, peer table; checks both tables)"
    cargo run --release --locked -q -p tandem-cluster --bin cps-bench -- --connections 100000 --json
    if [[ $(id -u) -eq 0 ]]; then
        log "bench smoke: tandem lab cps (new TCP connections/s on the wire: the Tandem pair vs conntrack + conntrackd)"
        cargo build --release --locked -q --bin tandem
        ./target/release/tandem lab cps --json
    else
        log "skipping tandem lab cps: it builds network namespaces and needs root"
    fi
}

run_demo() {
    log "building tandem (release)"
    cargo build --release --locked -q --bin tandem
    log "tandem lab demo: a chassis-cluster pair in network namespaces, traffic through the fabric, a manual failover, a crash and a rejoin; then the same with conntrackd + keepalived"
    ./target/release/tandem lab demo --peer-compare "$@"
}

install_prerequisites
case "${1:-}" in
    test) run_tests ;;
    demo) shift; run_demo "$@" ;;
    *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
