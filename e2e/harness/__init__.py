"""The e2e harness: real daemons (etcd, libvirtd, tgtd, simulated BMCs) and simulated hosts in
network namespaces, started and stopped by the PIDs they were given."""
