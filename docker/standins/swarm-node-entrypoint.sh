#!/bin/sh
# The node's dockerd, in a container started without --privileged (see benchmarks/swarm_failover.py).
set -e
# runc inside needs writable /sys and cgroup hierarchies.
mount -o remount,rw /sys 2>/dev/null || true
for d in /sys/fs/cgroup/*; do mount -o remount,bind,rw "$d" "$d" 2>/dev/null || true; done
# A node that was killed left these behind; dockerd would wait for a containerd that never comes.
rm -rf /var/run/docker /var/run/docker.pid /run/containerd
# No registry is reachable: every pull fails at once instead of waiting on DNS.
echo "nameserver 127.0.0.1" > /etc/resolv.conf
exec dockerd --host unix:///var/run/docker.sock --storage-driver overlay2 --log-level warn
