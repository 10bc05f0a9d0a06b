#!/usr/bin/env bash
# Make a CA, one server+peer certificate per etcd member, and client certificates for kvmctl's
# components (admin, controller, one per agent node, one per guest cluster's fence_kvmctl), all
# with openssl.
#
#   deploy/etcd/make-certs.sh OUTDIR "etcd1=10.10.0.11 etcd2=10.10.0.12 etcd3=10.10.0.13" "host1 host2" ["web db"]
#
# The client certificate's CN is the etcd user name when etcd runs with --client-cert-auth and
# authentication enabled: admin, controller, agent-<node>, fence-<guest cluster>.
set -euo pipefail
out=${1:?usage: make-certs.sh OUTDIR "NAME=IP ..." "NODE ..."}
members=${2:?members like "etcd1=10.10.0.11"}
nodes=${3:-}
guest_clusters=${4:-}
days=${KVMCTL_CERT_DAYS:-825}
mkdir -p "$out"
umask 077

if [ ! -f "$out/ca.key" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 3650 \
        -subj "/CN=kvmctl-etcd-ca" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi

sign() {  # sign NAME SUBJECT EXTENSIONS
    local name=$1 subject=$2 extensions=$3
    openssl req -newkey rsa:3072 -nodes -sha256 -subj "$subject" \
        -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
    openssl x509 -req -sha256 -days "$days" -in "$out/$name.csr" -CA "$out/ca.crt" \
        -CAkey "$out/ca.key" -CAcreateserial -out "$out/$name.crt" \
        -extfile <(printf '%s\n' "$extensions") 2>/dev/null
    rm -f "$out/$name.csr"
    echo "wrote $out/$name.crt"
}

for member in $members; do
    name=${member%%=*}
    ip=${member#*=}
    sign "$name" "/CN=$name" "subjectAltName=IP:$ip,IP:127.0.0.1,DNS:$name,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
done
for client in admin controller monitor; do
    sign "$client" "/CN=$client" "extendedKeyUsage=clientAuth"
done
for node in $nodes; do
    sign "agent-$node" "/CN=agent-$node" "extendedKeyUsage=clientAuth"
done
for cluster in $guest_clusters; do
    sign "fence-$cluster" "/CN=fence-$cluster" "extendedKeyUsage=clientAuth"
done
